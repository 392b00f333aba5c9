"""Invariants of a Graph, and the compile-time type check.

`verify` checks structure (ids, order, references, fused groups, step
options) and raises GraphError naming what is wrong; `check_types` raises
PipelineTypeError where an edge's types cannot match. compile() runs both on
the traced graph, and the pass manager runs them after every pass.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline_ir.errors import GraphError, PipelineTypeError
from pipeline_ir.ir.graph_data import GraphData
from pipeline_ir.ir.nodes import (
    AnyNode,
    Call,
    Constant,
    Fused,
    Input,
    Param,
    Placement,
    StepSpec,
    Switch,
    node_inputs,
)
from pipeline_ir.ir.types import ANY, TypeRef, can_match, render


def _check_placement(where: str, p: Placement, mode_word: str) -> None:
    """`mode_word`: what the mode is called where the unit came from
    (a step's `execution_mode`, a fused group's `mode`)."""
    if p.num_replicas < 1:
        raise GraphError(f"{where}: num_replicas must be at least 1, got {p.num_replicas}")
    if p.num_replicas > 1 and p.mode != "actors":
        raise GraphError(f"{where}: num_replicas={p.num_replicas} needs {mode_word} 'actors', not {p.mode!r}")
    for label, amount in (("num_cpus", p.num_cpus), ("num_gpus", p.num_gpus)):
        if amount is not None and amount < 0:
            raise GraphError(f"{where}: {label} must be >= 0, got {amount}")
    if p.channel and (p.mode != "actors" or p.num_replicas != 1):
        raise GraphError(f"{where}: channel=True needs {mode_word} 'actors' and one replica")
    if p.batching is not None:
        # Off ACTORS (only after compile(backend=...)) a call is a batch of one.
        if p.batching.max_batch_size < 1:
            raise GraphError(f"{where}: max_batch_size must be at least 1, got {p.batching.max_batch_size}")
        if p.batching.batch_wait_timeout_s < 0:
            raise GraphError(f"{where}: batch_wait_timeout_s must be >= 0, got {p.batching.batch_wait_timeout_s}")
        if p.channel:
            raise GraphError(f"{where}: a batched unit cannot use a channel (a channel carries one call at a time)")
    if p.idempotent and p.mode == "local":
        raise GraphError(f"{where}: idempotent=True applies to 'tasks' and 'actors' units, not 'local'")


def _check_step(step: StepSpec) -> None:
    where = f"step {step.name!r}"
    _check_placement(where, step.placement, "execution_mode")
    if step.kind == "class" and step.pure:
        raise GraphError(f"{where}: pure=True is for function steps; class steps hold state")


def verify(graph: GraphData) -> None:
    """Raise GraphError unless `graph` satisfies every IR invariant."""
    if not graph.nodes or not isinstance(graph.nodes[0], Input):
        raise GraphError(f"graph {graph.name!r}: the first node must be the input node")
    keys = [s.key for s in graph.steps]
    if len(set(keys)) != len(keys):
        raise GraphError(f"graph {graph.name!r}: duplicate step keys in {keys}")
    for s in graph.steps:
        _check_step(s)
    steps = set(keys)
    seen: set[int] = set()  # every id so far, body nodes included (ids are graph-wide)
    top: set[int] = set()  # top-level ids so far: the only ones top-level nodes may read
    used_steps: set[str] = set()

    def define(node: AnyNode) -> None:
        if node.id in seen:
            raise GraphError(f"graph {graph.name!r}: node id %{node.id} is defined twice")
        seen.add(node.id)
        top.add(node.id)

    def check_refs(node: AnyNode) -> None:
        for ref in node_inputs(node):
            if ref in seen and ref not in top:
                raise GraphError(
                    f"graph {graph.name!r}: node %{node.id} reads %{ref}, which is inside a fused "
                    "group: only the group's value (its own id) is visible outside it"
                )
            if ref not in top:
                raise GraphError(f"graph {graph.name!r}: node %{node.id} reads %{ref}, which is not defined before it")
        if isinstance(node, Call):
            if node.step not in steps:
                raise GraphError(f"graph {graph.name!r}: node %{node.id} calls unknown step {node.step!r}")
            used_steps.add(node.step)

    for i, node in enumerate(graph.nodes):
        if isinstance(node, Input) and i != 0:
            raise GraphError(f"graph {graph.name!r}: node %{node.id} is a second input node")
        if isinstance(node, Switch) and not node.cases and node.default is None:
            raise GraphError(f"graph {graph.name!r}: switch %{node.id} has no case and no default")
        check_refs(node)
        if isinstance(node, Fused):
            _verify_fused(graph, node, seen)
            used_steps.update(n.step for n in node.body if isinstance(n, Call))
        define(node)
    if not graph.outputs:
        raise GraphError(f"graph {graph.name!r}: no outputs")
    top_ids = {n.id for n in graph.nodes}
    for o in graph.outputs:
        if o not in top_ids:
            raise GraphError(f"graph {graph.name!r}: output %{o} is not a top-level node")
    if not graph.multi_output and len(graph.outputs) != 1:
        raise GraphError(f"graph {graph.name!r}: a single-output graph has {len(graph.outputs)} outputs")
    unused = steps - used_steps
    if unused:
        raise GraphError(f"graph {graph.name!r}: steps {sorted(unused)} are not called by any node")


def _verify_fused(graph: GraphData, node: Fused, seen: set[int]) -> None:
    """Check a fused group; its body ids join `seen` (ids are graph-wide)."""
    where = f"graph {graph.name!r}: fused %{node.id}"
    if not node.body:
        raise GraphError(f"{where} has an empty body")
    _check_placement(where, node.placement, "mode")
    visible = set(node.inputs)
    for inner in node.body:
        for ref in node_inputs(inner):
            if ref not in visible:
                raise GraphError(
                    f"{where}: body node %{inner.id} reads %{ref}, which is neither "
                    "an input of the group nor defined before it in the body"
                )
        if inner.id in seen:
            raise GraphError(f"{where}: node id %{inner.id} is defined twice")
        if isinstance(inner, Call):
            step = graph.step(inner.step)
            if step.placement.mode != node.placement.mode:
                raise GraphError(f"{where} ({node.placement.mode}) holds step {step.name!r} of mode {step.placement.mode!r}")
            if step.placement.batching is not None:
                raise GraphError(f"{where} holds batched step {step.name!r}: a batched step is a unit of its own")
        seen.add(inner.id)
        visible.add(inner.id)
    if node.output not in {inner.id for inner in node.body}:
        raise GraphError(f"{where}: output %{node.output} is not a body node")


# -- types --


def bind_arguments(step: StepSpec, n_args: int, kw_names: tuple[str, ...]) -> Iterator[tuple[int, str, Param]]:
    """Pair each argument of a call with the parameter it binds to:
    (index among positional args then keywords, parameter label, Param).
    Arguments that bind to no known parameter are left out."""
    positional = [p for p in step.params if p.kind == "positional"]
    var_pos = next((p for p in step.params if p.kind == "var_positional"), None)
    for i in range(n_args):
        if i < len(positional):
            yield i, positional[i].name, positional[i]
        elif var_pos is not None:
            yield i, f"*{var_pos.name}", var_pos
    by_name = {p.name: p for p in step.params if p.kind in ("positional", "keyword")}
    var_kw = next((p for p in step.params if p.kind == "var_keyword"), None)
    for j, name in enumerate(kw_names):
        param = by_name.get(name, var_kw)
        if param is not None:
            yield n_args + j, name, param


def _producer(graph: GraphData, node_id: int) -> str:
    node = graph.node(node_id)
    match node:
        case Call(step=key):
            return f"step {graph.step(key).name!r} (node %{node_id})"
        case Input():
            return "the pipeline input (%0)"
        case Constant():
            return f"constant %{node_id}"
        case _:
            return f"node %{node_id}"


def check_types(graph: GraphData) -> None:
    """Raise PipelineTypeError where a value's known type cannot match the
    known type of the parameter it is passed to."""
    for node in graph.all_nodes():
        if not isinstance(node, Call):
            continue
        step = graph.step(node.step)
        inputs = node.args + tuple(v for _, v in node.kwargs)
        for index, pname, param in bind_arguments(step, len(node.args), tuple(k for k, _ in node.kwargs)):
            src_type: TypeRef = graph.node(inputs[index]).type
            if param.type == ANY or can_match(src_type, param.type):
                continue
            raise PipelineTypeError(
                f"{_producer(graph, inputs[index])} returns {render(src_type)}, but step "
                f"{step.name!r} (node %{node.id}) expects {render(param.type)} for parameter "
                f"{pname!r}: convert the value in between, or fix one of the annotations"
            )
