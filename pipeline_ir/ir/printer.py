"""The text and Graphviz forms of a Graph.

Text grammar (one node a line; docs/ir.md has the full reference)::

    pipeline NAME(%0: TYPE) -> TYPE:
      %ID: TYPE = STEP(ARGS)              # placement (see placement_text)
      %ID: TYPE = STEP(INIT...)(ARGS)     # class step, init args inline
      %ID: TYPE = LITERAL                 # constant
      %ID: TYPE = %SRC[KEY]               # projection
      %ID: TYPE = switch %KEY {V: %B, ...} [default %D]
      %ID: TYPE = fused MODE {            # placement
        ...body lines...
      } -> %OUT
      return %ID[, %ID...]
"""

from __future__ import annotations

import json
from typing import assert_never

from pipeline_ir.ir.graph_data import GraphData
from pipeline_ir.ir.nodes import (
    AnyNode,
    Call,
    Constant,
    External,
    Fused,
    Inline,
    Input,
    Placement,
    Project,
    StepSpec,
    Switch,
    Value,
    node_inputs,
)
from pipeline_ir.ir.types import render

_COMMENT_COLUMN = 48
_LABEL_STEPS = 8  # a fused group's label names at most this many steps


def value_text(value: Value) -> str:
    """How a constant is spelled in the dump."""
    match value:
        case Inline(value=v):
            return json.dumps(v) if not isinstance(v, float) else repr(v)
        case External(repr=r):
            return r
        case _:
            assert_never(value)


def step_text(step: StepSpec) -> str:
    """`name` for a function step, `Name(init args)` for a class step.

    The step's key stands for its name: it is the name itself unless an
    earlier step of the graph has that name too (`model`, `model#2`), so
    two different steps never print alike."""
    if step.kind == "function":
        return step.key
    parts = [value_text(v) for v in step.init_args]
    parts += [f"{k}={value_text(v)}" for k, v in step.init_kwargs]
    return f"{step.key}({', '.join(parts)})"


def placement_text(p: Placement) -> str:
    """The trailing comment: where a node runs and with what, e.g.
    `actors x2 gpu=1 batch<=8/10ms retry` (batches of up to 8 calls, waiting
    up to 10 ms; a call lost with its replica is retried). Empty for a
    LOCAL unit that reserves nothing."""
    if p == _PLAIN_LOCAL:
        return ""
    parts: list[str] = [p.mode]
    if p.num_replicas > 1:
        parts.append(f"x{p.num_replicas}")
    for label, amount in (("cpu", p.num_cpus), ("gpu", p.num_gpus)):
        if amount is not None:
            parts.append(f"{label}={amount:g}")
    if p.batching is not None:
        parts.append(f"batch<={p.batching.max_batch_size}/{p.batching.batch_wait_timeout_s * 1000:g}ms")
    if p.colocate is not None:
        parts.append(f"colocate={p.colocate}")
    if p.channel:
        parts.append("channel")
    if p.idempotent:
        parts.append("retry")
    return " ".join(parts)


_PLAIN_LOCAL = Placement()


def _line(indent: str, lhs: str, rhs: str, comment: str) -> str:
    text = f"{indent}{lhs} = {rhs}"
    if comment:
        text = f"{text.ljust(_COMMENT_COLUMN - 1)} # {comment}"
    return text


def _lhs(node: AnyNode) -> str:
    return f"%{node.id}: {render(node.type)}"


def _node_lines(graph: GraphData, node: AnyNode, indent: str) -> list[str]:
    match node:
        case Input():
            return []
        case Constant(value=value):
            return [_line(indent, _lhs(node), value_text(value), "")]
        case Call(step=key, args=args, kwargs=kwargs):
            step = graph.step(key)
            arg_text = [f"%{a}" for a in args] + [f"{k}=%{v}" for k, v in kwargs]
            rhs = f"{step_text(step)}({', '.join(arg_text)})"
            comment = placement_text(step.placement)
            if not step.fuse:
                comment = f"{comment} nofuse".strip()
            if step.pure:
                comment = f"{comment} pure".strip()
            return [_line(indent, _lhs(node), rhs, comment)]
        case Project(source=source, key=key):
            return [_line(indent, _lhs(node), f"%{source}[{json.dumps(key)}]", "")]
        case Switch(key=key, cases=cases, default=default):
            arms = ", ".join(f"{json.dumps(c.value)}: %{c.branch}" for c in cases)
            rhs = f"switch %{key} {{{arms}}}" + (f" default %{default}" if default is not None else "")
            return [_line(indent, _lhs(node), rhs, "")]
        case Fused(placement=placement, body=body, output=output):
            comment = placement_text(placement) or "local"
            head = _line(indent, _lhs(node), f"fused {placement.mode} {{", f"{comment}, {len(body)} nodes")
            lines = [head]
            for inner in body:
                lines.extend(_node_lines(graph, inner, indent + "  "))
            lines.append(f"{indent}}} -> %{output}")
            return lines
        case _:
            assert_never(node)


