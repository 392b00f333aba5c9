"""place_gpu: GPU steps get their GPUs, or a decision when the cluster has none.

Which GPUs a Ray cluster has is known only once Ray is up, so this pass
runs at deploy (`CompiledPipeline.place(cluster_gpus)`, which the Ray
backend calls with `ray.cluster_resources()["GPU"]`), never in compile():
compile() starts nothing. It decides, and its record shows in explain()
and its result in the deployed graph's dump; the backend only obeys.

A GPU unit is a TASKS or ACTORS call whose step asks for `num_gpus`, or a
remote fused group that does. LOCAL steps reserve nothing (they run in the
caller, with whatever devices it sees) and are left alone.

- Every unit fits (each asks for at most the cluster's GPUs, and the actor
  replicas' reservations plus the largest GPU task fit together): no change.
- A unit asks for more GPUs than the cluster has (on a CPU-only cluster:
  any GPU at all): PlacementError naming each such step, unless
  `fallback=True` (`compile(..., gpu_fallback=True)`); then its GPU request
  is dropped, it runs on CPU, and one record per unit says so.
- The units fit one by one but the actors together reserve more GPUs than
  there are: PlacementError, fallback or not. Ray would start some
  replicas and leave the rest pending forever; running some GPU steps on
  CPU on a cluster that has GPUs is a choice the pass does not make.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from pipeline_ir.errors import PlacementError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import AnyNode, Call, Fused, StepSpec
from pipeline_ir.ir.printer import node_label
from pipeline_ir.passes.manager import PassResult


@dataclass(frozen=True)
class GpuUnit:
    """One thing Ray reserves GPUs for: a step's tasks or replica pool, or
    a remote fused group."""

    name: str  # "step 'model' (%3, %5)" or "fused group %7 (a+b)"
    step: str | None  # the step key, for a call
    fused: int | None  # the node id, for a fused group
    gpus: float  # per task or per replica
    replicas: int
    actors: bool

    def asks(self) -> str:
        per = "replica" if self.actors else "task"
        return f"{self.name} asks for {self.gpus:g} GPU{'s' if self.gpus != 1 else ''} per {per}"


def gpu_units(graph: Graph) -> list[GpuUnit]:
    """The remote units of `graph` that ask for GPUs, in graph order."""
    units: list[GpuUnit] = []
    seen: set[str] = set()
    for n in graph.units():
        p = graph.unit_placement(n)
        if not p.remote or not (p.num_gpus or 0) > 0:
            continue
        if isinstance(n, Fused):
            name = f"fused group %{n.id} ({node_label(graph, n.id)})"
            units.append(GpuUnit(name, None, n.id, p.num_gpus or 0, p.num_replicas, p.mode == "actors"))
        elif n.step not in seen:
            seen.add(n.step)
            # A step's calls share its tasks' resources or its one pool.
            ids = ", ".join(f"%{c.id}" for c in graph.callers(n.step) if graph.unit_of(c.id) is c)
            name = f"step {graph.step(n.step).name!r} ({ids})"
            units.append(GpuUnit(name, n.step, None, p.num_gpus or 0, p.num_replicas, p.mode == "actors"))
    return units


def check_gpus(graph: Graph, cluster_gpus: float) -> list[GpuUnit]:
    """The units that cannot get their GPUs on a cluster with `cluster_gpus`
    (each alone); raise PlacementError if the rest cannot all be placed at
    once. For backends that need the check without the pass."""
    units = gpu_units(graph)
    short = [u for u in units if u.gpus > cluster_gpus]
    fits = [u for u in units if u.gpus <= cluster_gpus]
    reserved = sum(u.gpus * u.replicas for u in fits if u.actors)
    largest_task = max((u.gpus for u in fits if not u.actors), default=0.0)
    if reserved + largest_task > cluster_gpus:
        held = ", ".join(f"{u.name} x{u.replicas} gpu={u.gpus:g}" for u in fits if u.actors)
        task = f" plus {largest_task:g} for the largest GPU task" if largest_task else ""
        raise PlacementError(
            f"the Ray cluster has {cluster_gpus:g} GPUs, but the actor replicas reserve {reserved:g} ({held}){task}; "
            "some would wait forever: lower num_replicas or num_gpus, or add GPUs to the cluster"
        )
    return short


def place_gpu(graph: Graph, *, cluster_gpus: float | None = None, fallback: bool = False) -> PassResult:
    """Check `graph`'s GPU requests against a cluster with `cluster_gpus`
    GPUs (None: not known yet, nothing to decide). Units that cannot get
    their GPUs raise PlacementError, or with `fallback` run on CPU."""
    if cluster_gpus is None:
        return PassResult(graph)
    short = check_gpus(graph, cluster_gpus)
    if not short:
        return PassResult(graph)
    if not fallback:
        raise PlacementError(
            f"the Ray cluster has {cluster_gpus:g} GPUs, but "
            + "; ".join(u.asks() for u in short)
            + ": add GPUs to the cluster, lower num_gpus, or compile(..., gpu_fallback=True) to run "
            + ("it" if len(short) == 1 else "them")
            + " on CPU"
        )
    steps = {u.step for u in short if u.step is not None}
    groups = {u.fused for u in short if u.fused is not None}
    # A fused group's members ask for the group's GPUs: they fall back with it.
    for n in graph.units():
        if isinstance(n, Fused) and n.id in groups:
            steps.update(b.step for b in n.body if isinstance(b, Call))
    new_steps = tuple(_on_cpu(s) if s.key in steps else s for s in graph.steps)
    nodes = tuple(_fused_on_cpu(n) if n.id in groups else n for n in graph.nodes)
    rewrites = tuple(
        f"{u.name}: gpu={u.gpus:g} -> CPU: the cluster has {cluster_gpus:g} GPUs and gpu_fallback=True" for u in short
    )
    return PassResult(msgspec.structs.replace(graph, steps=new_steps, nodes=nodes), rewrites)


def _on_cpu(step: StepSpec) -> StepSpec:
    return msgspec.structs.replace(step, placement=msgspec.structs.replace(step.placement, num_gpus=None))


def _fused_on_cpu(node: AnyNode) -> AnyNode:
    if not isinstance(node, Fused):
        return node
    return msgspec.structs.replace(node, placement=msgspec.structs.replace(node.placement, num_gpus=None))
