"""The fast path as the replica pools use it: calls to replicas on this node
over the fast path (fast_transport.py), and `FastRef`, which stands for such a call's
result the way an ObjectRef does for a Ray actor task.

A pool (pool.py) sends a call over the fast path when the chosen
replica runs on this node, answered ready() with a fast-path address, and
no input of the call is a Ray ObjectRef (a ref goes to the replica through
Ray, which resolves it there, rather than through this process). The call
is sent at once and its answer read where the program needs the value:

    v2 = group4.submit(4, v1)      # a FastRef: the call is on its way
    v3 = other.submit(5, v1)       # sent too: both replicas work at once
    return _get(v3, 5)             # reads the answer (ray_runtime._get)

A FastRef handed to another remote step is read here and its value sent
on (`resolve`); values over 256 KiB travel in shared memory, and a buffer
read here from one replica's segment is forwarded in that segment to the
next (fast_segments.py): the hop copies nothing.

What a Ray actor call gets from Ray, a FastRef does here:

- deadlines: the answer is awaited no longer than the call's deadline
  (calls.py); past it, PipelineTimeoutError naming the first unfinished
  step, and the call is abandoned: its replica takes no new call until
  the answer comes (`Pool.reap_abandoned` polls it), and is replaced if
  still busy after `abandon_grace_s`, as for Ray calls;
- failures: a replica whose connection breaks with a call in flight died
  (or hangs up): the pool ends and replaces it; the call is sent again
  for an idempotent step, else fails with a StepError naming the step;
- stats and least-loaded routing: in-flight counts and latency as for
  Ray calls (`finish`).

A call that cannot take the fast path (no connection could be made: the
server refused, the socket is gone) goes through Ray; the pool then stops
trying that replica's fast path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline_ir.backends import calls
from pipeline_ir.backends.fast_client import Pending
from pipeline_ir.backends.fast_transport import CallTimeout, RemoteFailure, TransportError
from pipeline_ir.errors import PipelineTimeoutError, StepError

if TYPE_CHECKING:
    from pipeline_ir.backends.pool import Pool, Slot

_UNSET: Any = object()


class FastRef(calls.PendingRef):
    """The result of one call sent to a replica over the fast path."""

    __slots__ = ("pool", "slot", "node_id", "pending", "started", "state", "resend", "finished", "_value", "_error")

    def __init__(
        self,
        pool: Pool,
        slot: Slot,
        node_id: int,
        pending: Pending,
        started: float,
        state: calls.CallState | None,
        resend: tuple[tuple[object, ...], dict[str, object], int] | None,
    ) -> None:
        self.pool = pool
        self.slot = slot
        self.node_id = node_id
        self.pending = pending
        self.started = started
        self.state = state
        self.resend = resend  # (args, kwargs, retries left): an idempotent step's call, to send again
        self._value: object = _UNSET
        self._error: BaseException | None = None
        self.finished = False  # the pool has counted it out (Pool.settle)

    def is_done(self) -> bool:
        return self.finished or self.pending.settled

    # -- reading the answer

    def get(self) -> object:
        """The call's value, or its error (a StepError naming the step, or
        the call's PipelineTimeoutError) raised; read once, kept."""
        if self._value is not _UNSET or self._error is not None:
            return self._kept()
        error: BaseException
        try:
            value = self.pending.wait(*_limits(self.state))
        except TransportError as e:
            return self.pool.fetch(self._lost(e), self.node_id)
        except BaseException as e:
            error = self._outcome(e)
        else:
            return self._ok(value)
        # Raised outside the except block: the step's error keeps its own cause.
        raise error

    async def aget(self) -> object:
        """`get` for asyncio."""
        if self._value is not _UNSET or self._error is not None:
            return self._kept()
        error: BaseException
        try:
            value = await self.pending.wait_async(*_limits(self.state))
        except TransportError as e:
            return await self.pool.afetch(await self._alost(e), self.node_id)
        except BaseException as e:
            error = self._outcome(e)
        else:
            return self._ok(value)
        raise error

    def _kept(self) -> object:
        """The outcome read before: its value, or its error raised."""
        if self._error is not None:
            raise self._error
        return self._value

    def _outcome(self, e: BaseException) -> BaseException:
        """What to raise for `e`, raised while waiting for the answer (not
        a broken connection, which `_lost` handles)."""
        if isinstance(e, CallTimeout):
            return self._expired()  # the call stays pending: the program's cancellation abandons it
        if isinstance(e, Exception):
            return self._failed(e)
        # KeyboardInterrupt, asyncio's cancellation: not the step's doing.
        # A read cut short dropped the connection, and the call is over for
        # the pool; a cancelled asyncio read goes on (shielded) and the
        # program's cancellation abandons the call.
        if self.pending.settled:
            self.finish(False)
        return e

    def _ok(self, value: object) -> object:
        self._value = value
        self.finish(True)
        return value

    def _failed(self, e: BaseException) -> BaseException:
        """The step raised (its StepError comes as it is), or the replica
        could not take the call or send its answer back."""
        self.finish(False)
        if not isinstance(e, StepError):
            label = self.pool.unit.label
            if isinstance(e, RemoteFailure):
                e = StepError(label, self.node_id, e, message=f"step {label!r} (node %{self.node_id}): {e}")
            else:
                e = StepError(label, self.node_id, e)
        self._error = e
        return e

    def _expired(self) -> PipelineTimeoutError:
        state = self.state
        assert state is not None  # only a call with a deadline times out
        return calls.timeout_error(state, self.pool.label_of, self.node_id)

    def _lost(self, e: TransportError) -> Any:
        """The replica's connection broke with the call in flight: the
        replica is ended and replaced; the call sent again (an idempotent
        step: returns its new ref) or its StepError raised."""
        self._dead(e)
        if self.resend is None:
            raise self._error_for(e)
        args, kwargs, left = self.resend
        return self.pool.resubmit(self.node_id, args, kwargs, left)

    async def _alost(self, e: TransportError) -> Any:
        self._dead(e)
        if self.resend is None:
            raise self._error_for(e)
        args, kwargs, left = self.resend
        return await self.pool.aresubmit(self.node_id, args, kwargs, left)

    def _dead(self, e: TransportError) -> None:
        self.finish(False)
        self.pool.lost(self.slot)

    def _error_for(self, e: TransportError) -> StepError:
        slot, label, nid = self.slot, self.pool.unit.label, self.node_id
        pid = f", pid {slot.pid}" if slot.pid is not None else ""
        what = f"was ended: {slot.why}" if slot.why else f"died while running this call (its fast-path connection broke: {e})"
        error = StepError(
            label,
            nid,
            e,
            message=f"step {label!r} (node %{nid}): replica {slot.index}{pid} {what}; a new replica takes its place for later calls",
        )
        self._error = error
        return error

    # -- bookkeeping

    def finish(self, ok: bool) -> None:
        """The call is over for the pool (answered, failed, or given up on
        and drained): once."""
        self.pool.settle(self, ok)

    def cancel(self, _ref: object, force: bool) -> None:
        """calls.Cancel: the program gave up on this call (deadline, an
        error elsewhere, asyncio cancelled it, shutdown)."""
        if not self.is_done():
            self.pool.abandon_fast(self, force)


def _limits(state: calls.CallState | None) -> tuple[float | None, float | None]:
    """(seconds left, the timeout as given) of the running call."""
    if state is None or state.deadline is None:
        return None, None
    return state.remaining(), state.timeout


def has_pending(args: tuple[object, ...], kwargs: dict[str, object]) -> bool:
    """Whether a call's inputs include a FastRef (which Ray cannot take)."""
    for a in args:
        if isinstance(a, FastRef):
            return True
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, FastRef):
                return True
    return False


def resolve(args: tuple[object, ...], kwargs: dict[str, object]) -> tuple[tuple[object, ...], dict[str, object]]:
    """The inputs with every FastRef read (its value, or its error raised)."""
    return (
        tuple(a.get() if isinstance(a, FastRef) else a for a in args),
        {k: v.get() if isinstance(v, FastRef) else v for k, v in kwargs.items()},
    )


async def aresolve(args: tuple[object, ...], kwargs: dict[str, object]) -> tuple[tuple[object, ...], dict[str, object]]:
    """`resolve` for asyncio."""
    return (
        tuple([await a.aget() if isinstance(a, FastRef) else a for a in args]),
        {k: await v.aget() if isinstance(v, FastRef) else v for k, v in kwargs.items()},
    )
