"""place: fit the whole deployment to the Ray cluster, or say why it cannot.

What a Ray cluster has is known only once Ray is up, so this pass runs at
deploy (`CompiledPipeline.place(cluster)`, which deploy() calls with
`ray_runtime.cluster_snapshot()`), never in compile(): compile() starts
nothing. It takes the cluster as plain data (place_cluster.py), decides,
and writes every decision in its record (explain()); the backends only
lower what it decided and raise no placement error of their own.

The remote units are the TASKS and ACTORS steps and fused groups (LOCAL
steps run in the caller with whatever it has, and reserve nothing).

1. GPUs. A unit asking for more GPUs per task or replica than any one
   node has (on a CPU-only cluster: any GPU at all) raises PlacementError
   naming each such unit, unless `fallback=True` (`compile(...,
   gpu_fallback=True)`): its GPU request is then dropped and it runs on
   CPU, one record per unit.
2. Room (place_pack.py). Actor replicas hold their resources while the
   pipeline runs, so all of them are packed onto the nodes' available
   resources (their totals with `check="total"`), and every TASKS unit
   must still find a node with room for one task beside them; otherwise
   Ray would start some replicas and leave the rest, or the calls, waiting
   forever. A deployment that does not fit is a PlacementError naming the
   unit, what it needs per replica and in all, what the cluster has in
   all and free, and what to do. The fallback never moves a unit to CPU
   for lack of room: running some GPU steps on CPU on a cluster that has
   GPUs is a choice the pass does not make.

`check="off"` (for autoscaling clusters, whose nodes come on demand) skips
both checks: nothing is raised, the fallback still applies to the nodes
the cluster reports, and deploy() waits up to its `deploy_timeout_s`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from pipeline_ir.errors import PlacementError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import AnyNode, Call, Fused, StepSpec
from pipeline_ir.passes.manager import PassResult
from pipeline_ir.passes.place_cluster import Cluster
from pipeline_ir.passes.place_pack import RemoteUnit, pack, remote_units

Check = Literal["available", "total", "off"]
CHECKS: tuple[Check, ...] = ("available", "total", "off")


def place(graph: Graph, *, cluster: Cluster | None = None, fallback: bool = False, check: Check = "available") -> PassResult:
    """Fit `graph` to `cluster` (None: not known yet, nothing to decide).
    Raises PlacementError for what cannot fit; with `fallback`, units
    asking for GPUs no node has run on CPU instead."""
    if cluster is None:
        return PassResult(graph)
    units = remote_units(graph)
    if not units:
        return PassResult(graph)
    most = max((n.total.gpu for n in cluster.nodes), default=0.0)
    short = [u for u in units if (u.gpus or 0.0) > most]
    lines: list[str] = []
    if short and fallback:
        graph, lines = _on_cpu(graph, short, most)
        units = remote_units(graph)
    elif short and check != "off":
        raise PlacementError(
            f"no node of the Ray cluster has more than {_gpus(most)} ({cluster.text()}), but "
            + "; ".join(f"{u.name} asks for {_gpus(u.gpus or 0.0)} per {u.per()}" for u in short)
            + ": add GPUs to the cluster, lower num_gpus, or compile(..., gpu_fallback=True) to run "
            + ("it" if len(short) == 1 else "them")
            + " on CPU",
            step_name=short[0].name,
        )
    if check == "off":
        lines.append(f"cluster: {cluster.text()}; resources not checked (deploy(check_resources='off')): {_waiting(units)}")
        return PassResult(graph, tuple(lines))
    return PassResult(graph, tuple(lines + pack(units, cluster, check)))


def _gpus(n: float) -> str:
    return f"{n:g} GPU{'' if n == 1 else 's'}"


def _waiting(units: list[RemoteUnit]) -> str:
    actors = sum(u.replicas for u in units if u.actors)
    return f"Ray or its autoscaler must find room for {actors} replica{'' if actors == 1 else 's'}, or deploy() fails after deploy_timeout_s"


def _on_cpu(graph: Graph, short: list[RemoteUnit], most: float) -> tuple[Graph, list[str]]:
    """`graph` with the GPU requests of `short` dropped, and a record line each."""
    steps = {u.step for u in short if u.step is not None}
    groups = {u.fused for u in short if u.fused is not None}
    # A fused group's members ask for the group's GPUs: they fall back with it.
    for n in graph.units():
        if isinstance(n, Fused) and n.id in groups:
            steps.update(b.step for b in n.body if isinstance(b, Call))
    new_steps = tuple(_step_on_cpu(s) if s.key in steps else s for s in graph.steps)
    nodes = tuple(_fused_on_cpu(n) if n.id in groups else n for n in graph.nodes)
    lines = [
        f"{u.name}: gpu={u.gpus or 0.0:g} -> CPU: no node has {_gpus(u.gpus or 0.0)} (at most {most:g}) and gpu_fallback=True"
        for u in short
    ]
    return msgspec.structs.replace(graph, steps=new_steps, nodes=nodes), lines


def _step_on_cpu(step: StepSpec) -> StepSpec:
    return msgspec.structs.replace(step, placement=msgspec.structs.replace(step.placement, num_gpus=None))


def _fused_on_cpu(node: AnyNode) -> AnyNode:
    if not isinstance(node, Fused):
        return node
    return msgspec.structs.replace(node, placement=msgspec.structs.replace(node.placement, num_gpus=None))
