"""force_backend: run every step on one backend (`compile(backend=...)`).

Rewrites each step's mode. Replica counts above one survive only on the
actors backend (replicas are actors); resources stay as declared, since
they mean the same for a task and an actor.
"""

from __future__ import annotations

import msgspec

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Fused, Mode
from pipeline_ir.passes.manager import PassResult


def force_backend(graph: Graph, backend: Mode) -> PassResult:
    """Set every step's (and fused group's) mode to `backend`."""
    rewrites: list[str] = []
    steps = []
    for s in graph.steps:
        if s.mode == backend:
            steps.append(s)
            continue
        replicas = s.num_replicas if backend == "actors" else 1
        note = f" (num_replicas {s.num_replicas} -> 1: replicas exist only on actors)" if replicas != s.num_replicas else ""
        rewrites.append(f"step {s.name!r}: {s.mode} -> {backend}, as compile(backend={backend!r}) asks{note}")
        steps.append(msgspec.structs.replace(s, mode=backend, num_replicas=replicas))
    nodes = tuple(
        msgspec.structs.replace(n, mode=backend, num_replicas=n.num_replicas if backend == "actors" else 1)
        if isinstance(n, Fused) and n.mode != backend
        else n
        for n in graph.nodes
    )
    if not rewrites and nodes == graph.nodes:
        return PassResult(graph)
    return PassResult(msgspec.structs.replace(graph, steps=tuple(steps), nodes=nodes), tuple(rewrites))
