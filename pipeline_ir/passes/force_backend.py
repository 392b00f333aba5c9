"""force_backend: run every step on one backend (`compile(backend=...)`).

Rewrites each step's mode. Replica counts above one survive only on the
actors backend (replicas are actors); resources stay as declared, since
they mean the same for a task and an actor. `idempotent` is dropped on
the local backend (a local call has no replica to lose). `batching` stays
whatever the backend: the step's callable still takes and returns a list,
and off the actors backend each call is a batch of one.
"""

from __future__ import annotations

import msgspec

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Fused, Mode, Placement
from pipeline_ir.passes.manager import PassResult


def force_backend(graph: Graph, backend: Mode) -> PassResult:
    """Set every step's (and fused group's) mode to `backend`."""
    rewrites: list[str] = []
    steps = []
    for s in graph.steps:
        p = s.placement
        if p.mode == backend:
            steps.append(s)
            continue
        notes = []
        if p.num_replicas > 1 and backend != "actors":
            notes.append(f"num_replicas {p.num_replicas} -> 1: replicas exist only on actors")
        if p.idempotent and backend == "local":
            notes.append("idempotent dropped: a local call has no replica to lose")
        if p.batching is not None and backend != "actors":
            notes.append("each call is a batch of one")
        note = f" ({'; '.join(notes)})" if notes else ""
        rewrites.append(f"step {s.name!r}: {p.mode} -> {backend}, as compile(backend={backend!r}) asks{note}")
        steps.append(msgspec.structs.replace(s, placement=_on(backend, p)))
    nodes = tuple(
        msgspec.structs.replace(n, placement=_on(backend, n.placement))
        if isinstance(n, Fused) and n.placement.mode != backend
        else n
        for n in graph.nodes
    )
    if not rewrites and nodes == graph.nodes:
        return PassResult(graph)
    return PassResult(msgspec.structs.replace(graph, steps=tuple(steps), nodes=nodes), tuple(rewrites))


def _on(backend: Mode, p: Placement) -> Placement:
    """`p` moved to `backend`."""
    return msgspec.structs.replace(
        p,
        mode=backend,
        num_replicas=p.num_replicas if backend == "actors" else 1,
        idempotent=p.idempotent and backend != "local",
    )
