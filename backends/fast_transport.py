"""Same-node fast path: calls from the caller's process to one replica actor
over a Unix socket, instead of a Ray actor task.

A Ray actor task costs the better part of a millisecond; a round trip over
a Unix socket to a thread blocked in `recv` costs tens of microseconds and
no CPU while idle (docs/design.md, "Fast path"). This module is that
transport and nothing else: the replica pool (pool.py) decides when
to use it and falls back to Ray actor calls when it cannot. The wire
format and the socket I/O are in fast_frames.py.

Replica side, `FastServer`: a thread blocked in `accept` on a socket in a
fresh 0700 directory (the socket itself 0600), and one thread per accepted
connection blocked in `recvmsg`; no spinning. Each call runs
`handler(*args, **kwargs)` and sends back its result or its exception.

Caller side, `FastClient`: a small pool of connections (one call in flight
per connection), used from any number of threads (`call`) and from asyncio
(`call_async`, on the running loop's reader callbacks: no thread per
call). Every blocking call takes a timeout; connecting always has one.

Security: the server reads nothing from a peer before checking its
credentials as the kernel recorded them at connect (SO_PEERCRED): the same
uid as the server AND a pid in the set of allowed caller pids (the
pipeline's driver). Anyone else is told "refused" and disconnected, so
nothing they send is ever unpickled. The client checks the server the same
way (uid, and the pid the replica reported through Ray) before it reads a
byte from it.

Errors: an exception raised by the handler comes back and is raised as it
is (the replica's StepError); one that cannot be pickled, or a result that
cannot, comes back as a RemoteFailure naming it. A peer that dies or closes
with a call in flight raises PeerGone; a server that cannot be reached (no
socket, refused, not greeting) raises Unreachable; both are
ConnectionErrors, which the pool maps to "replica died" and "use Ray
calls". Linux only (`supported()`); same node only (`same_node()`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import select
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pipeline_ir.backends import fast_frames as fr
from pipeline_ir.backends.fast_frames import PeerGone, ProtocolError, TransportError

__all__ = [
    "Address", "CallTimeout", "FastClient", "FastServer", "PeerGone", "Pending", "ProtocolError", "RemoteFailure",
    "TransportError", "Unreachable", "remove_files", "same_node", "supported", "this_node",
]

# Buffers larger than this go through a shared-memory segment, smaller ones
# inline in the frame (benchmarks/bench_fastpath.py measures both at 1 MB:
# with a reused segment, 1 MB costs half of inline; at 256 KiB they tie).
THRESHOLD = 256 * 1024
MAX_CONNECTIONS = 8  # per client: the replica runs one call at a time anyway
CONNECT_TIMEOUT_S = 10.0
# Once an answer's first byte is in, how long the rest may take (a large
# frame comes in pieces): past it the connection is dropped.
_REST_S = 10.0
_HELLO = b"PIRFAST1"  # the server's greeting once a peer is admitted...
_REFUSED = b"PIRFNO!!"  # ...or its only words to a refused one
_PREFIX = "pipeline_ir-"


class Unreachable(TransportError):
    """No connection could be made: no server at the path, or it refused
    this process. Calls can still go to the replica through Ray."""


class CallTimeout(TimeoutError):
    """No answer within the call's timeout; the step may still be running."""


class RemoteFailure(Exception):
    """Stands in for an exception or result from the other side that could
    not be pickled; the message says what it was and why."""


def supported() -> bool:
    """Whether this platform has what the transport needs (Linux: Unix
    sockets, SO_PEERCRED, memfd)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_PEERCRED") and hasattr(os, "memfd_create")


def this_node() -> str:
    """This process's node: its Ray node id when Ray is connected, else the
    machine's boot id (for use outside Ray)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    with open("/proc/sys/kernel/random/boot_id") as f:
        return "boot:" + f.read().strip()


@dataclass(frozen=True)
class Address:
    """Where a server listens, as its replica reports it to the caller."""

    path: str
    pid: int  # the server's process
    node: str  # this_node() where it runs


def same_node(address: Address) -> bool:
    """Whether this process can use the transport to reach `address` (else
    the pool keeps Ray actor calls)."""
    return supported() and address.node == this_node()


def remove_files(path: str) -> None:
    """Remove a server's socket and its directory (the pool calls this after
    killing a replica, whose server had no chance to)."""
    directory, name = os.path.split(path)
    if name != "s" or not os.path.basename(directory).startswith(_PREFIX):
        raise ValueError(f"{path!r} is not a fast-path socket")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(directory)


def _socket_directory() -> str:
    """A fresh directory only this user can open (mkdtemp makes it 0700,
    failing rather than reusing an existing one)."""
    base = tempfile.gettempdir()
    if len(base) > 80:  # a socket path is at most 107 bytes
        base = "/tmp"
    return tempfile.mkdtemp(prefix=_PREFIX, dir=base)


# -- replica side -------------------------------------------------------------