def dump(graph: GraphData) -> str:
    """The text form of `graph`."""
    inp = graph.nodes[0]
    out_types = [render(graph.node(o).type) for o in graph.outputs]
    ret_type = f"({', '.join(out_types)})" if graph.multi_output else out_types[0]
    lines = [f"pipeline {graph.name}(%{inp.id}: {render(inp.type)}) -> {ret_type}:"]
    for node in graph.nodes:
        lines.extend(_node_lines(graph, node, "  "))
    lines.append(f"  return {', '.join(f'%{o}' for o in graph.outputs)}")
    return "\n".join(lines)


def node_label(graph: GraphData, node_id: int) -> str:
    """What errors call a node: its step's name, the names of a fused
    group's steps joined by + (a long group's middle elided: `a+b+...+z`),
    or what the op does."""
    node = graph.node(node_id)
    match node:
        case Call(step=key):
            return graph.step(key).name
        case Fused(body=body):
            names = [graph.step(b.step).name for b in body if isinstance(b, Call)]
            if len(names) > _LABEL_STEPS:
                # Records name a unit once per edge: a long group keeps its
                # first steps and its last, so a label stays short.
                names = names[: _LABEL_STEPS - 2] + ["...", names[-1]]
            return "+".join(names)
        case Project():
            return "getitem"
        case Switch():
            return "switch"
        case Constant():
            return "constant"
        case Input():
            return "input"
        case _:
            assert_never(node)


def _dot_label(graph: GraphData, node: AnyNode) -> str:
    text = "\n".join(line.strip() for line in _node_lines(graph, node, "")[:1]) or f"%{node.id}: {render(node.type)} = input"
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(graph: GraphData) -> str:
    """Graphviz source: one box a node, fused groups as clusters."""
    lines = [f'digraph "{graph.name}" {{', "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']

    def emit(node: AnyNode, indent: str) -> None:
        lines.append(f'{indent}n{node.id} [label="{_dot_label(graph, node)}"];')

    for node in graph.nodes:
        if isinstance(node, Fused):
            lines.append(f"  subgraph cluster_{node.id} {{")
            lines.append(f'    label="fused %{node.id} ({node.placement.mode})"; style=dashed;')
            for inner in node.body:
                emit(inner, "    ")
            lines.append("  }")
        else:
            emit(node, "  ")
    edges: list[str] = []
    for node in graph.all_nodes():
        match node:
            case Fused():
                continue  # its body's edges stand for it
            case Switch(key=key, cases=cases, default=default):
                edges.append(f'  n{key} -> n{node.id} [label="key"];')
                for c in cases:
                    edges.append(f'  n{c.branch} -> n{node.id} [label="{json.dumps(c.value).replace(chr(34), "")}"];')
                if default is not None:
                    edges.append(f'  n{default} -> n{node.id} [label="default"];')
            case _:
                for src in node_inputs(node):
                    edges.append(f"  n{_visible(graph, src)} -> n{node.id};")
    lines.extend(edges)
    for o in graph.outputs:
        lines.append(f'  n{_visible(graph, o)} -> out [style=bold];')
    lines.append('  out [shape=oval, label="output"];')
    lines.append("}")
    return "\n".join(lines)


def _visible(graph: GraphData, node_id: int) -> int:
    """A fused group's id stands for its output inside it when drawing edges."""
    node = graph.index().nodes.get(node_id)
    return node.output if isinstance(node, Fused) else node_id
