"""The ACTORS backend: each remote step (or fused group) is a pool of actors.

At deploy, every ACTORS step, or ACTORS fused group, gets a `Pool` of
`num_replicas` `Replica` actors. A replica hosts one unit (backends/
worker.py): it builds the step objects in its first call, `ready()` (class
steps run `__init__` once per replica, with their init args) and then runs
calls one at a time, in order. deploy() returns once every replica is
ready, so a constructor's exception fails deploy() as a StepError naming
the step; replicas not ready within `deploy_timeout_s` fail it as a
PipelineTimeoutError saying, per replica, whether Ray has started its
process (`where()` answered: the constructor is still running) or not
(it waits for resources), and every actor started is killed.

Generated code submits through the pool, which routes each call to the
replica with the fewest calls in flight (ties go round-robin, so a pool
spreads even strictly sequential calls over all replicas):

    v3 = r_Adder.submit(3, v2)       # an ObjectRef

In-flight counts drop when the result is ready: `ref.future()` runs a
done-callback on the thread Ray's core worker already uses for such
callbacks (Ray registers it with the core worker, no thread per call).
That future fetches the value into this process; for values passed on
to another Ray process this is an extra copy, the price of public API
(ObjectRef has no public "ready, don't fetch" callback).

Each replica learns its Ray actor id itself and returns it from `ready()`
(with its pid and node), which the pool records, also on Ray's callback
thread, as soon as the replica is up. A replica that dies is reported as
a StepError naming its step (ray_runtime.py) and replaced by a new actor
for later calls; its calls in flight fail, none is retried
(`max_task_retries=0`), since a step may have side effects. `close()` kills every actor and waits
(briefly) until the processes on this machine are gone.

Placement follows the IR: resources per replica and the `colocate` label.
Whether the replicas fit was decided before anything starts (the place
pass); a label's first replica goes where Ray puts it, and the rest of
the label's units prefer that node while it has room, and run elsewhere
when it has none (ray_runtime.Colocation).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray

from pipeline_ir.backends import calls, ray_runtime
from pipeline_ir.backends.ray_channels import Channel
from pipeline_ir.backends.ray_runtime import Colocation, resource_options, submit_expr
from pipeline_ir.backends.serialization import ensure_registered
from pipeline_ir.backends.worker import Unit, shippable
from pipeline_ir.bindings import Bindings
from pipeline_ir.errors import PipelineTimeoutError, StepError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Fused
from pipeline_ir.options import DeployOptions

# How long close() waits for killed replicas on this machine to exit.
_EXIT_WAIT_S = 5.0


class Replica:
    """One actor of a pool: hosts a unit and runs its calls.

    The unit is built by `ready()`, the first call the pool sends, not in
    the actor's constructor: `where()`, sent before it, answers as soon as
    the process is up, so a deploy that times out can tell a replica Ray
    has not started (waiting for resources) from one whose constructor is
    still running."""

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.error: StepError | None = None
        self._built = False
        self._building = threading.Lock()
        # Calls come as actor tasks and, for channel units, also from the
        # compiled graph's loop thread: one at a time all the same.
        self._one_at_a_time = threading.Lock()

    def where(self) -> tuple[int, str, str]:
        """This replica's pid, Ray node id and Ray actor id."""
        context = ray.get_runtime_context()
        actor_id = context.get_actor_id()
        assert actor_id is not None  # this runs in an actor
        return os.getpid(), context.get_node_id(), actor_id

    def _build(self) -> None:
        """Build the unit once (class steps run `__init__`)."""
        with self._building:
            if self._built:
                return
            try:
                self.unit.build()
            except StepError as e:
                # Kept and raised by ready() and call(): the replica lives on
                # to say why, rather than dying as a bare ActorDiedError.
                self.error = shippable(e)
            self._built = True

    def ready(self) -> tuple[int, str, str]:
        """Build the unit; then this replica's pid, node and actor id."""
        self._build()
        if self.error is not None:
            raise self.error
        return self.where()

    def call(self, node_id: int, *args: object, **kwargs: object) -> object:
        """Run the unit as node `node_id`."""
        if not self._built:
            self._build()  # a threaded replica may take a call before ready()
        if self.error is not None:
            raise self.error
        with self._one_at_a_time:
            return self.unit(node_id, *args, **kwargs)

    def call_packed(self, payload: tuple[int, tuple[object, ...], dict[str, object]]) -> object:
        """`call` with its arguments in one value, as a compiled graph sends them."""
        node_id, args, kwargs = payload
        return self.call(node_id, *args, **kwargs)

    def __repr__(self) -> str:
        # Ray prefixes the actor's log lines with this: kept ASCII, as Ray
        # encodes some of what it names after user code as ASCII.
        return f"Replica({ascii(self.unit.label)[1:-1]})"


