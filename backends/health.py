"""`HealthMonitor`: finds the replicas that stopped answering and ends them.

One thread per deployed ACTORS pipeline. Every `health_check_period_s` it
pings each live replica on the replica's control thread (replica.py), so
a replica busy with a long call still answers; one that has not answered
`health_check_timeout_s` later (a stopped process, a hung interpreter, a
lost node) is killed and replaced by its pool. Its calls in flight then
fail with a StepError naming its step and why, or run again on another
replica for `idempotent=True` steps, so no call waits on it forever.

The same loop ends replicas still busy with a call abandoned past its
grace (a deadline passed; Ray cannot interrupt a running actor call), and,
every period, asks each pool to start the replicas that no alive node could
host (their only capable node was lost) once a node that fits has joined
(`Pool.place`); until then the pool fails their calls at once.

Pings are sent without waiting, and their answers looked at on later
ticks, so one hung replica never delays the checks of the others. Between
ticks the thread sleeps on an Event: an idle pipeline costs a wake-up a
few times a second, and `close()` ends the thread at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import ray

from pipeline_ir.options import DeployOptions

if TYPE_CHECKING:
    from pipeline_ir.backends.pool import Pool, Slot

_TICK_S = 0.25


class HealthMonitor:
    """Health checks and abandoned-call reaping for a set of pools."""

    def __init__(self, pools: Callable[[], Sequence[Pool]], policy: DeployOptions) -> None:
        self.pools = pools
        self.policy = policy
        self._stop = threading.Event()
        # Pings in flight: (pool, slot, ref, sent at).
        self._pings: list[tuple[Pool, Slot, Any, float]] = []
        self._next_ping = time.monotonic() + policy.health_check_period_s
        self._thread = threading.Thread(target=self._loop, name="pipeline_ir-health", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        tick = min(_TICK_S, self.policy.health_check_period_s, max(self.policy.abandon_grace_s / 2, 0.05))
        while not self._stop.wait(tick):
            try:
                self.check(time.monotonic())
            except Exception:
                if not ray.is_initialized():
                    return  # Ray is gone: nothing left to watch
                # Anything else is transient (a replica replaced under us):
                # the next tick looks again.

    def check(self, now: float) -> None:
        """One round: collect ping answers, end the silent, send new pings,
        end replicas stuck on abandoned calls."""
        pools = list(self.pools())
        self._collect(now)
        if now >= self._next_ping:
            self._next_ping = now + self.policy.health_check_period_s
            for pool in pools:
                pool.place()  # replicas no node could host: retried as nodes join
            pinged = {id(slot) for _, slot, _, _ in self._pings}
            for pool in pools:
                for slot in pool.live_slots():
                    if id(slot) not in pinged:
                        self._pings.append((pool, slot, slot.handle.ping.remote(), now))
        for pool in pools:
            pool.reap_abandoned(now)

    def _collect(self, now: float) -> None:
        if not self._pings:
            return
        refs = [ref for _, _, ref, _ in self._pings]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        answered = {id(r) for r in ready}
        waiting: list[tuple[Pool, Slot, Any, float]] = []
        for pool, slot, ref, sent in self._pings:
            if id(ref) in answered:
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError:
                    pool.end_replica(slot, "its process died (found by a health check)")
                except ray.exceptions.RayError:
                    pass  # e.g. the replica was replaced meanwhile
                continue
            if now - sent >= self.policy.health_check_timeout_s:
                timeout = self.policy.health_check_timeout_s
                pool.end_replica(slot, f"it did not answer a health check for {timeout:g} s (stopped, hung or lost)")
                continue
            waiting.append((pool, slot, ref, sent))
        self._pings = waiting
