"""What a deployment reserves on a Ray cluster, and whether it fits.

The `place` pass (place.py) asks this module two things: which remote
units a graph has and what Ray reserves for each (`remote_units`), and
whether the actor replicas and one task of every TASKS unit fit on the
cluster's nodes together (`pack`). Nothing here rewrites a graph or
imports Ray.

Ray's own defaults are modelled, since they decide what waits:
- a task takes `num_cpus` (default 1) and `num_gpus` while it runs;
- an actor replica holds its resources for the pipeline's lifetime. With
  neither num_cpus nor num_gpus it holds no CPU but needs 1 free CPU to be
  scheduled; with num_gpus alone it holds 1 CPU as well (Ray's
  DEFAULT_ACTOR_CREATION_CPU_SPECIFIED).

Replicas are packed first-fit decreasing (largest GPU, then CPU share
first; CPU-only replicas try nodes without GPUs first, as Ray's scheduler
does) into the nodes' available resources, or their totals. Then every
TASKS unit needs a node with room for one task beside the replicas; if it
has none its calls would queue forever. First-fit decreasing is a
heuristic: a deployment it cannot pack may in principle fit, but Ray
places replicas one at a time greedily, and would not find that packing
either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline_ir.errors import PlacementError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Fused
from pipeline_ir.ir.printer import node_label
from pipeline_ir.passes.place_cluster import Cluster, ClusterNode, Resources

Use = Literal["available", "total"]


@dataclass(frozen=True)
class RemoteUnit:
    """One thing Ray reserves resources for: a step's tasks or replica
    pool, or a remote fused group."""

    name: str  # "step 'model' (%3, %5)" or "fused group %7 (a+b)"
    step: str | None  # the step key, for a call
    fused: int | None  # the node id, for a fused group
    actors: bool
    replicas: int
    cpus: float | None  # as declared; None: Ray's default
    gpus: float | None

    @property
    def hold(self) -> Resources:
        """What one replica holds while it lives, or one task while it runs."""
        if self.actors and self.cpus is None:
            return Resources(cpu=0.0 if self.gpus is None else 1.0, gpu=self.gpus or 0.0)
        return Resources(cpu=1.0 if self.cpus is None else self.cpus, gpu=self.gpus or 0.0)

    @property
    def start(self) -> Resources:
        """What must be free on a node to start one replica or task."""
        hold = self.hold
        return Resources(cpu=max(hold.cpu, 1.0), gpu=hold.gpu) if self.actors and self.cpus is None else hold

    def need_text(self) -> str:
        """`CPU=1, GPU=1`, or `CPU=0 (1 to start), GPU=0` for a default actor."""
        hold, start = self.hold, self.start
        if start.cpu != hold.cpu:
            return f"CPU={hold.cpu:g} ({start.cpu:g} to start), GPU={hold.gpu:g}"
        return hold.text()

    def per(self) -> str:
        return "replica" if self.actors else "task"


def remote_units(graph: Graph) -> list[RemoteUnit]:
    """The TASKS and ACTORS units of `graph`, in graph order (a step's
    calls share one unit: its tasks' resources, or its one pool)."""
    units: list[RemoteUnit] = []
    seen: set[str] = set()
    for n in graph.units():
        p = graph.unit_placement(n)
        if not p.remote:
            continue
        if isinstance(n, Fused):
            name = f"fused group %{n.id} ({node_label(graph, n.id)})"
            units.append(RemoteUnit(name, None, n.id, p.mode == "actors", p.num_replicas, p.num_cpus, p.num_gpus))
        elif n.step not in seen:
            seen.add(n.step)
            ids = ", ".join(f"%{c.id}" for c in graph.callers(n.step) if graph.unit_of(c.id) is c)
            name = f"step {graph.step(n.step).name!r} ({ids})"
            units.append(RemoteUnit(name, n.step, None, p.mode == "actors", p.num_replicas, p.num_cpus, p.num_gpus))
    return units


@dataclass
class _Bin:
    """A node's room left while packing."""

    node: ClusterNode
    cpu: float
    gpu: float

    def fits(self, need: Resources) -> bool:
        # A small tolerance: fractional shares (0.1 + 0.2) must not miss by rounding.
        return self.cpu + 1e-9 >= need.cpu and self.gpu + 1e-9 >= need.gpu


class _Short(Exception):
    """A unit that does not fit: the message up to the advice."""

    def __init__(self, message: str, unit: RemoteUnit) -> None:
        super().__init__(message)
        self.unit = unit


def pack(units: list[RemoteUnit], cluster: Cluster, use: Use) -> list[str]:
    """Place every actor replica, then check one task of every TASKS unit,
    on `cluster`'s nodes (their `use` resources). Returns one record line
    per unit; raises PlacementError naming the first unit that does not
    fit, what it needs, what the cluster has and what to do."""
    try:
        return _pack(units, cluster, use)
    except _Short as short:
        # Short of what is free, but not of what the nodes have: other
        # work holds the rest (deploy() re-reads the cluster briefly then).
        busy = use == "available" and cluster.available_known and _fits(units, cluster)
        raise PlacementError(f"{short}: {_advice(busy)}", step_name=short.unit.name, busy=busy) from None


def _fits(units: list[RemoteUnit], cluster: Cluster) -> bool:
    try:
        _pack(units, cluster, "total")
    except _Short:
        return False
    return True


def _pack(units: list[RemoteUnit], cluster: Cluster, use: Use) -> list[str]:
    bins = [_Bin(n, *_room(n, use)) for n in cluster.nodes]
    # Work without GPUs tries nodes without GPUs first, as Ray's scheduler
    # keeps GPU nodes for GPU work (sorted once: stable, so first fit within each kind).
    cpu_first = sorted(bins, key=lambda b: b.node.total.gpu > 0)
    actors = [u for u in units if u.actors]
    order = sorted(actors, key=lambda u: (u.hold.gpu, u.hold.cpu, u.start.cpu), reverse=True)
    placed: dict[int, list[str]] = {}
    for u in order:
        where = placed[id(u)] = []
        for _ in range(u.replicas):
            nodes = bins if u.start.gpu > 0 else cpu_first
            b = _first_fit(nodes, u.start)
            if b is None:
                raise _no_room(u, len(where), nodes, actors, cluster, use)
            b.cpu -= u.hold.cpu
            b.gpu -= u.hold.gpu
            where.append(b.node.name)
    lines = [f"cluster: {cluster.text()}; {_use_text(use, cluster)}"]
    for u in units:
        if u.actors:
            lines.append(f"{u.name}: {_count(u.replicas, 'replica')} x {u.need_text()} -> {_spread(placed[id(u)])}")
            continue
        room = [b for b in bins if b.fits(u.start)]
        if not room:
            raise _no_task_room(u, bins, cluster, use, bool(actors))
        beside = " beside the replicas" if actors else ""
        lines.append(f"{u.name}: tasks of {u.need_text()} fit on {_count(len(room), 'node')}{beside}")
    return lines


def _room(node: ClusterNode, use: Use) -> tuple[float, float]:
    res = node.available if use == "available" else node.total
    return res.cpu, res.gpu


def _first_fit(bins: list[_Bin], need: Resources) -> _Bin | None:
    return next((b for b in bins if b.fits(need)), None)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _spread(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{k}" if k > 1 else name for name, k in counts.items())


def _use_text(use: Use, cluster: Cluster) -> str:
    if use == "total":
        return "checked against the nodes' totals (deploy(check_resources='total'))"
    if not cluster.available_known:
        return "checked against the nodes' totals (Ray did not report what is free)"
    return "checked against what is free now"


def _sum(units: list[RemoteUnit]) -> Resources:
    return Resources(cpu=sum(u.hold.cpu * u.replicas for u in units), gpu=sum(u.hold.gpu * u.replicas for u in units))


def _best(bins: list[_Bin]) -> str:
    b = max(bins, key=lambda b: (b.gpu, b.cpu), default=None)
    return "no node" if b is None else f"CPU={b.cpu:g}, GPU={b.gpu:g} on {b.node.name}"


def _advice(busy: bool) -> str:
    advice = "lower num_replicas, num_cpus or num_gpus, or add nodes to the cluster"
    if busy:
        advice += "; other work holds the rest now: stop it, or deploy(check_resources='total') to wait for it up to deploy_timeout_s"
    return advice + "; on an autoscaling cluster, deploy(check_resources='off') leaves it to the autoscaler"


def _where(cluster: Cluster, use: Use) -> str:
    return "free resources" if use == "available" and cluster.available_known else "nodes"


def _no_room(u: RemoteUnit, fit: int, bins: list[_Bin], actors: list[RemoteUnit], cluster: Cluster, use: Use) -> _Short:
    # How many of this unit's replicas fit at all, to say how many Ray would start.
    for _ in range(u.replicas - fit - 1):
        b = _first_fit(bins, u.start)
        if b is None:
            break
        b.cpu, b.gpu, fit = b.cpu - u.hold.cpu, b.gpu - u.hold.gpu, fit + 1
    return _Short(
        f"{u.name} needs {u.need_text()} per replica, {_sum([u]).text()} for its {u.replicas} replicas, "
        f"but only {fit} of them fit in the Ray cluster's {_where(cluster, use)} ({cluster.text()}; "
        f"the most left on one node: {_best(bins)}); the whole deployment's replicas hold {_sum(actors).text()}. "
        f"Ray would start {fit} and leave the rest waiting forever",
        u,
    )


def _no_task_room(u: RemoteUnit, bins: list[_Bin], cluster: Cluster, use: Use, replicas: bool) -> _Short:
    beside = " beside the actor replicas" if replicas else ""
    return _Short(
        f"{u.name}: one task needs {u.need_text()}, but no node of the Ray cluster has that much"
        f"{' free' if _where(cluster, use) == 'free resources' else ''}{beside} ({cluster.text()}; "
        f"the most left on one node: {_best(bins)}). Its calls would wait forever",
        u,
    )
