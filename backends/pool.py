"""`Pool`: the replicas of one ACTORS unit, and how a call reaches one.

A pool holds `num_replicas` `Replica` actors (replica.py) and routes each
call to the replica with the fewest calls in flight (ties go round-robin,
so a pool spreads even strictly sequential calls over all replicas):

    v3 = r_Adder.submit(3, v2)       # a FastRef, or an ObjectRef

Two ways to a replica: over the same-node fast path (fast_calls.py) when
the replica runs on this node, and as a Ray actor task otherwise (another
node, an input that is a Ray ref, `deploy(fast_path=False)`). For a Ray
call, in-flight counts drop when the result is ready: `ref.future()` runs
a done-callback on the thread Ray's core worker already uses for such
callbacks (no thread per call). That future fetches the value into this
process; for values passed on to another Ray process this is an extra
copy, the price of public API (ObjectRef has no public "ready, don't
fetch" callback).

Each replica learns its Ray actor id itself and returns it from `ready()`
(with its pid, node and fast-path address), which the pool records, also
on Ray's callback thread, as soon as the replica is up. A replica that
dies is reported as a StepError naming its step (ray_runtime.py, and
fast_calls.py on the fast path) and replaced by a new actor for later
calls; its calls in flight fail, or run again on another replica for an
`idempotent=True` step (Ray's own `max_task_retries` stays 0: a step may
have side effects). Calls given up on (a deadline) drain: their replica
takes no new call until they end, and is replaced if still busy after
`abandon_grace_s` (health.py reaps). `update()` swaps in new replicas
(`swap`); `close()` kills every replica.

The pool decides nothing about placement: resources per replica and the
colocate label's node come from the launcher (ray_actors.py).
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

from pipeline_ir.backends import calls, cuda_ipc, fast_calls, fast_transport, ray_runtime
from pipeline_ir.backends.fast_calls import FastRef, has_pending
from pipeline_ir.backends.fast_client import FastClient, Pending
from pipeline_ir.backends.fast_transport import CallTimeout, PeerGone, Unreachable
from pipeline_ir.backends.ray_channels import Channel
from pipeline_ir.backends.replica import RemoteReplica, call_concurrency
from pipeline_ir.backends.serialization import ensure_registered
from pipeline_ir.backends.stats import PipelineStats
from pipeline_ir.backends.stats import unit_key as stats_unit_key
from pipeline_ir.backends.worker import Unit
from pipeline_ir.backends.replica_wait import learn_placement, not_ready
from pipeline_ir.errors import PipelineTimeoutError, StepError
from pipeline_ir.ir.nodes import Fused
from pipeline_ir.ir.printer import node_label
from pipeline_ir.options import DeployOptions


@dataclass
class Slot:
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
    why: str | None = None  # why the pool ended it (health check, abandoned call)
    draining: int = 0  # abandoned calls it still runs: it takes no new calls
    fast: FastClient | None = None  # its fast-path server, when on this node (fast_calls.py)
    socket: str | None = None  # that server's socket, removed when the replica is killed


class Pool:
    """The replicas of one unit, and least-loaded routing over them."""

    def __init__(
        self,
        unit: Unit,
        size: int,
        options: Mapping[str, object],
        channel: bool = False,
        stats: PipelineStats | None = None,
        policy: DeployOptions | None = None,
    ) -> None:
        self.unit = unit
        self.size = size
        self.stats = stats
        self.policy = policy if policy is not None else DeployOptions()
        self.idempotent = unit.graph.unit_placement(unit.node).idempotent
        # Calls given up on while running here: (ref, slot, when the grace ends).
        self.abandoned: list[tuple[Any, Slot, float]] = []
        # Replicas an update() replaced, finishing the calls they had.
        self.retired: list[Slot] = []
        self._ended: list[str] = []  # actor ids of replicas replaced since deploy
        # Why no replica can start now (no alive node could host one), while
        # a dead one waits for a node; the health monitor retries (place()).
        self.unplaced: str | None = None
        self.uses_channel = channel
        self.channel: Channel | None = None
        # Channel units take the compiled graph's channel instead.
        self.fast_path = self.policy.fast_path and not channel and fast_transport.supported()
        self._here = fast_transport.this_node() if self.fast_path else ""
        # CUDA IPC (cuda_ipc.py) to and from replicas that Ray gives GPUs:
        # this process's GPUs, which such a replica may export results to.
        gpu_unit = float(options.get("num_gpus") or 0) > 0  # type: ignore[arg-type]
        self._gpus = cuda_ipc.visible_gpus() if self.fast_path and self.policy.cuda_ipc and gpu_unit else ()
        # How FastRefs handed back by a retry are read (ray_runtime's _get/_aget).
        self.fetch: Callable[[Any, int], object] = _no_fetch
        self.afetch: Callable[[Any, int], Any] = _no_fetch
        self.options = dict(options)
        graph, node = unit.graph, unit.node
        # The units this pool serves: a group, or the step's top-level calls.
        served = [node] if isinstance(node, Fused) else [c for c in graph.callers(node.step) if graph.unit_of(c.id) is c]
        self.node_ids = tuple(n.id for n in served)
        self.slots: list[Slot] = []
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

    def _spawn(self, index: int, unit: Unit | None = None) -> Slot:
        unit = unit if unit is not None else self.unit
        # Out of order: a call whose input is not ready yet must not hold
        # back the calls (and health checks) sent after it (Ray otherwise
        # runs a one-thread actor's tasks in submission order).
        options = {
            **self.options,
            **self.affinity(),
            "max_concurrency": call_concurrency(unit),
            "allow_out_of_order_execution": True,
        }
        caller = (os.getpid(), self._here, self._gpus) if self.fast_path else None
        handle = RemoteReplica.options(**options).remote(unit, caller)
        up = handle.where.remote()  # on the control thread: answers before the unit is built
        slot = Slot(index, handle, handle.ready.remote(), up)
        # The future keeps the ref alive until Ray runs the callback.
        slot.ready_ref.future().add_done_callback(functools.partial(self._on_up, slot))
        return slot

    def _on_up(self, slot: Slot, future: concurrent.futures.Future[tuple[int, str, str, Any]]) -> None:
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

    def _record(self, slot: Slot, pid: int, node: str, actor_id: str, address: fast_transport.Address | None = None) -> None:
        """Note where a replica runs, and register it so that its death is
        reported under its step wherever it surfaces. A replica on this
        node with a fast-path server gets its calls that way from now on."""
        fast = None
        if address is not None and self.fast_path and address.node == self._here:
            # No connection yet: the first call makes one (fast_transport).
            fast = FastClient(address, max_connections=max(fast_transport.MAX_CONNECTIONS, call_concurrency(self.unit)))
        with self._lock:
            if self.closed or slot.replaced or slot.actor_id is not None:
                return
            slot.pid, slot.node, slot.actor_id, slot.fast = pid, node, actor_id, fast
            slot.socket = None if fast is None else fast.address.path
        info = ray_runtime.ReplicaInfo(
            self.unit.label, self.node_ids, slot.index, pid, functools.partial(self._mark_dead, slot), lambda: slot.why
        )
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
                placed = ray.get(done[0])
            except ray.exceptions.RayError as e:
                error = ray_runtime.step_error(e, self.unit.graph, self.node_ids[0])
            else:
                # The callback may not have run yet: record here too (once).
                self._record(slot, *placed)
                continue
            raise error

    def _mark_dead(self, slot: Slot) -> None:
        with self._lock:
            slot.dead = True

    def _replace_dead(self) -> None:
        """Start a new replica in place of each one known to be dead, when
        some alive node could host it. Else they stay dead, `unplaced` says
        why, and the health monitor tries again (place()): Ray would keep
        such a replica pending, and the calls sent to it waiting, until a
        node that fits joins."""
        with self._lock:
            if self.unplaced is not None or not any(s.dead and not s.replaced for s in self.slots):
                return
        if self._unplaceable():  # asks Ray for its nodes: only when a replica died
            return
        with self._lock:
            dead = [s for s in self.slots if s.dead and not s.replaced]
            for slot in dead:
                slot.replaced = True
        # Outside the lock: creating an actor ships the unit through Ray.
        for slot in dead:
            # Its registry entry stays until close(): calls that read its
            # results fail later, and must still name its step.
            if slot.actor_id is not None:
                self._ended.append(slot.actor_id)
            _kill(slot)  # to be sure: an actor reported dead may be a hung one
            new = self._spawn(slot.index)
            with self._lock:
                if not self.closed:
                    self.slots[slot.index] = new
                    continue
            ray.kill(new.handle)  # closed meanwhile

    def _unplaceable(self) -> bool:
        """Whether no alive node of the cluster could ever host a replica
        (its resources exceed every node's totals); sets `unplaced`."""
        short = ray_runtime.shortfall(self.options)
        why = None
        if short is not None:
            want, have = short
            why = (
                f"no alive node of the Ray cluster can host a replica: one needs {want} "
                f"(largest alive node: {have}); calls fail until a node with {want} joins"
            )
        with self._lock:
            self.unplaced = why
        return why is not None

    def place(self) -> None:
        """Health monitor, every period: start the replicas no node could
        host before, once one can; end the replicas still starting that no
        alive node can host any more (their node was lost after they were
        sent to it), so that the calls queued on them fail now."""
        with self._lock:
            starting = [s for s in self.slots if s.actor_id is None and not s.dead]
            waiting = self.unplaced is not None
        if not starting and not waiting:
            return
        if not self._unplaceable():
            self._replace_dead()
            return
        for slot in starting:
            self.end_replica(slot, self.unplaced or "")

    def _pick(self) -> Slot | None:
        """The live replica with the fewest calls in flight; ties are
        broken round-robin. Replicas still starting take calls only when
        none is up (a call sent to one waits for its constructor, or for
        resources). None: every replica is dead and none can be started.
        Called under the lock."""
        n = len(self.slots)
        best: Slot | None = None
        for k in range(n):
            slot = self.slots[(self._next + k) % n]
            if slot.dead or slot.draining:
                continue  # being replaced, or busy with an abandoned call
            if best is None or (slot.actor_id is None, slot.in_flight) < (best.actor_id is None, best.in_flight):
                best = slot
                if slot.in_flight == 0 and slot.actor_id is not None:
                    break
        if best is None:
            if self.unplaced is not None and all(s.dead for s in self.slots):
                return None
            best = self.slots[self._next % n]  # all being replaced: this call fails, named
        self._next = (best.index + 1) % n
        return best

    def submit(self, node_id: int, *args: object, **kwargs: object) -> Any:
        """Run the unit as node `node_id` on the least-loaded replica;
        returns the call's ObjectRef, or its FastRef (fast_calls.py)."""
        ensure_registered()  # torch may have been imported since deploy
        if has_pending(args, kwargs):
            args, kwargs = fast_calls.resolve(args, kwargs)
        self._replace_dead()
        return self._submit(node_id, args, kwargs, self.policy.max_retries)

    async def asubmit(self, node_id: int, *args: object, **kwargs: object) -> Any:
        """`submit` for asyncio: waits for inputs and connections on the loop."""
        ensure_registered()
        if has_pending(args, kwargs):
            args, kwargs = await fast_calls.aresolve(args, kwargs)
        self._replace_dead()
        return await self._asubmit(node_id, args, kwargs, self.policy.max_retries)

    def _submit(self, node_id: int, args: tuple[object, ...], kwargs: dict[str, object], retries_left: int) -> Any:
        slot, state, started = self._begin(node_id)
        client = slot.fast
        if client is not None and _sendable(args, kwargs):
            try:
                pending = client.send((node_id, *args), kwargs, timeout=None if state is None else state.remaining())
            except BaseException as e:
                if self._not_sent(slot, client, node_id, started, state, e):
                    return self._submit(node_id, args, kwargs, retries_left)
            else:
                return self._fast_ref(slot, node_id, pending, started, state, args, kwargs, retries_left)
        return self._ray_call(slot, node_id, args, kwargs, started, state, retries_left)

    async def _asubmit(self, node_id: int, args: tuple[object, ...], kwargs: dict[str, object], retries_left: int) -> Any:
        slot, state, started = self._begin(node_id)
        client = slot.fast
        if client is not None and _sendable(args, kwargs):
            try:
                pending = await client.asend((node_id, *args), kwargs, timeout=None if state is None else state.remaining())
            except BaseException as e:
                if self._not_sent(slot, client, node_id, started, state, e):
                    return await self._asubmit(node_id, args, kwargs, retries_left)
            else:
                return self._fast_ref(slot, node_id, pending, started, state, args, kwargs, retries_left)
        return self._ray_call(slot, node_id, args, kwargs, started, state, retries_left)

    def _begin(self, node_id: int) -> tuple[Slot, calls.CallState | None, float]:
        """Pick the replica for a call and count the call in."""
        with self._lock:
            if self.closed:
                raise RuntimeError(f"the replicas of step {self.unit.label!r} were shut down")
            slot = self._pick()
            if slot is not None:
                slot.in_flight += 1
            unplaced = self.unplaced
        if slot is None:
            # No replica, and none can start: fail now rather than queue
            # the call on an actor Ray cannot place.
            label = self.unit.label
            raise StepError(label, node_id, message=f"step {label!r} (node %{node_id}): {unplaced}")
        started = self.stats.submitted(node_id) if self.stats is not None else 0.0
        return slot, calls.current(), started

    def _not_sent(
        self, slot: Slot, client: FastClient, node_id: int, started: float, state: calls.CallState | None, e: BaseException
    ) -> bool:
        """A fast-path send failed: False to send the call through Ray
        instead (no connection to that replica could be made), True to send
        it again from the start (the replica is gone: the call never
        reached it); else raise (the deadline passed, or the arguments
        cannot be pickled)."""
        if isinstance(e, Unreachable):
            with self._lock:
                if slot.fast is client:
                    slot.fast = None  # through Ray from now on
            client.close()
            return False
        self._done(slot, node_id, started, state, None)
        if isinstance(e, PeerGone):
            self.lost(slot)
            return True
        if isinstance(e, CallTimeout) and state is not None:
            raise calls.timeout_error(state, self.label_of, node_id) from None
        raise e

    def _fast_ref(
        self,
        slot: Slot,
        node_id: int,
        pending: Pending,
        started: float,
        state: calls.CallState | None,
        args: tuple[object, ...],
        kwargs: dict[str, object],
        retries_left: int,
    ) -> FastRef:
        resend = (args, kwargs, retries_left - 1) if self.idempotent and retries_left > 0 else None
        ref = FastRef(self, slot, node_id, pending, started, state, resend)
        calls.track(ref, node_id, ref.cancel)
        return ref

    def _ray_call(
        self,
        slot: Slot,
        node_id: int,
        args: tuple[object, ...],
        kwargs: dict[str, object],
        started: float,
        state: calls.CallState | None,
        retries_left: int,
    ) -> Any:
        # Submitted outside the lock: Ray's callback thread takes it in
        # _done(), and submitting may wait on Ray (storing a large argument).
        try:
            ref = slot.handle.call.remote(node_id, *args, **kwargs)
        except BaseException:
            self._done(slot, node_id, started, state, None)  # e.g. an argument that cannot be pickled
            raise
        # The future keeps the ref alive until the callback has run, and
        # may run it at once, in this thread: never under the lock.
        ref.future().add_done_callback(functools.partial(self._done, slot, node_id, started, state))
        retry = aretry = None
        if self.idempotent and retries_left > 0:
            # A call lost with its replica runs again on another one.
            retry = functools.partial(self.resubmit, node_id, args, kwargs, retries_left - 1)
            aretry = functools.partial(self.aresubmit, node_id, args, kwargs, retries_left - 1)
        calls.track(ref, node_id, functools.partial(self.abandon, slot), retry, aretry)
        return ref

    def resubmit(self, node_id: int, args: tuple[object, ...], kwargs: dict[str, object], retries_left: int) -> Any:
        """Send a call lost with its replica again (idempotent steps)."""
        self._replace_dead()
        return self._submit(node_id, args, kwargs, retries_left)

    async def aresubmit(self, node_id: int, args: tuple[object, ...], kwargs: dict[str, object], retries_left: int) -> Any:
        self._replace_dead()
        return await self._asubmit(node_id, args, kwargs, retries_left)

    def label_of(self, node_id: int) -> str:
        return node_label(self.unit.graph, node_id)

    def settle(self, ref: FastRef, ok: bool) -> None:
        """A fast-path call is over for routing and stats (once)."""
        with self._lock:
            if ref.finished:
                return
            ref.finished = True
            ref.slot.in_flight -= 1
        if self.stats is not None:
            self.stats.finished(ref.node_id, ref.started, None if ref.state is None else ref.state.ready, ok)

    def lost(self, slot: Slot) -> None:
        """`slot`'s fast-path connection broke: its process is gone or
        hung up; end it (if not already) and start another."""
        self.end_replica(slot, None)

    def abandon_fast(self, ref: FastRef, force: bool) -> None:
        """`abandon` for a fast-path call: its replica drains it (takes no
        new calls) until its answer comes, for up to `abandon_grace_s`."""
        if force or ref.pending.poll() or not self._drain_for(ref.slot, ref):
            ref.pending.discard()
            ref.finish(False)

    def abandon(self, slot: Slot, ref: Any, force: bool = False) -> Callable[[], None] | None:
        """A call gave up on `ref` (deadline, error elsewhere, cancelled):
        dropped if still queued. Ray cannot interrupt a running actor call:
        if it still runs a moment later (the returned follow-up), its
        replica takes no new calls, and is replaced if still busy after
        `abandon_grace_s` (health.py): the next call must not wait behind
        an abandoned one."""
        ray.cancel(ref)
        if force:
            return None
        return functools.partial(self._hold, slot, ref)

    def _hold(self, slot: Slot, ref: Any) -> None:
        self._drain_for(slot, ref)

    def _drain_for(self, slot: Slot, ref: Any) -> bool:
        """Keep `slot` from new calls until `ref` ends (reap_abandoned);
        False if the slot is already ended."""
        with self._lock:
            if self.closed or slot.dead:
                return False
            self.abandoned.append((ref, slot, time.monotonic() + self.policy.abandon_grace_s))
            slot.draining += 1
            # Nowhere else to send calls: a fresh replica takes its place now.
            alone = slot in self.slots and all(s.dead or s.draining for s in self.slots)
        if alone:
            self._retire(slot)
        return True

    def _retire(self, slot: Slot) -> None:
        """Put a fresh replica in `slot`'s place; `slot` keeps its calls."""
        new = self._spawn(slot.index)
        with self._lock:
            if not self.closed and self.slots[slot.index] is slot:
                self.slots[slot.index] = new
                self.retired.append(slot)
                return
        ray.kill(new.handle)

    def swap(self, unit: Unit, timeout_s: float) -> None:
        """Hot swap: start replicas of `unit`, wait until every one is
        built, then route new calls to them; the old replicas drain (finish
        what they have) and end. A new replica failing its constructor
        ends the new ones and raises, leaving the old ones serving."""
        fresh = [self._spawn(i, unit) for i in range(self.size)]
        try:
            placed = ray.get([s.ready_ref for s in fresh], timeout=timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            for s in fresh:
                ray.kill(s.handle)
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise PipelineTimeoutError(
                    f"update(): the new replicas of step {self.unit.label!r} were not ready within {timeout_s:g} s "
                    "(deploy_timeout_s); the old replicas keep serving",
                    step_name=self.unit.label,
                ) from None
            error = ray_runtime.step_error(e, self.unit.graph, self.node_ids[0])
            raise error from None
        for slot, where in zip(fresh, placed):
            self._record(slot, *where)
        channel = None
        with self._lock:
            old, self.slots = self.slots, fresh
            self.unit = unit
            self.retired.extend(old)
            channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()
        if self.uses_channel:
            self.open_channel()
        threading.Thread(target=self._drain, args=(old,), name="pipeline_ir-drain", daemon=True).start()

    def _drain(self, old: list[Slot]) -> None:
        """End replaced replicas once their calls are done (bounded)."""
        deadline = time.monotonic() + max(self.policy.deploy_timeout_s, 60.0)
        for slot in old:
            while slot.in_flight > 0 and time.monotonic() < deadline and not self.closed:
                time.sleep(0.01)
            with self._lock:
                if slot in self.retired:
                    self.retired.remove(slot)
                slot.replaced = True
            if slot.actor_id is not None:
                ray_runtime.forget_replica(slot.actor_id)
            if not self.closed:
                _kill(slot)

    def live_slots(self) -> list[Slot]:
        """The replicas up and not known dead (for health checks)."""
        with self._lock:
            return [s for s in self.slots + self.retired if s.actor_id is not None and not s.dead]

    def end_replica(self, slot: Slot, why: str | None) -> None:
        """End a replica that is hung, lost or stuck: its calls in flight
        fail (or are retried, for idempotent steps) naming `why` (None: it
        died), and a new replica takes its place."""
        with self._lock:
            if slot.dead or self.closed:
                return
            slot.dead, slot.why = True, why
        _kill(slot)
        if slot in self.slots:
            self._replace_dead()

    def reap_abandoned(self, now: float) -> None:
        """End replicas still busy with a call abandoned past its grace."""
        with self._lock:
            due = [e for e in self.abandoned if e[2] <= now]
            self.abandoned = [e for e in self.abandoned if e[2] > now]
        if not due:
            return
        done = {id(r) for r, _, _ in due if isinstance(r, FastRef) and r.pending.poll()}
        refs = [r for r, _, _ in due if not isinstance(r, FastRef)]
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            done.update(id(r) for r in ready)
        for ref, slot, _ in due:
            if isinstance(ref, FastRef) and id(ref) in done:
                ref.finish(False)
            if id(ref) in done:
                with self._lock:
                    slot.draining -= 1  # it finished: the replica serves again
                    back = slot.draining == 0 and slot in self.retired and not slot.dead
                if back:
                    self._drain_retired(slot)
                continue
            grace = self.policy.abandon_grace_s
            self.end_replica(slot, f"it was still busy {grace:g} s after a call it ran was abandoned (deadline)")
            if isinstance(ref, FastRef):
                ref.pending.discard()
                ref.finish(False)
            if slot in self.retired:
                with self._lock:
                    if slot in self.retired:
                        self.retired.remove(slot)

    def _drain_retired(self, slot: Slot) -> None:
        threading.Thread(target=self._drain, args=([slot],), name="pipeline_ir-drain", daemon=True).start()

    def batch_stats(self) -> dict[str, tuple[int, int]]:
        """(items, batches) its replicas batched, for Pipeline.stats()."""
        slots = self.live_slots()
        if not slots:
            return {}
        figures = ray.get([s.handle.batch_stats.remote() for s in slots], timeout=5)
        key = stats_unit_key(self.unit.graph, self.unit.node)
        return {key: (sum(f[0] for f in figures), sum(f[1] for f in figures))}

    def submit_channel(self, node_id: int, *args: object, **kwargs: object) -> Any:
        """Run the unit as node `node_id` over the compiled graph (channel
        units: one replica); returns a CompiledDAGRef."""
        ensure_registered()
        if has_pending(args, kwargs):
            args, kwargs = fast_calls.resolve(args, kwargs)
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

    def _done(
        self,
        slot: Slot,
        node_id: int,
        started: float,
        state: calls.CallState | None,
        future: concurrent.futures.Future[object] | None,
    ) -> None:
        # Runs on Ray's callback thread: keep it short, never call into Ray.
        with self._lock:
            slot.in_flight -= 1
        if self.stats is not None:
            ok = future is not None and future.exception() is None
            self.stats.finished(node_id, started, None if state is None else state.ready, ok)

    def close(self) -> list[int]:
        """Kill every replica; return the pids of those on this node."""
        with self._lock:
            self.closed = True
            slots, self.slots = self.slots + self.retired, []
            self.retired = []
            channel, self.channel = self.channel, None
            abandoned, self.abandoned = self.abandoned, []
        if channel is not None:
            channel.close()
        for ref, _, _ in abandoned:
            if isinstance(ref, FastRef):
                ref.pending.discard()  # its connection: nobody polls it any more
        here = ray.get_runtime_context().get_node_id()
        pids = []
        for actor_id in self._ended:
            ray_runtime.forget_replica(actor_id)
        for slot in slots:
            learn_placement(slot)
            if slot.actor_id is not None:
                ray_runtime.forget_replica(slot.actor_id)
            _kill(slot)
            if slot.pid is not None and slot.node == here:
                pids.append(slot.pid)
        return pids


def _kill(slot: Slot) -> None:
    """Kill a replica's actor; its fast-path server's files go with it
    (a killed process cannot remove them), also when its calls had moved
    to Ray calls (its client dropped)."""
    ray.kill(slot.handle)
    fast, slot.fast = slot.fast, None
    socket, slot.socket = slot.socket, None
    if fast is not None:
        fast.close()
    if socket is not None:
        fast_transport.remove_files(socket)


def _sendable(args: tuple[object, ...], kwargs: dict[str, object]) -> bool:
    """Whether a call can take the fast path: no input is a Ray ref
    (Ray hands those to the replica itself, without this process)."""
    for a in args:
        if isinstance(a, ray.ObjectRef):
            return False
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, ray.ObjectRef):
                return False
    return True


def _no_fetch(ref: Any, node_id: int) -> object:
    raise AssertionError("Pool.fetch was not set by its launcher")
