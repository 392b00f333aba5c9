"""eliminate_common: identical pure computations run once (CSE).

Walking the graph in order, each node gets a key that says what it
computes in terms of the (already merged) nodes it reads; a node whose key
was seen before is dropped and its readers read the earlier node instead.
What may merge:

- calls of a function step declared `pure=True`, with the same arguments
  (keyword order does not matter). Steps are impure by default, and class
  steps never merge: their instances hold state, so two calls are two
  calls;
- constants with the same inline scalar value and type (JSON-equal, so
  `1`, `1.0` and `true` stay apart). Lists, dicts and External constants
  (arrays, objects) never merge: they may be mutated by a step, and two
  steps must not start sharing one object;
- projections of the same node by the same key.

Switch arms need no rule of their own: a node runs in exactly the arms
that need it (ir/schedule.py), so the merged node runs on the calls where
either original would have run, and on no other: merging two calls from
sibling arms emits the one call in both arms, never before the switch.
Fused bodies are opaque here: run this pass before fusion, as
`default_passes()` does.
"""

from __future__ import annotations

from collections.abc import Hashable

import msgspec

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import AnyNode, Call, Constant, Inline, Project, remap_inputs
from pipeline_ir.ir.printer import node_label
from pipeline_ir.passes.manager import PassResult


def _key(graph: Graph, node: AnyNode) -> Hashable | None:
    """What `node` computes, for nodes that may merge; None for the rest."""
    match node:
        case Call(step=step_key, args=args, kwargs=kwargs):
            step = graph.step(step_key)
            if not step.pure or step.kind != "function":
                return None
            return ("call", step_key, args, tuple(sorted(kwargs)))
        case Constant(value=Inline(value=value)) if not isinstance(value, (list, dict)):
            return ("constant", node.type, msgspec.json.encode(value))
        case Project(source=source, key=key):
            return ("project", source, type(key).__name__, key)
        case _:
            return None


def eliminate_common(graph: Graph) -> PassResult:
    """Merge identical pure calls, inline constants and projections."""
    seen: dict[Hashable, int] = {}  # key -> id of the first node computing it
    mapping: dict[int, int] = {}  # dropped id -> the id that replaces it
    nodes: list[AnyNode] = []
    rewrites: list[str] = []
    for original in graph.nodes:
        node = remap_inputs(original, mapping)
        key = _key(graph, node)
        target = None if key is None else seen.get(key)
        if target is None:
            nodes.append(node)
            if key is not None:
                seen[key] = node.id
            continue
        mapping[node.id] = target
        rewrites.append(f"merged %{node.id} into %{target} ({node_label(graph, node.id)}): {_why(node)}")
    if not mapping:
        return PassResult(graph)
    outputs = tuple(mapping.get(o, o) for o in graph.outputs)
    return PassResult(msgspec.structs.replace(graph, nodes=tuple(nodes), outputs=outputs), tuple(rewrites))


def _why(node: AnyNode) -> str:
    match node:
        case Call():
            return "same pure step on the same inputs, so it runs once"
        case Constant():
            return "same inline value and type, so one node holds it"
        case _:
            return "same item of the same value, so it is taken once"