_RemoteReplica: Any = ray.remote(Replica)


@dataclass
class _Slot:
    """The caller's view of one replica."""

    index: int
    handle: Any
    ready_ref: Any
    up_ref: Any = None  # where(): answered once the process is up, before the unit is built
    actor_id: str | None = None  # known once the replica is up (ready())
    pid: int | None = None
    node: str | None = None
    in_flight: int = 0
    dead: bool = False
    replaced: bool = False


class Pool:
    """The replicas of one unit, and least-loaded routing over them."""

    def __init__(self, unit: Unit, size: int, options: Mapping[str, object], channel: bool = False) -> None:
        self.unit = unit
        self.size = size
        self.uses_channel = channel
        self.channel: Channel | None = None
        self.options = dict(options)
        graph, node = unit.graph, unit.node
        # The units this pool serves: a group, or the step's top-level calls.
        served = [node] if isinstance(node, Fused) else [c for c in graph.callers(node.step) if graph.unit_of(c.id) is c]
        self.node_ids = tuple(n.id for n in served)
        self.slots: list[_Slot] = []
        self.closed = False
        self._next = 0  # where the round-robin tie-break starts
        self._lock = threading.Lock()
        self._compiling = threading.Lock()  # one channel compiled at a time
        # Ray options of each replica started from now on: where its
        # colocate label points then (set by ActorLauncher).
        self.affinity: Callable[[], dict[str, object]] = dict

    def start(self, count: int | None = None) -> None:
        """Start replicas until the pool has `count` (default: all)."""
        for _ in range((count or self.size) - len(self.slots)):
            self.slots.append(self._spawn(len(self.slots)))

    def _spawn(self, index: int) -> _Slot:
        handle = _RemoteReplica.options(**self.options, **self.affinity()).remote(self.unit)
        up = handle.where.remote()  # sent first: the actor runs them in order
        slot = _Slot(index, handle, handle.ready.remote(), up)
        # The future keeps the ref alive until Ray runs the callback.
        slot.ready_ref.future().add_done_callback(functools.partial(self._on_up, slot))
        return slot

    def _on_up(self, slot: _Slot, future: concurrent.futures.Future[tuple[int, str, str]]) -> None:
        """The replica answered ready() (usually on Ray's callback thread:
        keep it short, never call into Ray)."""
        error = future.exception()
        if error is None:
            self._record(slot, *future.result())
        elif isinstance(error, ray.exceptions.RayActorError):
            # Died before it could say who it is: no registry entry will
            # report it, so mark it for replacement here.
            self._mark_dead(slot)
        # A constructor's StepError: the replica lives and raises it on every call.

    def _record(self, slot: _Slot, pid: int, node: str, actor_id: str) -> None:
        """Note where a replica runs, and register it so that its death is
        reported under its step wherever it surfaces."""
        with self._lock:
            if self.closed or slot.replaced or slot.actor_id is not None:
                return
            slot.pid, slot.node, slot.actor_id = pid, node, actor_id
        info = ray_runtime.ReplicaInfo(self.unit.label, self.node_ids, slot.index, pid, functools.partial(self._mark_dead, slot))
        ray_runtime.register_replica(actor_id, info)

    def wait_ready(self, deadline: float | None = None) -> None:
        """Block until every replica is built; record pids and nodes. Past
        `deadline` (time.monotonic()), raise PipelineTimeoutError naming
        the replicas not ready, and what they wait for."""
        pending = {s.ready_ref: s for s in self.slots if s.pid is None}
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not done:
                raise not_ready(self, list(pending.values()))
            slot = pending.pop(done[0])
            try:
                pid, node, actor_id = ray.get(done[0])
            except ray.exceptions.RayError as e:
                error = ray_runtime.step_error(e, self.unit.graph, self.node_ids[0])
            else:
                # The callback may not have run yet: record here too (once).
                self._record(slot, pid, node, actor_id)
                continue
            raise error

    def _mark_dead(self, slot: _Slot) -> None:
        with self._lock:
            slot.dead = True

    def _replace_dead(self) -> None:
        """Start a new replica in place of each one known to be dead."""
        with self._lock:
            dead = [s for s in self.slots if s.dead and not s.replaced]
            for slot in dead:
                slot.replaced = True
        # Outside the lock: creating an actor ships the unit through Ray.
        for slot in dead:
            if slot.actor_id is not None:
                ray_runtime.forget_replica(slot.actor_id)
            ray.kill(slot.handle)  # to be sure: an actor reported dead may be a hung one
            new = self._spawn(slot.index)
            with self._lock:
                if not self.closed:
                    self.slots[slot.index] = new
                    continue
            ray.kill(new.handle)  # closed meanwhile

    def _pick(self) -> _Slot:
        """The live replica with the fewest calls in flight; ties are
        broken round-robin. Called under the lock."""
        n = len(self.slots)
        best: _Slot | None = None
        for k in range(n):
            slot = self.slots[(self._next + k) % n]
            if slot.dead:
                continue  # being replaced by another caller right now
            if best is None or slot.in_flight < best.in_flight:
                best = slot
                if slot.in_flight == 0:
                    break
        if best is None:
            best = self.slots[self._next % n]  # all being replaced: this call fails, named
        self._next = (best.index + 1) % n
        return best

    def submit(self, node_id: int, *args: object, **kwargs: object) -> Any:
        """Run the unit as node `node_id` on the least-loaded replica;
        returns the call's ObjectRef."""
        ensure_registered()  # torch may have been imported since deploy
        self._replace_dead()
        with self._lock:
            if self.closed:
                raise RuntimeError(f"the replicas of step {self.unit.label!r} were shut down")
            slot = self._pick()
            slot.in_flight += 1
        # Submitted outside the lock: Ray's callback thread takes it in
        # _done(), and submitting may wait on Ray (storing a large argument).
        try:
            ref = slot.handle.call.remote(node_id, *args, **kwargs)
        except BaseException:
            self._done(slot)  # e.g. an argument that cannot be pickled
            raise
        # The future keeps the ref alive until the callback has run, and
        # may run it at once, in this thread: never under the lock.
        ref.future().add_done_callback(lambda _future: self._done(slot))
        calls.track(ref, node_id, self.abandon)
        return ref

    def abandon(self, ref: Any, force: bool = False) -> None:
        """A call gave up on `ref` (deadline, error elsewhere, cancelled):
        drop it if still queued. Ray cannot interrupt a running actor call."""
        ray.cancel(ref)

    def submit_channel(self, node_id: int, *args: object, **kwargs: object) -> Any:
        """Run the unit as node `node_id` over the compiled graph (channel
        units: one replica); returns a CompiledDAGRef."""
        ensure_registered()
        channel = self.open_channel()
        try:
            return channel.submit(node_id, args, kwargs)
        except ray.exceptions.RayError:
            # The replica behind the channel died since the last call:
            # replace it, compile anew, and send this call there.
            self._drop_channel(channel)
            return self.open_channel().submit(node_id, args, kwargs)

    def open_channel(self) -> Channel:
        with self._lock:
            if self.closed:
                raise RuntimeError(f"the replicas of step {self.unit.label!r} were shut down")
            if self.channel is not None:
                return self.channel
        self._replace_dead()
        self.wait_ready()
        # Compiled outside self._lock, which Ray's callback thread takes
        # (_done, _record): compiling waits on Ray, and Ray on that thread.
        with self._compiling:
            with self._lock:
                if self.channel is not None:
                    return self.channel
                handle = self.slots[0].handle
            channel = Channel(handle)
            with self._lock:
                closed = self.closed
                if not closed:
                    self.channel = channel
            if closed:
                channel.close()
                raise RuntimeError(f"the replicas of step {self.unit.label!r} were shut down")
            return channel

    def _drop_channel(self, channel: Channel) -> None:
        with self._lock:
            if self.channel is channel:
                self.channel = None
            for slot in self.slots:
                slot.dead = True  # one replica: the one behind the channel
        channel.close()

    def _done(self, slot: _Slot) -> None:
        # Runs on Ray's callback thread: keep it short, never call into Ray.
        with self._lock:
            slot.in_flight -= 1

    def close(self) -> list[int]:
        """Kill every replica; return the pids of those on this node."""
        with self._lock:
            self.closed = True
            slots, self.slots = self.slots, []
            channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()
        here = ray.get_runtime_context().get_node_id()
        pids = []
        for slot in slots:
            _learn_placement(slot)
            if slot.actor_id is not None:
                ray_runtime.forget_replica(slot.actor_id)
            ray.kill(slot.handle)
            if slot.pid is not None and slot.node == here:
                pids.append(slot.pid)
        return pids


