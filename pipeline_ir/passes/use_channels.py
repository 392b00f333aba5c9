"""use_channels: single-replica actor units between the caller's values call
over Ray Compiled Graph channels (opt-in: `compile(..., channels=True)`).

An actor call normally costs one Ray actor task: a submission, scheduling
on the actor and an object for the result, about 1 ms here whatever the
work. A Ray Compiled Graph (`experimental_compile()`) instead keeps a loop
running in the actor that reads its inputs from, and writes its result to,
shared-memory channels: a call is a channel write and a read. This pass
marks the actor units (an ACTORS step, or a colocated ACTORS group) whose
calls can go that way; the actors backend compiles one graph per marked
unit at deploy.

A unit is marked when:

- it has one replica: a compiled graph is bound to one actor, so a pool
  of several keeps least-loaded routing over actor tasks;
- it is not batched: a channel carries one call at a time, so a replica
  would never see two calls to batch;
- every value it reads is in the caller (the input, constants, local
  steps, projections): a channel takes values, not ObjectRefs;
- every reader of its result is in the caller (a local step, a
  projection, or the pipeline's output): a compiled graph's result
  cannot be passed to another Ray task or actor;
- every node calling the step qualifies (a step is one pool).

Asynchronous calls (`call_async`) keep using actor tasks, which can be
awaited; the replica runs one call at a time either way. Opt-in because
Compiled Graphs are an experimental Ray feature (docs/passes.md).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from pipeline_ir.ir.graph import CALLER, Graph
from pipeline_ir.ir.nodes import Call, Fused, Project, StepSpec, node_inputs
from pipeline_ir.ir.printer import node_label
from pipeline_ir.ir.schedule import remote_values
from pipeline_ir.passes.manager import PassResult


def _reader_in_caller(graph: Graph, reader: int, remote: set[int]) -> bool:
    """Whether `reader` takes its input as a value in the caller: a local
    call or group, a projection, or the caller itself (not a switch, whose
    value may stay a Ray handle)."""
    if reader == CALLER:
        return True
    node = graph.node(reader)
    return isinstance(node, (Call, Fused, Project)) and reader not in remote


def _why_not(graph: Graph, node: Call | Fused, remote: set[int], readers: dict[int, list[int]]) -> str | None:
    """None when `node` (an actor call or group) may use a channel, else why not."""
    placement = graph.unit_placement(node)
    if placement.num_replicas != 1:
        return f"it has {placement.num_replicas} replicas, and a compiled graph binds one actor"
    if placement.batching is not None:
        return "it is batched, and a channel carries one call at a time"
    far = [i for i in node_inputs(node) if i in remote]
    if far:
        return f"it reads {', '.join(f'%{i}' for i in far)} from another Ray process"
    outward = [r for r in dict.fromkeys(readers[node.id]) if not _reader_in_caller(graph, r, remote)]
    if outward:
        return f"its result goes to {', '.join(f'%{r}' for r in outward)}, which does not read it in the caller"
    return None


def use_channels(graph: Graph) -> PassResult:
    """Mark single-replica actor units whose inputs and readers are all in
    the caller to run over Compiled Graph channels."""
    remote = remote_values(graph)
    readers = graph.readers()
    # A step is marked only if every node calling it qualifies.
    step_nodes: dict[str, list[Call]] = {}
    fused: list[Fused] = []
    for n in graph.units():
        p = graph.unit_placement(n)
        if p.mode != "actors" or p.channel:
            continue
        if isinstance(n, Call):
            step_nodes.setdefault(n.step, []).append(n)
        else:
            fused.append(n)
    rewrites: list[str] = []
    marked_steps: set[str] = set()
    for key, calls in step_nodes.items():
        reasons = [(c, _why_not(graph, c, remote, readers)) for c in calls]
        blocked = [(c, reason) for c, reason in reasons if reason is not None]
        name = graph.step(key).name
        if blocked:
            c, reason = blocked[0]
            rewrites.append(f"{name} keeps actor tasks: %{c.id} cannot use a channel, {reason}")
            continue
        marked_steps.add(key)
        rewrites.append(f"{name} ({', '.join(f'%{c.id}' for c in calls)}): {_WHY}")
    marked_fused: set[int] = set()
    for f in fused:
        why = _why_not(graph, f, remote, readers)
        label = f"%{f.id} ({node_label(graph, f.id)})"
        if why is not None:
            rewrites.append(f"{label} keeps actor tasks: {why}")
            continue
        marked_fused.add(f.id)
        rewrites.append(f"{label}: {_WHY}")
    if not marked_steps and not marked_fused:
        return PassResult(graph, tuple(rewrites))
    steps = tuple(_on_channel(s) if s.key in marked_steps else s for s in graph.steps)
    nodes = tuple(_on_channel(n) if isinstance(n, Fused) and n.id in marked_fused else n for n in graph.nodes)
    return PassResult(msgspec.structs.replace(graph, steps=steps, nodes=nodes), tuple(rewrites))


_Placed = TypeVar("_Placed", StepSpec, Fused)


def _on_channel(thing: _Placed) -> _Placed:
    return msgspec.structs.replace(thing, placement=msgspec.structs.replace(thing.placement, channel=True))


_WHY = "reads and returns values in the caller with one replica, so calls go over Compiled Graph channels instead of an actor task each"
