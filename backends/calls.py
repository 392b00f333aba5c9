"""One call of a deployed pipeline: its deadline and the remote work it started.

`Pipeline.call` runs the generated program inside a `CallState` held in a
context variable, so the code generator needs no extra argument and
concurrent calls (threads, asyncio tasks) each see their own:

- launchers `track()` every ObjectRef they submit, with the node it
  computes and how to cancel it (a task is stopped, a queued actor call
  dropped; a running actor call cannot be interrupted in Ray, so its pool
  is told, see pool.py);
- the fetch helpers (ray_runtime.py) wait no longer than `remaining()` and
  on expiry raise `PipelineTimeoutError` naming the first step of the call
  still unfinished: work is submitted in program order, so that is the
  step everything after it waits on;
- a ref of an idempotent step comes with a way to send its call again:
  a fetch that finds its replica dead retries it (ray_runtime.py), at most
  `max_retries` times;
- a call sent over the fast path (fast_calls.py) is a `PendingRef`, not an
  ObjectRef: it knows itself whether it is done, without Ray;
- when a call ends without its result (an error, a deadline, asyncio
  cancelling it), `cancel_unfinished()` cancels what it left running, so an
  abandoned call never keeps workers busy behind the next one.

Nothing here imports Ray at import time: LOCAL pipelines use the deadline
only.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline_ir.errors import PipelineTimeoutError

# cancel(ref, force): force when the pipeline shuts down (work must end).
# It may return what to do if the ref is still running a moment later.
Cancel = Callable[[Any, bool], "Callable[[], None] | None"]
Retry = Callable[[], Any]
ARetry = Callable[[], Awaitable[Any]]

# How long a cancelled call may take to be dropped before it counts as running.
_RUNNING_PROBE_S = 0.05


class PendingRef:
    """A remote result that travels outside Ray (fast_calls.FastRef)."""

    __slots__ = ()

    def is_done(self) -> bool:
        """Whether its answer has been read (or the call settled)."""
        raise NotImplementedError

    def get(self) -> object:
        """Its value (read once), or the user-facing error raised."""
        raise NotImplementedError

    async def aget(self) -> object:
        """`get` for asyncio."""
        raise NotImplementedError


@dataclass(eq=False)  # identity: a Program keeps its live calls in a set
class CallState:
    """The deadline of one call and the refs it submitted, in order."""

    deadline: float | None = None  # time.monotonic() value
    timeout: float | None = None  # as the caller gave it, for messages
    refs: list[tuple[Any, int, Cancel]] = field(default_factory=list)
    # ref id -> how to send that call again (idempotent steps), once each
    retries: dict[int, Retry] = field(default_factory=dict)
    aretries: dict[int, ARetry] = field(default_factory=dict)  # the same, for asyncio
    # node id -> when its remote result was ready (stats.py reads it)
    ready: dict[int, float] = field(default_factory=dict)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def unfinished(self) -> list[tuple[Any, int, Cancel]]:
        """The tracked refs not ready yet, in submission order."""
        if not self.refs:
            return []
        done = {id(r) for r, _, _ in self.refs if isinstance(r, PendingRef) and r.is_done()}
        refs = [r for r, _, _ in self.refs if not isinstance(r, PendingRef)]
        if refs:
            import ray

            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            done.update(id(r) for r in ready)
        return [entry for entry in self.refs if id(entry[0]) not in done]

    def retry(self, ref: Any) -> Any | None:
        """A new ref computing what `ref` did, if its call may be sent
        again (an idempotent step whose replica died), else None."""
        self.aretries.pop(id(ref), None)
        again = self.retries.pop(id(ref), None)
        return None if again is None else again()

    async def aretry(self, ref: Any) -> Any | None:
        """`retry` for asyncio."""
        self.retries.pop(id(ref), None)
        again = self.aretries.pop(id(ref), None)
        return None if again is None else await again()

    def cancel_unfinished(self, force: bool = False) -> None:
        """Cancel every tracked ref still running or queued (`force`: at
        shutdown, end running work by any means)."""
        try:
            left = self.unfinished()
        except Exception:
            return  # Ray is gone (shutdown): nothing left to cancel
        followups: list[tuple[Any, Callable[[], None]]] = []
        for ref, _, cancel in left:
            try:
                then = cancel(ref, force)
            except Exception:
                continue  # finished or lost meanwhile
            if then is not None:
                followups.append((ref, then))
        if not followups or force:
            return
        # A queued call is dropped at once; one still unfinished a moment
        # later is running, and its replica must take no new calls.
        import ray

        refs = [r for r, _ in followups]
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_RUNNING_PROBE_S, fetch_local=False)
        done = {id(r) for r in ready}
        for ref, then in followups:
            if id(ref) not in done:
                then()


_CURRENT: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("pipeline_ir_call", default=None)


def current() -> CallState | None:
    """The state of the call running in this context, if any."""
    return _CURRENT.get()


def begin(timeout: float | None) -> tuple[CallState, contextvars.Token[CallState | None]]:
    """Start a call with `timeout` seconds (None: no deadline)."""
    state = CallState(None if timeout is None else time.monotonic() + timeout, timeout)
    return state, _CURRENT.set(state)


def end(token: contextvars.Token[CallState | None]) -> None:
    """The call is over (its unfinished work already cancelled): forget
    its refs. A fast-path ref points back at its state, and the cycle
    would keep the values it read (and the shared-memory segments under
    them) alive until the cyclic garbage collector ran."""
    state = _CURRENT.get()
    _CURRENT.reset(token)
    if state is not None:
        state.refs.clear()
        state.retries.clear()
        state.aretries.clear()


def track(ref: Any, node_id: int, cancel: Cancel, retry: Retry | None = None, aretry: ARetry | None = None) -> None:
    """Record a submitted ref of the running call (no-op outside one);
    `retry` sends the same call again and returns its new ref."""
    state = _CURRENT.get()
    if state is not None:
        state.refs.append((ref, node_id, cancel))
        if retry is not None:
            state.retries[id(ref)] = retry
        if aretry is not None:
            state.aretries[id(ref)] = aretry


def timeout_error(state: CallState, label_of: Callable[[int], str], fallback_node: int | None) -> PipelineTimeoutError:
    """The error for a call whose deadline passed while it waited for
    `fallback_node`: names the first unfinished step of the call."""
    node_id = fallback_node
    try:
        left = state.unfinished()
    except Exception:
        left = []
    if left:
        node_id = left[0][1]
    step = label_of(node_id) if node_id is not None else None
    where = f"step {step!r} (node %{node_id}) was still running" if step is not None else "no step had finished"
    after = f" after {state.timeout:g} s" if state.timeout is not None else ""
    return PipelineTimeoutError(
        f"call timed out{after}: {where}; the rest of the call was cancelled",
        step_name=step,
        node_id=node_id,
    )