def _learn_placement(slot: _Slot) -> None:
    """Fill in the pid and node of a replica not known to be ready (a
    replacement, or one a deploy gave up on) if its process is up by now,
    without waiting for it."""
    if slot.pid is not None or slot.up_ref is None:
        return
    up, _ = ray.wait([slot.up_ref], timeout=0)
    if up:
        try:
            slot.pid, slot.node, _actor = ray.get(up[0])
        except ray.exceptions.RayError:
            pass  # it failed to start: no process to wait for


def not_ready(pool: Pool, slots: list[_Slot]) -> PipelineTimeoutError:
    """The error of a deploy whose `slots` of `pool` were not ready in
    time: for each, whether Ray has started its process (its constructor
    is running) or not (waiting for resources)."""
    building: list[str] = []
    waiting: list[str] = []
    for slot in slots:
        up = [] if slot.up_ref is None else ray.wait([slot.up_ref], timeout=0)[0]
        if up:
            try:
                pid, node, _actor = ray.get(up[0])
            except ray.exceptions.RayError:
                waiting.append(str(slot.index))
                continue
            building.append(f"{slot.index} (pid {pid} on node {node[:8]})")
        else:
            waiting.append(str(slot.index))
    label = pool.unit.label
    parts = []
    if building:
        parts.append(f"{_replicas(building)} still running its constructor")
    if waiting:
        needs = ", ".join(f"{k}={v:g}" for k, v in pool.options.items() if k in ("num_cpus", "num_gpus"))
        parts.append(
            f"{_replicas(waiting)} not started by Ray: it waits for resources ({needs or 'CPU=1 to start'} per replica) "
            "no node has free, or for its worker process"
        )
    return PipelineTimeoutError(
        f"deploy(): step {label!r} was not ready within deploy_timeout_s: " + "; ".join(parts)
        + ". Every actor the deploy started was stopped. Make the constructor return sooner, free or add "
        "resources, or deploy(deploy_timeout_s=...) to wait longer",
        step_name=label,
        node_id=pool.node_ids[0],
    )


