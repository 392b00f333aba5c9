"""The fast path's caller side: `FastClient`, a pool of connections to one
replica's `FastServer`, and `Pending`, a call sent whose answer is read
later (fast_transport.py says how the pieces fit, and what the security
checks are)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import select
import socket
import stat
import threading
import time
from typing import Any

from pipeline_ir.backends import fast_frames as fr
from pipeline_ir.backends.fast_frames import PeerGone, ProtocolError, TransportError
from pipeline_ir.backends.fast_transport import (
    CONNECT_TIMEOUT_S,
    HELLO,
    MAX_CONNECTIONS,
    PROBE_EVERY,
    QUIET_AFTER,
    REFUSED,
    SPIN_S,
    THRESHOLD,
    Address,
    CallTimeout,
    RemoteFailure,
    Unreachable,
    remove_files,
)

# Once an answer's first byte is in, how long the rest may take (a large
# frame comes in pieces): past it the connection is dropped.
_REST_S = 10.0
# Whether polling pays is measured, not assumed: two calls in _TRY_OTHER
# take the way (poll or block) that is behind, and each way keeps its last
# _SAMPLES round trips, taken from calls that went the same way as the
# call before them (the server polls for a call or not as the call before
# it asked); the way with the lower median wins (a median: a call now and
# then descheduled for milliseconds must not decide). On a busy machine
# the poller takes the CPU its peer needs, and blocking wins.
_TRY_OTHER = 16
_SAMPLES = 9
# One spinning thread per process: threads waiting at once would only take
# the GIL from each other (and from the thread whose answer came).
_spinner = threading.Lock()


class FastClient:
    """Calls a FastServer from this process, from threads (`call`) and from
    asyncio (`call_async`, any number of event loops), over at most
    `max_connections` connections in all. A connection is a plain socket
    between calls, so threads and loops share the idle ones.

    A PeerGone marks the client gone: every later call raises it at once
    (the replica is dead; the pool replaces it and makes a new client).
    """

    def __init__(
        self,
        address: Address,
        *,
        max_connections: int = MAX_CONNECTIONS,
        threshold: int = THRESHOLD,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        spin_s: float = SPIN_S,
    ) -> None:
        self.address = address
        self.max_connections = max_connections
        self.threshold = threshold
        self.connect_timeout = connect_timeout
        self.spin_s = spin_s
        self.gpus = frozenset(address.gpus)  # CUDA tensors on these go by CUDA IPC (cuda_ipc.py)
        # No lock for these: a race between threads only shifts a choice.
        self.late = 0  # answers in a row that came after the spin
        # Round trips (s) of calls that polled, and of calls that blocked.
        self.round_trips: tuple[collections.deque[float], collections.deque[float]] = (
            collections.deque(maxlen=_SAMPLES),
            collections.deque(maxlen=_SAMPLES),
        )
        self.poll_pays = True  # until blocking has been measured
        self._calls = 0
        self._polled_last = False
        self.gone: PeerGone | None = None
        self.closed = False
        self._lock = threading.Lock()  # guards what follows
        self._free = threading.Condition(self._lock)  # threads wait on it for a connection
        self._idle: list[fr.Link] = []
        self._open = 0  # idle or in use
        self._sleepers = 0  # threads waiting on `_free`
        self._waiting: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = collections.deque()

    # -- threads

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, timeout: float | None = None) -> object:
        """`handler(*args, **kwargs)` in the replica; its result, or its
        exception raised here. CallTimeout after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = self.send(args, kwargs, timeout=timeout)
        try:
            return pending.wait(None if deadline is None else max(0.0, deadline - time.monotonic()), timeout)
        except CallTimeout:
            pending.discard()
            raise

    def send(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, timeout: float | None = None) -> Pending:
        """Send a call and return without waiting for its answer, which
        `Pending.wait` reads: calls sent one after another run at once
        when they go to different replicas (one connection each)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pickled = fr.dumps((args, kwargs or {}), self.gpus)  # a thread waiting for a connection may hold it: threads are few
        try:
            link = self._take(deadline, timeout)
        except BaseException:
            pickled.unsent()
            raise
        io = _FOREVER if deadline is None else fr.Blocking(deadline)
        sent = time.perf_counter()  # the send counts: waking a server that blocked takes time here
        polls = self._polls()
        steady, self._polled_last = polls == self._polled_last, polls
        try:
            link.send_blocking(link.frame(fr.CALL | fr.POLL if polls else fr.CALL, pickled, self.threshold), io)
        except BaseException as e:
            self._discard(link)  # where the exchange stopped is unknown
            pickled.unsent()
            raise self._failure(e, timeout) from None
        return Pending(self, link, polls, steady, sent)

    def _take(self, deadline: float | None, timeout: float | None) -> fr.Link:
        with self._lock:
            while True:
                self._check()
                if self._idle:
                    return self._idle.pop()
                if self._open < self.max_connections:
                    self._open += 1
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CallTimeout(f"all {self.max_connections} connections to the replica (pid {self.address.pid}) stayed busy for {timeout} s")
                self._sleepers += 1
                try:
                    self._free.wait(left)
                finally:
                    self._sleepers -= 1
        try:
            link = fr.Link(self._dial())
        except BaseException:
            self._discard(None)
            raise
        try:
            fr.run(self._greet(link, fr.Blocking(_sooner(deadline, self.connect_timeout)), deadline, timeout))
        except BaseException:
            self._discard(link)
            raise
        return link

    def _polling(self) -> bool:
        """Whether polling is the way that pays now."""
        return self.poll_pays and self.late < QUIET_AFTER and bool(self.spin_s)

    def _polls(self) -> bool:
        """Whether the thread sending a call polls for its answer: the way
        that pays, except two calls in _TRY_OTHER (and one in PROBE_EVERY
        once the answers came late), which measure the other."""
        if not self.spin_s:
            return False
        self._calls += 1
        if self.late >= QUIET_AFTER:
            return self._calls % PROBE_EVERY == 0
        return self._polling() != (self._calls % _TRY_OTHER < 2)

    def _measured(self, polled: bool, seconds: float) -> None:
        polls, blocks = self.round_trips
        (polls if polled else blocks).append(seconds)
        if polls and blocks:
            self.poll_pays = _median(polls) <= _median(blocks)

    def _settle(self, link: fr.Link, frame: fr.Incoming) -> object:
        """The call's outcome from its answer; the link goes back to the
        pool once the answer is unpickled (its receive buffer is reused)."""
        kind = frame.kind
        try:
            value = frame.value()
        except Exception as e:
            raise RemoteFailure(f"the replica's answer could not be unpickled here: {fr.describe(e)}") from e
        finally:
            self._give(link)
        if kind == fr.OK:
            return value
        if kind == fr.ERR and isinstance(value, BaseException):
            raise value
        raise ProtocolError(f"expected an answer, got a frame of kind {kind}")

    # -- asyncio

    async def call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, timeout: float | None = None) -> object:
        """`call` for asyncio: waits on the running loop's reader callbacks,
        no thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = await self.asend(args, kwargs, timeout=timeout)
        try:
            return await pending.wait_async(None if deadline is None else max(0.0, deadline - time.monotonic()), timeout)
        except BaseException:
            pending.discard()  # a timeout, or the awaiting task cancelled
            raise

    async def asend(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *, timeout: float | None = None) -> Pending:
        """`send` for asyncio: waits for a free connection without blocking
        the loop. The arguments are pickled once the call has a connection:
        a flood of coroutines waiting for one holds no pickled copy of
        their arguments (an argument that cannot be pickled fails then)."""
        try:
            async with asyncio.timeout(timeout):
                return await self._asend((args, kwargs or {}), timeout)
        except TimeoutError as e:
            raise self._failure(e, timeout) from None

    async def _asend(self, call: tuple[tuple[Any, ...], dict[str, Any]], timeout: float | None) -> Pending:
        link = await self._take_async()
        try:
            pickled = fr.dumps(call, self.gpus)
        except BaseException:
            if link is None:
                self._discard(None)  # the right to open one, unused
            else:
                self._give(link)
            raise
        try:
            if link is None:
                link = fr.Link(self._dial())
                try:
                    await asyncio.wait_for(self._greet(link, fr.ON_LOOP, None, timeout), self.connect_timeout)
                except TimeoutError:
                    raise Unreachable(f"the replica's fast-path server did not greet within {self.connect_timeout} s") from None
            # A coroutine never polls (it would hold up its loop), but
            # the server may, for the next call, where polling pays.
            await link.send(link.frame(fr.CALL | fr.POLL if self._polling() else fr.CALL, pickled, self.threshold), fr.ON_LOOP)
            return Pending(self, link, False, False, 0.0)
        except BaseException as e:
            self._discard(link)
            pickled.unsent()
            if isinstance(e, asyncio.CancelledError):
                raise  # asyncio.timeout() turns it into its TimeoutError
            raise self._failure(e, timeout) from None

    async def _take_async(self) -> fr.Link | None:
        """An idle connection, or None with the right to open one."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                self._check()
                if self._idle:
                    return self._idle.pop()
                if self._open < self.max_connections:
                    self._open += 1
                    return None
                ready: asyncio.Future[None] = loop.create_future()
                self._waiting.append((loop, ready))
            try:
                await ready
            except BaseException:
                with self._lock:
                    if (loop, ready) in self._waiting:
                        self._waiting.remove((loop, ready))
                    elif not ready.cancelled():
                        self._wake_one()  # woken, but leaving: pass the wake-up on
                raise

    # -- the pool, for both

    def _give(self, link: fr.Link) -> None:
        with self._lock:
            if self.closed or self.gone is not None:
                link.close()
                self._open -= 1
            else:
                self._idle.append(link)
            self._wake_one()

    def _discard(self, link: fr.Link | None) -> None:
        """Close a connection in use (None: one being opened)."""
        if link is not None:
            link.close()
        with self._lock:
            self._open -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        """Wake a thread and a coroutine waiting for a connection (whoever
        loses the race waits again). Called holding `_lock`."""
        if self._sleepers:
            self._free.notify()
        while self._waiting:
            loop, ready = self._waiting.popleft()
            with contextlib.suppress(RuntimeError):  # its loop is closed: try the next
                loop.call_soon_threadsafe(self._deliver, ready)
                return

    def _deliver(self, ready: asyncio.Future[None]) -> None:
        if not ready.done():
            ready.set_result(None)
            return
        with self._lock:  # that waiter was cancelled meanwhile: the next one
            self._wake_one()

    def _wake_all(self) -> None:
        """Called holding `_lock`, after `closed` or `gone` was set."""
        self._free.notify_all()
        waiting, self._waiting = list(self._waiting), collections.deque()
        for loop, ready in waiting:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, ready)

    # -- both

    def _dial(self) -> socket.socket:
        """A connected socket, after checking who listens (uid, pid)."""
        path = self.address.path
        try:
            info = os.stat(os.path.dirname(path))
        except OSError as e:
            raise Unreachable(f"no fast-path server at {path} ({e.strerror}): the replica's process ended, or runs on another machine") from None
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise Unreachable(f"refusing {path}: its directory must belong to this user and be closed to others (0700)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(path)
            pid, uid = fr.peer(sock)
        except OSError as e:
            sock.close()
            raise Unreachable(f"could not connect to the replica's fast-path server at {path}: {fr.describe(e)}") from None
        if uid != os.getuid() or pid != self.address.pid:
            sock.close()
            raise Unreachable(f"{path} is served by pid {pid} (uid {uid}), not by the replica's process {self.address.pid}")
        return sock

    async def _greet(self, link: fr.Link, io: fr.IO, deadline: float | None, timeout: float | None) -> None:
        """Read the server's first words: welcome or refusal. On failure
        the caller discards the link."""
        got = bytearray()
        try:
            while len(got) < len(HELLO):
                io.arm(link, False)
                try:
                    chunk = link.sock.recv(len(HELLO) - len(got), io.flags)
                except BlockingIOError:
                    await io.wait(link.sock, False)
                    continue
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, TimeoutError):
            if deadline is not None and time.monotonic() >= deadline:
                raise CallTimeout(f"the replica (pid {self.address.pid}) did not answer within {timeout} s") from None
            raise Unreachable(f"the replica's fast-path server did not greet within {self.connect_timeout} s") from None
        if bytes(got) == HELLO:
            return
        if bytes(got) == REFUSED:
            raise Unreachable(f"the replica's fast-path server refused this process (pid {os.getpid()}): it serves only the pipeline's caller processes")
        raise Unreachable(f"the replica's fast-path server closed the connection before greeting it (got {bytes(got)!r})")

    def _check(self) -> None:
        if self.gone is not None:
            raise PeerGone(str(self.gone))
        if self.closed:
            raise Unreachable("this fast-path client was closed")

    def _failure(self, e: BaseException, timeout: float | None) -> BaseException:
        """The exception a failed exchange raises; a lost peer marks the
        client gone."""
        if isinstance(e, (CallTimeout, Unreachable)):
            return e
        if isinstance(e, (socket.timeout, TimeoutError)):
            return CallTimeout(f"the replica (pid {self.address.pid}) did not answer within {timeout} s; the call may still be running there")
        if isinstance(e, (PeerGone, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            gone = PeerGone(f"the replica (pid {self.address.pid}) closed its end with a call in flight: its process ended, or its server was closed")
            self._end(gone)
            return gone
        if isinstance(e, OSError):
            return TransportError(f"fast-path call to the replica (pid {self.address.pid}) failed: {fr.describe(e)}")
        return e

    def close(self, remove_server_files: bool = False) -> None:
        """Close the idle connections (those in use close when their call
        ends); with `remove_server_files`, also remove the server's socket
        (for a replica killed before it could). Idempotent."""
        self._end(None)
        if remove_server_files:
            remove_files(self.address.path)

    def _end(self, gone: PeerGone | None) -> None:
        """Mark the client gone (`gone`) or closed (None), close its idle
        connections and wake whoever waits for one (they raise)."""
        with self._lock:
            if gone is None:
                self.closed = True
            elif self.gone is None:
                self.gone = gone
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._wake_all()
        for link in idle:
            link.close()


class Pending:
    """A call sent (`FastClient.send`/`asend`), its answer not read yet.

    Read it once: `wait` from a thread, `wait_async` from the loop it was
    sent on, or `poll` (whether it came; read and dropped if so: for calls
    the caller gave up on, whose replica is busy until they end). A
    CallTimeout leaves the call pending: wait again, poll, or `discard`.
    """

    __slots__ = ("client", "link", "polls", "steady", "sent", "settled", "unknown", "_recv")

    def __init__(self, client: FastClient, link: fr.Link, polls: bool, steady: bool, sent: float) -> None:
        self.client = client
        self.link = link
        self.polls = polls  # `wait` polls before it blocks
        self.steady = steady  # went as the call before it: its round trip measures its way
        self.sent = sent  # time.perf_counter() before the call was sent
        self.settled = False  # answer read, or link discarded
        self.unknown = False  # the read was cancelled under us: whether the call ended is not known
        self._recv: asyncio.Task[fr.Incoming] | None = None

    def wait(self, timeout: float | None = None, told: float | None = None) -> object:
        """The call's result (its exception raised here); CallTimeout if
        none came within `timeout` s (`told`: the timeout the caller gave,
        for the message)."""
        if self.settled:
            raise RuntimeError("this fast-path answer was already read")
        link, client, io = self.link, self.client, _FOREVER
        shown = told if told is not None else timeout  # the timeout a CallTimeout names
        polled = self.polls and _spinner.acquire(blocking=False)
        if polled:
            spun_from = time.perf_counter()
            try:
                spin_until = spun_from + client.spin_s
                if timeout is not None:
                    spin_until = min(spin_until, spun_from + timeout)
                    io = fr.Blocking(time.monotonic() + max(timeout, _REST_S))
                frame = link.recv_spinning(spin_until, io)
            except BaseException as e:
                self._drop()
                raise client._failure(e, told) from None
            finally:
                _spinner.release()
            if frame is not None:
                client.late = 0
                self.settled = True
                if self.steady:
                    client._measured(True, time.perf_counter() - self.sent)
                return client._settle(link, frame)
            client.late += 1
            io = _FOREVER
            if timeout is not None:
                timeout = max(0.0, timeout - (time.perf_counter() - spun_from))
        if timeout is not None:
            # Wait for the answer's first byte without reading: a timeout
            # then leaves the connection whole, the call still pending.
            if not _readable(link.sock, timeout):
                raise CallTimeout(f"the replica (pid {client.address.pid}) did not answer within {shown:g} s; the call may still be running there")
            io = fr.Blocking(time.monotonic() + max(timeout, _REST_S))
        try:
            frame = link.recv_blocking(io)
        except BaseException as e:
            self._drop()
            raise client._failure(e, told) from None
        self.settled = True
        if self.steady and polled == self.polls:
            client._measured(polled, time.perf_counter() - self.sent)
        return client._settle(link, frame)

    async def wait_async(self, timeout: float | None = None, told: float | None = None) -> object:
        """`wait` for asyncio. Cancelling the awaiting task leaves the call
        pending (its answer is still read, for `poll`)."""
        if self.settled:
            raise RuntimeError("this fast-path answer was already read")
        if self._recv is None:
            self._recv = asyncio.ensure_future(self.link.recv(fr.ON_LOOP))
        try:
            async with asyncio.timeout(timeout):
                frame = await asyncio.shield(self._recv)
        except TimeoutError:
            if self._recv.done() and self._recv.exception() is not None:
                raise self._lost(self._recv.exception(), told) from None
            raise CallTimeout(f"the replica (pid {self.client.address.pid}) did not answer within {told if told is not None else timeout:g} s; the call may still be running there") from None
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            raise self._lost(e, told) from None
        self.settled = True
        return self.client._settle(self.link, frame)

    def _lost(self, e: BaseException | None, told: float | None) -> BaseException:
        self._drop()
        return self.client._failure(e if e is not None else PeerGone("no answer"), told)

    def poll(self) -> bool:
        """Whether the call has ended (its answer came, and was read and
        dropped here; or the connection is gone): from any thread. False
        for good once its read was cancelled by its loop ending."""
        if self.unknown:
            return False
        if self.settled:
            return True
        recv = self._recv
        if recv is not None:
            if not recv.done():
                return False
            if recv.cancelled():
                # Its loop ended (asyncio.run cancels what is left): the
                # read stopped, not the call, whose end is now unknown.
                self._drop()
                self.unknown = True
                return False
            self.settled = True
            if recv.exception() is not None:
                self.client._discard(self.link)
                return True
            frame = recv.result()
        else:
            if not _readable(self.link.sock, 0):
                return False
            try:
                frame = self.link.recv_blocking(fr.Blocking(time.monotonic() + _REST_S))
            except BaseException:
                self._drop()
                return True
            self.settled = True
        with contextlib.suppress(Exception):
            self.client._settle(self.link, frame)  # nobody wants the value: only the connection back
        return True

    def discard(self) -> None:
        """Give up on the answer: the connection is closed (the replica
        finishes the call all the same). Idempotent."""
        if self.settled:
            return
        recv = self._recv
        if recv is not None and not recv.done():
            # Its loop closes the connection once the read is cancelled
            # (a socket a loop watches is never closed under it).
            self.settled = True
            link, client = self.link, self.client
            recv.add_done_callback(lambda _: client._discard(link))
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing watches the socket
                recv.get_loop().call_soon_threadsafe(recv.cancel)
                return
            client._discard(link)
            return
        self._drop()

    def _drop(self) -> None:
        if not self.settled:
            self.settled = True
            self.client._discard(self.link)


def _median(samples: collections.deque[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` has something to read (or was closed) within
    `timeout` seconds, without reading it."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))


_FOREVER = fr.Blocking(None)


def _resolve(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _sooner(deadline: float | None, seconds: float) -> float:
    limit = time.monotonic() + seconds
    return limit if deadline is None else min(deadline, limit)
