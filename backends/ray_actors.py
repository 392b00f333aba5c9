"""The ACTORS backend: each remote step (or fused group) is a pool of actors.

At deploy, every ACTORS step, or ACTORS fused group, gets a `Pool`
(pool.py) of `num_replicas` `Replica` actors (replica.py). A replica hosts
one unit (backends/worker.py): it builds the step objects in its first
call, `ready()` (class steps run `__init__` once per replica, with their
init args) and then runs calls one at a time. deploy() returns once every
replica is ready, so a constructor's exception fails deploy() as a
StepError naming the step; replicas not ready within `deploy_timeout_s`
fail it as a PipelineTimeoutError saying, per replica, whether Ray has
started its process (`where()` answered: the constructor is still
running) or not (it waits for resources), and every actor started is
killed. `close()` kills every actor and waits (briefly) until the
processes on this machine are gone.

Generated code calls the pools (`submit`, `asubmit` in async programs);
how a call reaches a replica is pool.py's and fast_calls.py's business.

Placement follows the IR: resources per replica and the `colocate` label.
Whether the replicas fit was decided before anything starts (the place
pass); a label's first replica goes where Ray puts it, and the rest of
the label's units prefer that node while it has room, and run elsewhere
when it has none (ray_runtime.Colocation).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping

import ray

from pipeline_ir.backends import ray_runtime
from pipeline_ir.backends.health import HealthMonitor
from pipeline_ir.backends.pool import Pool
from pipeline_ir.backends.processes import alive
from pipeline_ir.backends.replica_wait import not_ready
from pipeline_ir.backends.ray_runtime import Colocation, resource_options, submit_expr
from pipeline_ir.backends.stats import PipelineStats
from pipeline_ir.backends.worker import Unit, unit_keys
from pipeline_ir.bindings import Bindings
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Fused
from pipeline_ir.options import DeployOptions

# How long close() waits for killed replicas on this machine to exit.
_EXIT_WAIT_S = 5.0


def _wait_exit(pids: list[int]) -> None:
    deadline = time.monotonic() + _EXIT_WAIT_S
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.005)


def _wait_up(pool: Pool, deadline: float) -> None:
    """Wait until the pool's first replica has a process (not until it is
    built: constructors of every pool run at once), and note its node."""
    slot = pool.slots[0]
    up, _ = ray.wait([slot.up_ref], timeout=max(0.0, deadline - time.monotonic()))
    if not up:
        raise not_ready(pool, [slot])
    try:
        _pid, slot.node, _actor = ray.get(up[0])
    except ray.exceptions.RayError as e:
        error = ray_runtime.step_error(e, pool.unit.graph, pool.node_ids[0])
        raise error from None


def _live_node(pool: Pool) -> str | None:
    """The node of a live replica of `pool` (None while none is known):
    where a colocate label anchored on the pool points now."""
    for slot in list(pool.slots):
        if not slot.dead and slot.node is not None:
            return slot.node
    return None


class ActorLauncher:
    """Starts the replica pools of a graph and spells calls into them."""

    remote = True

    def __init__(
        self,
        graph: Graph,
        bindings: Bindings,
        colocation: Colocation | None = None,
        stats: PipelineStats | None = None,
        policy: DeployOptions | None = None,
        runtime: Mapping[str, object] | None = None,
    ) -> None:
        self.graph = graph
        # The fetch helpers (ray_runtime.runtime_globals) the generated code uses.
        self.runtime = runtime if runtime is not None else ray_runtime.runtime_globals(graph)
        self.colocation = Colocation() if colocation is None else colocation
        self.stats = stats
        self.policy = policy if policy is not None else DeployOptions()
        self.pools: dict[str | int, Pool] = {}
        self.monitor: HealthMonitor | None = None
        try:
            self._start(bindings)
        except BaseException:
            self.close()
            raise
        self.monitor = HealthMonitor(lambda: list(self.pools.values()), self.policy)
        if stats is not None:
            for pool in self.pools.values():
                if graph.unit_placement(pool.unit.node).batching is not None:
                    stats.batch_sources.append(pool.batch_stats)

    def _start(self, bindings: Bindings) -> None:
        """Start every pool, then wait (until `deploy_timeout_s` is spent)
        for every replica to be built. Whether they fit was decided before
        (the place pass); here they are only started."""
        deadline = time.monotonic() + self.policy.deploy_timeout_s
        ray_runtime.ship_code(b.target for b in bindings.steps.values())
        for key, unit, size, options, label, channel in self._units(bindings):
            base = {"max_restarts": 0, "max_task_retries": 0, **options}
            pool = self.pools[key] = Pool(unit, size, base, channel, self.stats, self.policy)
            pool.fetch = self.runtime["_get"]  # type: ignore[assignment]
            pool.afetch = self.runtime["_aget"]  # type: ignore[assignment]
            if label is not None:
                if label not in self.colocation:
                    # The label's first replica goes where Ray puts it; the
                    # label then follows this pool's live replicas.
                    pool.start(1)
                    _wait_up(pool, deadline)
                    self.colocation.follow(label, functools.partial(_live_node, pool))
                pool.affinity = functools.partial(self.colocation.options, label)
            pool.start()
        for pool in self.pools.values():
            pool.wait_ready(deadline)
            if pool.uses_channel:
                pool.open_channel()

    def _units(self, bindings: Bindings) -> list[tuple[str | int, Unit, int, dict[str, object], str | None, bool]]:
        """(pool key, unit, replicas, resource options, colocate label,
        channel) for each ACTORS step (one pool however many nodes call it)
        and group."""
        units: dict[str | int, tuple[str | int, Unit, int, dict[str, object], str | None, bool]] = {}
        for node in self.graph.units():
            p = self.graph.unit_placement(node)
            key: str | int = node.step if isinstance(node, Call) else node.id
            if p.mode == "actors" and key not in units:
                units[key] = (key, Unit.of(self.graph, node, bindings), p.num_replicas, resource_options(p), p.colocate, p.channel)
        return list(units.values())

    def callee(self, node: Call | Fused) -> Pool:
        return self.pools[node.step if isinstance(node, Call) else node.id]

    def expr(self, node: Call | Fused, callee: str, args: str, is_async: bool = False) -> str:
        if is_async:
            # A CompiledDAGRef cannot be awaited: async calls take actor tasks.
            return "await " + submit_expr(node, callee, args, "asubmit")
        channel = self.graph.unit_placement(node).channel
        return submit_expr(node, callee, args, "submit_channel" if channel else "submit")

    def update(self, key: str, bindings: Bindings) -> None:
        """Replace the replicas of the pool running class step `key` with
        replicas built from `bindings` (new init args), without dropping a
        call: the new replicas are up before any call goes to them, and the
        old ones finish the calls they have before they end."""
        pools = [p for p in self.pools.values() if key in unit_keys(p.unit.node)]
        for pool in pools:
            pool.swap(Unit.of(self.graph, pool.unit.node, bindings), self.policy.deploy_timeout_s)

    def close(self) -> None:
        """Kill every replica of every pool; idempotent."""
        if self.monitor is not None:
            self.monitor.close()
        pools, self.pools = list(self.pools.values()), {}
        if not ray.is_initialized():
            return  # Ray already shut down (interpreter exit): the actors went with it
        pids: list[int] = []
        for pool in pools:
            pids.extend(pool.close())
        _wait_exit(pids)