def _not_sent(args: tuple[Any, ...], error: Exception) -> BaseException:
    return RemoteFailure(f"the result could not be pickled back to the caller: {fr.describe(error)}")


class FastServer:
    """Serves `handler(*args, **kwargs)` to the allowed caller processes.

    `allowed_pids`: the processes that may connect (the pipeline's driver;
    `allow()` adds more). `on_unsendable(args, error)` gives the exception to
    send back when a result cannot be pickled (the replica passes one that
    builds the StepError naming the step).
    """

    def __init__(
        self,
        handler: Callable[..., object],
        allowed_pids: Iterable[int],
        *,
        threshold: int = THRESHOLD,
        on_unsendable: Callable[[tuple[Any, ...], Exception], BaseException] = _not_sent,
    ) -> None:
        self.handler = handler
        self.threshold = threshold
        self.on_unsendable = on_unsendable
        self.refused = 0  # peers turned away (tests and logs read it)
        self.address: Address | None = None
        self._allowed = set(allowed_pids)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False

    def start(self) -> Address:
        """Listen, and serve from background threads; returns the address
        to hand to the caller."""
        path = os.path.join(_socket_directory(), "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)  # until now the 0700 directory alone kept others out
            listener.listen(64)
        except BaseException:
            listener.close()
            remove_files(path)
            raise
        self._listener = listener
        self.address = Address(path, os.getpid(), this_node())
        threading.Thread(target=self._accept, args=(listener,), name="pipeline_ir-fast-accept", daemon=True).start()
        return self.address

    def allow(self, pid: int) -> None:
        """Let process `pid` (on this node, same user) connect too."""
        with self._lock:
            self._allowed.add(pid)

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    if self._closed:
                        return
                    time.sleep(0.05)  # out of fds, say: try again later, without spinning
                    continue
                # The kernel's record of who connected, checked before a
                # single byte is read from the peer.
                try:
                    pid, uid = fr.peer(conn)
                except OSError:
                    conn.close()
                    continue
                with self._lock:
                    admitted = uid == os.getuid() and pid in self._allowed and not self._closed
                    if admitted:
                        self._conns.add(conn)
                    else:
                        self.refused += 1
                if admitted:
                    threading.Thread(target=self._serve, args=(conn,), name="pipeline_ir-fast-conn", daemon=True).start()
                    continue
                with contextlib.suppress(OSError):
                    conn.send(_REFUSED, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        link = fr.Link(conn)
        io = fr.Blocking(None)
        try:
            link.send_blocking(fr.Outgoing([_HELLO], len(_HELLO)), io)
            while True:
                frame = link.recv_blocking(io)
                kind, pickled = self._answer(frame)
                # The arguments are gone with the frame: their segments are
                # released now, and the notices ride on this very reply.
                del frame
                link.send_blocking(self._frame(link, kind, pickled), io)
        except ProtocolError as e:
            print(f"pipeline_ir fast path: dropped a connection: {e}", file=sys.stderr)
        except OSError:
            pass  # the caller went away (PeerGone is an OSError too), or close()
        finally:
            with self._lock:
                self._conns.discard(conn)
            link.close()

    def _answer(self, frame: fr.Incoming) -> tuple[int, fr.Pickled]:
        try:
            if frame.kind != fr.CALL:
                raise ProtocolError(f"expected a call, got a frame of kind {frame.kind}")
            call: tuple[tuple[Any, ...], dict[str, Any]] = frame.value()  # type: ignore[assignment]
            args, kwargs = call
        except Exception as e:
            return self._pickled(fr.ERR, RemoteFailure(f"the call's arguments could not be unpickled in the replica: {fr.describe(e)}"), ())
        try:
            result, kind = self.handler(*args, **kwargs), fr.OK
        except Exception as e:
            result, kind = e, fr.ERR
        return self._pickled(kind, result, args)

    def _pickled(self, kind: int, value: object, args: tuple[Any, ...]) -> tuple[int, fr.Pickled]:
        try:
            return kind, fr.dumps(value)
        except Exception as e:
            if kind == fr.OK:
                substitute = self.on_unsendable(args, e)
            else:
                assert isinstance(value, BaseException)
                substitute = RemoteFailure(f"{fr.describe(value)} (the exception could not be pickled back: {fr.describe(e)})")
        try:
            return fr.ERR, fr.dumps(substitute)
        except Exception as e:
            return fr.ERR, fr.dumps(RemoteFailure(f"{fr.describe(substitute)} (could not be pickled either: {fr.describe(e)})"))

    def _frame(self, link: fr.Link, kind: int, pickled: fr.Pickled) -> fr.Outgoing:
        try:
            return link.frame(kind, pickled, self.threshold)
        except OSError as e:  # no memory for a segment, say: the call failed, not the connection
            return link.frame(fr.ERR, fr.dumps(RemoteFailure(f"the result could not be sent: {fr.describe(e)}")), self.threshold)

    def close(self) -> None:
        """Stop accepting, end every connection (their callers see PeerGone)
        and remove the socket; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        # shutdown() wakes the threads blocked on these sockets; each closes
        # its own (closing under a blocked thread could let it use a reused fd).
        for sock in ([self._listener] if self._listener else []) + conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self.address is not None:
            remove_files(self.address.path)


# -- caller side --------------------------------------------------------------


class FastClient:
    """Calls a FastServer from this process, from threads (`call`) and from
    asyncio (`call_async`, any number of event loops), over at most
    `max_connections` connections in all. A connection is a plain socket
    between calls, so threads and loops share the idle ones.

    A PeerGone marks the client gone: every later call raises it at once
    (the replica is dead; the pool replaces it and makes a new client).
    """

    def __init__(self, address: Address, *, max_connections: int = MAX_CONNECTIONS, threshold: int = THRESHOLD, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.address = address
        self.max_connections = max_connections
        self.threshold = threshold
        self.connect_timeout = connect_timeout
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
        pickled = fr.dumps((args, kwargs or {}))
        link = self._take(deadline, timeout)
        io = _FOREVER if deadline is None else fr.Blocking(deadline)
        try:
            link.send_blocking(link.frame(fr.CALL, pickled, self.threshold), io)
        except BaseException as e:
            self._discard(link)  # where the exchange stopped is unknown
            raise self._failure(e, timeout) from None
        return Pending(self, link)

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
        the loop."""
        pickled = fr.dumps((args, kwargs or {}))
        try:
            async with asyncio.timeout(timeout):
                return await self._asend(pickled, timeout)
        except TimeoutError as e:
            raise self._failure(e, timeout) from None

    async def _asend(self, pickled: fr.Pickled, timeout: float | None) -> Pending:
        link = await self._take_async()
        try:
            if link is None:
                link = fr.Link(self._dial())
                try:
                    await asyncio.wait_for(self._greet(link, fr.ON_LOOP, None, timeout), self.connect_timeout)
                except TimeoutError:
                    raise Unreachable(f"the replica's fast-path server did not greet within {self.connect_timeout} s") from None
            await link.send(link.frame(fr.CALL, pickled, self.threshold), fr.ON_LOOP)
            return Pending(self, link)
        except BaseException as e:
            self._discard(link)
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
            while len(got) < len(_HELLO):
                io.arm(link, False)
                try:
                    chunk = link.sock.recv(len(_HELLO) - len(got), io.flags)
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
        if bytes(got) == _HELLO:
            return
        if bytes(got) == _REFUSED:
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
            self._mark_gone(gone)
            return gone
        if isinstance(e, OSError):
            return TransportError(f"fast-path call to the replica (pid {self.address.pid}) failed: {fr.describe(e)}")
        return e

    def _mark_gone(self, gone: PeerGone) -> None:
        with self._lock:
            if self.gone is None:
                self.gone = gone
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._wake_all()
        for link in idle:
            link.close()

    def close(self, remove_server_files: bool = False) -> None:
        """Close the idle connections (those in use close when their call
        ends); with `remove_server_files`, also remove the server's socket
        (for a replica killed before it could). Idempotent."""
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._wake_all()
        for link in idle:
            link.close()
        if remove_server_files:
            remove_files(self.address.path)


class Pending:
    """A call sent (`FastClient.send`/`asend`), its answer not read yet.

    Read it once: `wait` from a thread, `wait_async` from the loop it was
    sent on, or `poll` (whether it came; read and dropped if so: for calls
    the caller gave up on, whose replica is busy until they end). A
    CallTimeout leaves the call pending: wait again, poll, or `discard`.
    """

    __slots__ = ("client", "link", "settled", "unknown", "_recv")

    def __init__(self, client: FastClient, link: fr.Link) -> None:
        self.client = client
        self.link = link
        self.settled = False  # answer read, or link discarded
        self.unknown = False  # the read was cancelled under us: whether the call ended is not known
        self._recv: asyncio.Task[fr.Incoming] | None = None

    def wait(self, timeout: float | None = None, told: float | None = None) -> object:
        """The call's result (its exception raised here); CallTimeout if
        none came within `timeout` s (`told`: the timeout the caller gave,
        for the message)."""
        if self.settled:
            raise RuntimeError("this fast-path answer was already read")
        link, io = self.link, _FOREVER
        if timeout is not None:
            # Wait for the answer's first byte without reading: a timeout
            # then leaves the connection whole, the call still pending.
            if not _readable(link.sock, timeout):
                raise CallTimeout(f"the replica (pid {self.client.address.pid}) did not answer within {told if told is not None else timeout:g} s; the call may still be running there")
            io = fr.Blocking(time.monotonic() + max(timeout, _REST_S))
        try:
            frame = link.recv_blocking(io)
        except BaseException as e:
            self._drop()
            raise self.client._failure(e, told) from None
        self.settled = True
        return self.client._settle(link, frame)

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
