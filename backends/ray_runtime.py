"""The Ray side of a deployed pipeline, in the caller's process.

- `ensure_ray()`: join the running Ray, or start one the way `ray.init()`
  does by default (RAY_ADDRESS, else a local cluster already running on
  this machine, else a new embedded one). Only lower.py calls it, and only
  for graphs with a remote node, so LOCAL pipelines never start Ray.
- `runtime_globals(graph)`: the fetch helpers generated code calls
  (`_get`, `_aget`, `_get_many`, `_aget_many`). They turn every Ray error
  into the StepError a user sees; no RayTaskError ever reaches the caller.
- `ship_code(...)`: steps from modules Ray's workers cannot import travel
  by value, as `__main__` code does with plain `ray.remote`.
- `cluster_snapshot()`: the cluster's nodes and resources, as plain data
  for the place pass (which decides; nothing here does).
- What both launchers (ray_tasks.py, ray_actors.py) spell the same way:
  `submit_expr`, `resource_options`, and `Colocation` (which node a
  `colocate` label prefers now) with `prefer_node`.
- A registry of live replicas by actor id, so that an actor's death,
  wherever it surfaces (its own result, or the result of a node that read
  it), is reported under the right step and the replica is replaced.

This module routes nothing and places nothing (ray_actors.py, ray_tasks.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import msgspec
import ray
import ray.exceptions
from ray.experimental.compiled_dag_ref import CompiledDAGRef

from pipeline_ir.backends import calls
from pipeline_ir.backends.calls import PendingRef
from pipeline_ir.backends.serialization import ensure_registered
from pipeline_ir.errors import StepError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Fused, Placement
from pipeline_ir.ir.printer import node_label

if TYPE_CHECKING:
    from pipeline_ir.passes.place_cluster import Cluster, Resources

_init_lock = threading.Lock()


def ensure_ray() -> None:
    """Connect this process to Ray, starting a local instance if needed,
    and register the zero-copy tensor serializer here."""
    with _init_lock:
        if not ray.is_initialized():
            # ray.init() honours RAY_ADDRESS and joins a cluster started with
            # `ray start` on this machine before starting its own.
            ray.init()
    ensure_registered()


def cluster_snapshot() -> Cluster:
    """The alive nodes of the Ray cluster and their resources, in total
    and available now: the plain data the place pass decides with.

    Public APIs only: totals per node from `ray.nodes()`, and what is free
    from `ray.available_resources()`, which sums the whole cluster (Ray
    has no public per-node view of free resources; `ray.util.state`
    reports totals and needs the dashboard). On a one-node cluster (a
    local Ray, the common case) that sum is the node's own; on several
    nodes the snapshot says free is not known per node
    (`available_known=False`), the pass fits replicas against totals, and
    a deployment that fits in total but not in what is free now is caught
    by `deploy_timeout_s` (docs/operations.md, "Placement and autoscaling").
    """
    from pipeline_ir.passes.place_cluster import Cluster, ClusterNode

    ensure_ray()
    list_nodes: Any = ray.nodes
    alive = [n for n in list_nodes() if n.get("Alive")]
    free: dict[str, float] | None = None
    if len(alive) == 1:
        available: Any = ray.available_resources
        free = dict(available())
    nodes = []
    for n in alive:
        node_id = str(n["NodeID"])
        total = _resources(n.get("Resources", {}))
        now = total if free is None else _resources(free)
        nodes.append(ClusterNode(id=node_id, total=total, available=now, address=str(n.get("NodeManagerAddress", ""))))
    # Distinct names in records: several nodes of one machine share an address.
    named = [n.address for n in nodes]
    if len(set(named)) < len(named):
        nodes = [msgspec.structs.replace(n, address=f"{n.address}/{n.id[:8]}") for n in nodes]
    return Cluster(nodes=tuple(nodes), available_known=free is not None)


def _resources(raw: dict[str, float]) -> Resources:
    from pipeline_ir.passes.place_cluster import Resources

    # "node:<ip>" and "node:__internal_head__" mark nodes; they are not capacity.
    custom = tuple(sorted((k, float(v)) for k, v in raw.items() if k not in _BUILTIN and not k.startswith("node:")))
    return Resources(cpu=float(raw.get("CPU", 0.0)), gpu=float(raw.get("GPU", 0.0)), memory=float(raw.get("memory", 0.0)), custom=custom)


_BUILTIN = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def ship_code(targets: Iterable[object]) -> None:
    """Make the modules defining these step callables travel by value when
    Ray's workers could not import them.

    Plain `ray.remote` ships `__main__` code by value and everything else
    by reference, and workers import by reference from the environment's
    packages plus the driver's working and script directories. A step
    from any other directory (a test module pytest put on sys.path, a
    project file imported through a sys.path tweak) would then fail to
    import in the worker; such modules are registered with Ray's
    cloudpickle to be pickled by value, as `__main__` is.
    """
    import ray.cloudpickle

    by_value: Any = ray.cloudpickle.register_pickle_by_value
    for target in targets:
        module = sys.modules.get(getattr(target, "__module__", "") or "")
        if module is not None and not _importable_by_workers(module):
            by_value(module)


def _importable_by_workers(module: ModuleType) -> bool:
    name, file = module.__name__, getattr(module, "__file__", None)
    if name == "__main__" or file is None:
        return True  # __main__ already travels by value; builtins are everywhere
    path = os.path.realpath(file)
    installed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    # Ray puts the driver's working and script directories on workers' paths.
    driver = {os.path.realpath(os.getcwd()), os.path.realpath(os.path.dirname(sys.argv[0] or "."))}
    depth = name.count(".") + (1 if os.path.basename(path).startswith("__init__.") else 0)
    root = os.path.dirname(path)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root in driver or any(path.startswith(p + os.sep) for p in installed)


def submit_expr(node: Call | Fused, callee: str, args: str, method: str = "submit") -> str:
    """`callee.submit(node_id, args...)`: how both Ray launchers spell a call."""
    return f"{callee}.{method}({node.id}{', ' + args if args else ''})"


def resource_options(placement: Placement) -> dict[str, object]:
    """Ray options for the resources a placement declares (None: Ray's default)."""
    options: dict[str, object] = {}
    if placement.num_cpus is not None:
        options["num_cpus"] = placement.num_cpus
    if placement.num_gpus is not None:
        options["num_gpus"] = placement.num_gpus
    return options


def prefer_node(node: str | None) -> dict[str, object]:
    """Ray options that run work on `node` when it has room now, and
    anywhere else when it has not (busy, lost, or None: no preference).

    A label selector on the node's `ray.io/node-id` label with a fallback
    to any node (`fallback_strategy`, public, experimental in Ray 2.60).
    Not `NodeAffinitySchedulingStrategy(soft=True)`: that moves work only
    when the node is dead or infeasible, and waits forever when it is
    merely busy (docs/backends.md, Colocation).
    """
    if node is None:
        return {}
    return {"label_selector": {"ray.io/node-id": node}, "fallback_strategy": [{"label_selector": {}}]}


class Colocation:
    """colocate label -> the Ray node the label's units prefer, now.

    A label that actors carry follows the first of them started (its pool
    is the label's *anchor*): the node of a live replica of that pool,
    asked again each time, so that once the node is lost and the replica
    replaced, the label follows the new replica, and while none is up it
    prefers no node. A label only tasks carry takes the caller's node.
    """

    def __init__(self) -> None:
        self._where: dict[str, Callable[[], str | None]] = {}

    def __contains__(self, label: str) -> bool:
        return label in self._where

    def follow(self, label: str, where: Callable[[], str | None]) -> None:
        """Let `label` follow `where()`, unless it already follows something."""
        self._where.setdefault(label, where)

    def node(self, label: str) -> str | None:
        """The node `label`'s units prefer now (None: none)."""
        where = self._where.get(label)
        if where is None:
            here = ray.get_runtime_context().get_node_id()
            where = self._where[label] = lambda: here
        return where()

    def options(self, label: str | None) -> dict[str, object]:
        """Ray options preferring `label`'s node now ({} for no label)."""
        return {} if label is None else prefer_node(self.node(label))


def shortfall(options: dict[str, object]) -> tuple[str, str] | None:
    """None when some alive node's total resources fit one unit with
    these resource options (it may be busy now); else (what one needs, what
    the largest alive node has), e.g. ("CPU=1, GPU=1", "CPU=2, GPU=0")."""
    needs = {"CPU": float(options.get("num_cpus", 1.0)), "GPU": float(options.get("num_gpus", 0.0))}  # type: ignore[arg-type]
    list_nodes: Any = ray.nodes
    nodes: list[dict[str, float]] = [n.get("Resources", {}) for n in list_nodes() if n.get("Alive")]
    if any(all(res.get(k, 0.0) >= v for k, v in needs.items() if v > 0) for res in nodes):
        return None
    largest: dict[str, float] = max(nodes, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    have = ", ".join(f"{k}={largest.get(k, 0.0):g}" for k in needs)
    return ", ".join(f"{k}={v:g}" for k, v in needs.items()), have


@dataclass(frozen=True)
class ReplicaInfo:
    """What the caller knows of one live actor replica."""

    label: str  # the unit's name in errors
    node_ids: tuple[int, ...]  # the graph nodes the unit serves
    index: int  # replica number within its pool
    pid: int | None
    on_death: Callable[[], None]  # tells the pool to replace the replica
    why: Callable[[], str | None] = lambda: None  # why the pool ended it, if it did


_replicas: dict[str, ReplicaInfo] = {}


def register_replica(actor_id: str, info: ReplicaInfo) -> None:
    """Record a live replica (pool.py does, once it is up)."""
    _replicas[actor_id] = info


def forget_replica(actor_id: str) -> None:
    """Drop a replica from the registry (it was killed or replaced)."""
    _replicas.pop(actor_id, None)


def step_error(exc: BaseException, graph: Graph, node_id: int) -> BaseException:
    """The error a user sees for `exc`, raised while fetching node `node_id`.

    A step's own exception arrives as the StepError the worker built. An
    actor's death is named after the replica's step, found by actor id
    (the node being fetched may only have read the dead replica's value).
    Any other Ray failure (a task's worker crashed, an object was lost) is
    reported against the node being fetched.
    """
    if not isinstance(exc, ray.exceptions.RayError):
        return exc
    cause: BaseException = exc
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if exc.cause is not None else exc
        if isinstance(cause, StepError):
            return cause
    if isinstance(cause, ray.exceptions.RayActorError):
        info = _replicas.get(cause.actor_id or "")
        if info is not None:
            info.on_death()
            nid = node_id if node_id in info.node_ids else info.node_ids[0]
            pid = f", pid {info.pid}" if info.pid is not None else ""
            why = info.why()
            what = f"was ended: {why}" if why else f"died while running this call ({_first_line(cause)})"
            return StepError(
                info.label,
                nid,
                cause,
                message=(
                    f"step {info.label!r} (node %{nid}): replica {info.index}{pid} {what}; "
                    "a new replica takes its place for later calls"
                ),
            )
    label = node_label(graph, node_id)
    what = f"{type(cause).__name__}: {_first_line(cause)}"
    if cause is not exc:
        # Ray wrapped a system error into this node's result: it did not
        # run because an input of it was lost (e.g. an upstream task's
        # worker crashed). Ray does not say which input.
        message = f"step {label!r} (node %{node_id}) could not run: an input it depends on failed in Ray ({what})"
    else:
        message = f"step {label!r} (node %{node_id}) failed in Ray: {what}"
    return StepError(label, node_id, cause, message=message)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def runtime_globals(graph: Graph) -> dict[str, object]:
    """The helpers generated code uses to fetch remote values. Each waits
    no longer than the running call's deadline (calls.py)."""

    def label(node_id: int) -> str:
        return node_label(graph, node_id)

    def _expired(node_id: int) -> BaseException:
        state = calls.current()
        assert state is not None
        return calls.timeout_error(state, label, node_id)

    def _recover(state: calls.CallState | None, ref: Any, exc: BaseException, node_id: int) -> tuple[Any, BaseException | None]:
        """After a failed wait for `ref`: (the ref of the call sent again,
        None) when its idempotent step's replica died, else (None, the
        error to raise: the deadline's, or the StepError)."""
        # A wait is bounded only by the call's deadline (without one, none:
        # `_get` waits on channels for good), so a TimeoutError is the
        # deadline's only if there is one. Without, it is Ray's own (a
        # compiled graph channel's RayChannelTimeoutError is a
        # TimeoutError): the step's failure.
        if isinstance(exc, TimeoutError) and state is not None and state.deadline is not None:
            return None, _expired(node_id)
        again = _retry(state, ref, exc, graph, node_id)
        if again is not None:
            return again, None
        return None, step_error(exc, graph, node_id)

    def _get(ref: Any, node_id: int) -> object:
        state = calls.current()
        while True:
            if isinstance(ref, PendingRef):
                return ref.get()  # the fast path (a call, or its retry): it reads and translates itself (fast_calls.py)
            timeout = None if state is None else state.remaining()
            if timeout is None and isinstance(ref, CompiledDAGRef):
                timeout = -1  # no deadline: wait for good, not Ray's RAY_CGRAPH_get_timeout (10 s)
            try:
                return ray.get(ref, timeout=timeout)
            except ray.exceptions.RayError as e:
                ref, error = _recover(state, ref, e, node_id)
            # Raised outside the except block: the Ray error stays out of the chain.
            if error is not None:
                raise error

    def _get_many(refs: Sequence[Any], ids: Sequence[int]) -> list[object]:
        # A CompiledDAGRef (channel units) can be fetched only once, and not
        # in one ray.get with ObjectRefs: those go one by one from the start.
        if not any(isinstance(r, (CompiledDAGRef, PendingRef)) for r in refs):
            state = calls.current()
            timeout = None if state is None else state.remaining()
            try:
                return list(ray.get(list(refs), timeout=timeout))
            except ray.exceptions.GetTimeoutError:
                error = _expired(ids[0])
            except ray.exceptions.RayError:
                error = None  # fetch one by one, in order, to name the first node that failed
            if error is not None:
                raise error
        return [_get(ref, node_id) for ref, node_id in zip(refs, ids)]

    async def _arecover(state: calls.CallState | None, ref: Any, exc: BaseException, node_id: int) -> tuple[Any, BaseException | None]:
        """`_recover` for asyncio: a call sent again is sent without
        blocking the loop."""
        if state is not None and _retry(state, ref, exc, graph, node_id, probe_only=True) is not None:
            step_error(exc, graph, node_id)  # tells the dead replica's pool to replace it
            again = await state.aretry(ref)
            if again is not None:
                return again, None
        return _recover(state, ref, exc, node_id)

    async def _aget(ref: Any, node_id: int) -> object:
        state = calls.current()
        while True:
            if isinstance(ref, PendingRef):
                return await ref.aget()
            timeout = None if state is None else state.remaining()
            try:
                if timeout is None:
                    return await ref
                return await asyncio.wait_for(_awaitable(ref), timeout)
            except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
                error: BaseException | None
                ref, error = await _arecover(state, ref, e, node_id)
            if error is not None:
                raise error

    async def _aget_many(refs: Sequence[Any], ids: Sequence[int]) -> list[object]:
        if any(isinstance(r, PendingRef) for r in refs):
            # Every call is on its way already: read the answers in order.
            return [await _aget(ref, node_id) for ref, node_id in zip(refs, ids)]
        state = calls.current()
        timeout = None if state is None else state.remaining()
        gathered = asyncio.gather(*(_awaitable(r) for r in refs), return_exceptions=True)
        try:
            results = await (gathered if timeout is None else asyncio.wait_for(gathered, timeout))
        except asyncio.TimeoutError:
            error = _expired(ids[0])
            raise error from None
        values = list(results)
        for i, (result, node_id) in enumerate(zip(results, ids)):
            if isinstance(result, BaseException):
                if _retry(state, refs[i], result, graph, node_id, probe_only=True) is not None:
                    values[i] = await _aget(refs[i], node_id)  # fails again at once, then retries
                    continue
                raise step_error(result, graph, node_id)
        return values

    return {"_get": _get, "_aget": _aget, "_get_many": _get_many, "_aget_many": _aget_many}


def _retry(
    state: calls.CallState | None, ref: Any, exc: BaseException, graph: Graph, node_id: int, probe_only: bool = False
) -> Any | None:
    """The ref of the same call sent again, when `exc` says the replica
    running it died and the step is idempotent (its pool registered a
    retry for `ref`); None otherwise. `probe_only`: only say whether one
    would be made, making none."""
    if state is None:
        return None
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
    if not isinstance(cause, ray.exceptions.RayActorError):
        return None
    if probe_only:
        return ref if id(ref) in state.retries else None
    step_error(exc, graph, node_id)  # tells the dead replica's pool to replace it
    return state.retry(ref)


async def _awaitable(ref: Any) -> object:
    """An ObjectRef as a coroutine, which asyncio.wait_for/gather accept."""
    return await ref
