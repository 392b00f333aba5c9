"""`Admission`: the bound on calls in flight (`deploy(max_in_flight=N)`).

One counter shared by threads and event loops: `call` from any thread and
`call_async` from any loop draw on the same N slots. A caller past the
bound waits up to the overload timeout, then gets PipelineOverloadedError;
nothing of its call has started, so it is always safe to retry. A freed
slot wakes one waiter, a blocked thread or an awaiting task, whichever
waited first. Waiting costs no thread: an async waiter is a future on its
own loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading

from pipeline_ir.errors import PipelineOverloadedError


class _Waiter:
    """A caller waiting for a slot: a thread (`event`) or a task (`future`
    on `loop`). `granted` is set, under the lock, when a slot passes to it."""

    __slots__ = ("event", "loop", "future", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.granted = False
        self.loop = loop
        self.event = threading.Event() if loop is None else None
        self.future: asyncio.Future[None] | None = None if loop is None else loop.create_future()

    def wake(self) -> bool:
        """Tell the waiter its slot came; False when it can no longer hear."""
        if self.event is not None:
            self.event.set()
            return True
        assert self.loop is not None and self.future is not None
        if self.loop.is_closed():
            return False
        self.loop.call_soon_threadsafe(_set, self.future)
        return True


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Admission:
    """At most `limit` holders at once (None: no bound, no cost)."""

    def __init__(self, limit: int | None, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self.in_flight = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiter] = collections.deque()

    def _overloaded(self) -> PipelineOverloadedError:
        waited = f" after waiting {self.timeout:g} s" if self.timeout else ""
        return PipelineOverloadedError(
            f"pipeline overloaded: {self.limit} calls in flight (deploy(max_in_flight={self.limit})){waited}; "
            "retry later, raise max_in_flight, or let calls wait longer with deploy(overload_timeout_s=...)"
        )

    def _try(self) -> bool:
        # Under the lock. Waiters go first: a newcomer never overtakes them.
        assert self.limit is not None
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return True
        return False

    def _give_up(self, waiter: _Waiter) -> bool:
        """The waiter stops waiting; True if it holds a slot after all (it
        was granted as it gave up)."""
        with self._lock:
            if waiter.granted:
                return True
            self._waiters.remove(waiter)
            return False

    def enter(self) -> None:
        """Take a slot, waiting up to the timeout (threads)."""
        if self.limit is None:
            return
        with self._lock:
            if self._try():
                return
            if self.timeout <= 0:
                raise self._overloaded()
            waiter = _Waiter()
            self._waiters.append(waiter)
        assert waiter.event is not None
        if waiter.event.wait(self.timeout) or self._give_up(waiter):
            return
        raise self._overloaded()

    async def enter_async(self, wait: bool = False) -> None:
        """Take a slot, awaiting up to the timeout (or for as long as it
        takes when `wait`, as map() does)."""
        if self.limit is None:
            return
        with self._lock:
            if self._try():
                return
            if self.timeout <= 0 and not wait:
                raise self._overloaded()
            waiter = _Waiter(asyncio.get_running_loop())
            self._waiters.append(waiter)
        assert waiter.future is not None
        try:
            if wait:
                await asyncio.shield(waiter.future)
            else:
                await asyncio.wait_for(asyncio.shield(waiter.future), self.timeout)
        except asyncio.TimeoutError:
            if self._give_up(waiter):
                return
            raise self._overloaded() from None
        except asyncio.CancelledError:
            if self._give_up(waiter):
                self.exit()  # granted as we were cancelled: pass the slot on
            raise

    def exit(self) -> None:
        """Give a slot back: to the first waiter that can take it, else to
        the pool."""
        if self.limit is None:
            return
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if waiter.wake():
                    waiter.granted = True  # the slot passes on: in_flight unchanged
                    return
            self.in_flight -= 1
