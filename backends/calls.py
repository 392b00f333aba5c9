"""One call of a deployed pipeline: its deadline and the remote work it started.

`Pipeline.call` runs the generated program inside a `CallState` held in a
context variable, so the code generator needs no extra argument and
concurrent calls (threads, asyncio tasks) each see their own:

- launchers `track()` every ObjectRef they submit, with the node it
  computes and how to cancel it (a task is stopped, a queued actor call
  dropped; a running actor call cannot be interrupted in Ray, so its pool
  is told, see ray_actors.py);
- the fetch helpers (ray_runtime.py) wait no longer than `remaining()` and
  on expiry raise `PipelineTimeoutError` naming the first step of the call
  still unfinished: work is submitted in program order, so that is the
  step everything after it waits on;
- when a call ends without its result (an error, a deadline, asyncio
  cancelling it), `cancel_unfinished()` cancels what it left running, so an
  abandoned call never keeps workers busy behind the next one.

Nothing here imports Ray at import time: LOCAL pipelines use the deadline
only.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline_ir.errors import PipelineTimeoutError

# cancel(ref, force): force when the pipeline shuts down (work must end).
Cancel = Callable[[Any, bool], None]


@dataclass(eq=False)  # identity: a Program keeps its live calls in a set
class CallState:
    """The deadline of one call and the refs it submitted, in order."""

    deadline: float | None = None  # time.monotonic() value
    timeout: float | None = None  # as the caller gave it, for messages
    refs: list[tuple[Any, int, Cancel]] = field(default_factory=list)

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def unfinished(self) -> list[tuple[Any, int, Cancel]]:
        """The tracked refs not ready yet, in submission order."""
        if not self.refs:
            return []
        import ray

        refs = [r for r, _, _ in self.refs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        done = {id(r) for r in ready}
        return [entry for entry in self.refs if id(entry[0]) not in done]

    def cancel_unfinished(self, force: bool = False) -> None:
        """Cancel every tracked ref still running or queued (`force`: at
        shutdown, end running work by any means)."""
        try:
            left = self.unfinished()
        except Exception:
            return  # Ray is gone (shutdown): nothing left to cancel
        for ref, _, cancel in left:
            try:
                cancel(ref, force)
            except Exception:
                pass  # finished or lost meanwhile


_CURRENT: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("pipeline_ir_call", default=None)


def current() -> CallState | None:
    """The state of the call running in this context, if any."""
    return _CURRENT.get()


def begin(timeout: float | None) -> tuple[CallState, contextvars.Token[CallState | None]]:
    """Start a call with `timeout` seconds (None: no deadline)."""
    state = CallState(None if timeout is None else time.monotonic() + timeout, timeout)
    return state, _CURRENT.set(state)


def end(token: contextvars.Token[CallState | None]) -> None:
    _CURRENT.reset(token)


def track(ref: Any, node_id: int, cancel: Cancel) -> None:
    """Record a submitted ref of the running call (no-op outside one)."""
    state = _CURRENT.get()
    if state is not None:
        state.refs.append((ref, node_id, cancel))


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
    return PipelineTimeoutError(
        f"call timed out after {state.timeout:g} s: {where}; the rest of the call was cancelled",
        step_name=step,
        node_id=node_id,
    )