def _replicas(which: list[str]) -> str:
    return f"replica{'' if len(which) == 1 else 's'} {', '.join(which)}"


def _wait_exit(pids: list[int]) -> None:
    deadline = time.monotonic() + _EXIT_WAIT_S
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.005)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by
    its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False
    except (PermissionError, OSError):
        return True


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
        self, graph: Graph, bindings: Bindings, colocation: Colocation | None = None, options: DeployOptions | None = None
    ) -> None:
        self.graph = graph
        self.colocation = Colocation() if colocation is None else colocation
        self.options = DeployOptions() if options is None else options
        self.pools: dict[str | int, Pool] = {}
        try:
            self._start(bindings)
        except BaseException:
            self.close()
            raise

    def _start(self, bindings: Bindings) -> None:
        """Start every pool, then wait (until `deploy_timeout_s` is spent)
        for every replica to be built. Whether they fit was decided before
        (the place pass); here they are only started."""
        deadline = time.monotonic() + self.options.deploy_timeout_s
        ray_runtime.ship_code(b.target for b in bindings.steps.values())
        for key, unit, size, options, label, channel in self._units(bindings):
            pool = self.pools[key] = Pool(unit, size, {"max_restarts": 0, "max_task_retries": 0, **options}, channel)
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
        channel = self.graph.unit_placement(node).channel
        # A CompiledDAGRef cannot be awaited: async calls take actor tasks.
        return submit_expr(node, callee, args, "submit_channel" if channel and not is_async else "submit")

    def close(self) -> None:
        """Kill every replica of every pool; idempotent."""
        pools, self.pools = list(self.pools.values()), {}
        if not ray.is_initialized():
            return  # Ray already shut down (interpreter exit): the actors went with it
        pids: list[int] = []
        for pool in pools:
            pids.extend(pool.close())
        _wait_exit(pids)
