"""eliminate_dead: drop nodes whose value no output needs.

A node is live when it is an output or a live node reads it; everything
else is dropped, and so is a step no remaining node calls. The input node
always stays (it is the pipeline's signature). Tracing records only what
the outputs reach, so a traced graph has no dead node; this pass cleans up
graphs built or edited by hand, decoded from JSON, or left by other
passes. Fused bodies are left whole: fusion only groups nodes it reads.
"""

from __future__ import annotations

import msgspec

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Input, node_inputs
from pipeline_ir.ir.printer import node_label
from pipeline_ir.passes.manager import PassResult


def live_nodes(graph: Graph) -> set[int]:
    """Ids of the top-level nodes the outputs need, and the input node."""
    live = set(graph.outputs)
    for n in reversed(graph.nodes):
        if n.id in live:
            live.update(node_inputs(n))
    live.add(graph.nodes[0].id)
    return live


def eliminate_dead(graph: Graph) -> PassResult:
    """Drop every top-level node (but the input) no output depends on."""
    live = live_nodes(graph)
    dead = [n for n in graph.nodes if n.id not in live and not isinstance(n, Input)]
    if not dead:
        return PassResult(graph)
    nodes = tuple(n for n in graph.nodes if n.id in live)
    kept = msgspec.structs.replace(graph, nodes=nodes)
    called = {n.step for n in kept.all_nodes() if isinstance(n, Call)}
    steps = tuple(s for s in graph.steps if s.key in called)
    rewrites = [f"dropped %{n.id} ({node_label(graph, n.id)}): no output uses its value" for n in dead]
    rewrites += [f"dropped step {s.name!r}: no node calls it any more" for s in graph.steps if s.key not in called]
    return PassResult(msgspec.structs.replace(kept, steps=steps), tuple(rewrites))
