"""The fast path's wire format and socket I/O (used by fast_transport.py).

A frame is a 16-byte header (kind, version, buffer count, fd count, body
length), one (length, carrier) entry per out-of-band buffer, the pickle
body, then the buffers that travel inline. The body is pickled as Ray
pickles (cloudpickle: classes and functions of `__main__` by value),
protocol 5, with CPU torch tensors through serialization.py, so numpy
arrays and tensors leave their data out of band: a buffer up to the
sender's threshold is sent inline with the frame (one sendmsg, no copy in
user space), a larger one is copied once into a sealed memfd whose fd
rides along (SCM_RIGHTS) and the receiver maps it read-only: zero-copy,
and the kernel frees it with the last mapping, whoever dies first.

Sockets are non-blocking; an operation that would block awaits a
*waiter*. Threads use `blocking(deadline)`, which polls and never
suspends, so the same coroutine runs to completion synchronously (`run`);
asyncio uses `on_loop`, the running loop's reader and writer callbacks.
One implementation of the protocol serves both. This module knows nothing
of servers, clients, pids or replicas.
"""

from __future__ import annotations

import array
import asyncio
import copyreg
import fcntl
import io
import math
import mmap
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
from collections import ChainMap
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

CALL, OK, ERR = 1, 2, 3  # frame kinds
SCRATCH = 64 * 1024  # per-connection receive buffer: small frames land here
_MAX_FDS = 64  # per frame (the kernel allows 253); further large buffers go inline
_MAX_PARTS = 512  # iovecs per sendmsg (IOV_MAX is 1024)
_HEADER = struct.Struct("<BBHHxxQ")  # kind, version, buffers, fds, body length
_ENTRY = struct.Struct("<QQ")  # buffer length, carrier
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_VERSION = 1
_INLINE, _MEMFD = 0, 1


class TransportError(ConnectionError):
    """A failure of the fast path (not of the step)."""


class PeerGone(TransportError):
    """The other end closed with a call in flight: its process died or its
    server was closed. The call's outcome is unknown."""


class ProtocolError(TransportError):
    """A malformed frame (a bug, or a peer that is not this transport)."""


def _reduce_tensor(t: Any) -> tuple[object, ...]:
    from pipeline_ir.backends.serialization import deserialize_tensor, serialize_tensor

    return (deserialize_tensor, (serialize_tensor(t),))


class _Encoder(threading.local):
    """One cloudpickle Pickler per thread, reused: building one costs ~3 us,
    as much as the rest of a small call's pickling."""

    def __init__(self) -> None:
        self.pickler: Any = None
        self.torch = False
        self.busy = False
        self.file = io.BytesIO()
        self.buffers: list[pickle.PickleBuffer] = []

    def _build(self) -> None:
        import ray.cloudpickle

        table: ChainMap[Any, Any] = ChainMap(ray.cloudpickle.CloudPickler.dispatch_table)
        self.torch = "torch" in sys.modules
        if self.torch:
            table = table.new_child({sys.modules["torch"].Tensor: _reduce_tensor})
        cls = type("_Pickler", (ray.cloudpickle.CloudPickler,), {"dispatch_table": table})
        self.pickler = cls(self.file, protocol=5, buffer_callback=self.buffers.append)

    def dumps(self, obj: object) -> tuple[bytes, list[pickle.PickleBuffer]]:
        if self.busy:  # pickling re-entered from a __reduce__: a fresh pickler
            fresh = _Encoder()
            return fresh.dumps(obj)
        if self.pickler is None or (not self.torch and "torch" in sys.modules):
            self._build()
        self.busy = True
        try:
            self.pickler.dump(obj)
            return self.file.getvalue(), list(self.buffers)
        except BaseException:
            self.pickler = None  # its state is unknown after a failed dump
            raise
        finally:
            self.busy = False
            if self.pickler is not None:
                self.pickler.clear_memo()  # the memo holds the objects just pickled
            self.file.seek(0)
            self.file.truncate()
            self.buffers.clear()


_encoder = _Encoder()


@dataclass
class Outgoing:
    """A frame ready to send: its parts (header first) and the memfds to pass."""

    parts: list[Any]
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _memfd(raw: memoryview) -> int:
    """A sealed memfd holding a copy of `raw`."""
    fd = os.memfd_create("pipeline_ir", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.posix_fallocate(fd, 0, raw.nbytes)  # all pages at once, faster than faulting them in
        done = 0
        while done < raw.nbytes:
            done += os.pwrite(fd, raw[done:], done)
        # Sealed: the receiver maps it knowing that it can neither shrink
        # (SIGBUS) nor change under it.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def encode(kind: int, value: object, threshold: int) -> Outgoing:
    body, buffers = _encoder.dumps(value)
    out = Outgoing([b"", body])
    entries = []
    try:
        for buffer in buffers:
            try:
                raw = buffer.raw()
            except BufferError:  # not contiguous: one copy
                raw = memoryview(bytes(buffer))
            if raw.nbytes > threshold and len(out.fds) < _MAX_FDS:
                out.fds.append(_memfd(raw))
                entries.append(_ENTRY.pack(raw.nbytes, _MEMFD))
            else:
                out.parts.append(raw)
                entries.append(_ENTRY.pack(raw.nbytes, _INLINE))
    except BaseException:
        out.close()
        raise
    out.parts[0] = _HEADER.pack(kind, _VERSION, len(entries), len(out.fds), len(body)) + b"".join(entries)
    if len(out.parts) > _MAX_PARTS:
        out.parts = [out.parts[0], body, b"".join(out.parts[2:])]
    return out


@dataclass
class Incoming:
    kind: int
    body: memoryview
    buffers: list[Any]

    def value(self) -> object:
        return pickle.loads(self.body, buffers=self.buffers)


def _read_frame(scratch: bytearray, fds: list[int]) -> Generator[memoryview, int, Incoming]:
    """Receives one frame: yields where to read next, is sent how many
    bytes arrived. The driver receives the frame's fds with its first read
    (they come with its first byte) into `fds`; they are mapped here."""
    buf, got = scratch, 0
    need = _HEADER.size
    stage = 0
    while True:
        if need > len(buf):
            bigger = bytearray(need)
            bigger[:got] = buf[:got]
            buf = bigger
        while got < need:
            n = yield memoryview(buf)[got:]
            if n == 0:
                raise PeerGone("the connection closed in the middle of a frame")
            got += n
        if stage == 0:
            kind, version, nbuf, nfd, body_len = _HEADER.unpack_from(buf)
            if version != _VERSION or nfd > _MAX_FDS or nfd != len(fds):
                raise ProtocolError(f"bad frame header (version {version}, {nfd} fds announced, {len(fds)} received)")
            table = _HEADER.size + nbuf * _ENTRY.size
            need, stage = table, 1
        elif stage == 1:
            entries = [_ENTRY.unpack_from(buf, _HEADER.size + i * _ENTRY.size) for i in range(nbuf)]
            if sum(carrier == _MEMFD for _, carrier in entries) != nfd:
                raise ProtocolError("frame: the buffer table does not match the fds received")
            need = table + body_len + sum(length for length, carrier in entries if carrier == _INLINE)
            stage = 2
        else:
            break
    if got != need:
        raise ProtocolError(f"frame: {got - need} bytes past its end")
    view = memoryview(buf)
    own = buf is not scratch  # scratch is reused: copy out what must outlive this call
    buffers: list[Any] = []
    offset = table + body_len
    for length, carrier in entries:
        if carrier == _MEMFD:
            fd = fds.pop(0)
            try:
                buffers.append(mmap.mmap(fd, length, access=mmap.ACCESS_READ) if length else b"")
            finally:
                os.close(fd)
        else:
            piece = view[offset : offset + length]
            buffers.append(piece.toreadonly() if own else piece.tobytes())
            offset += length
    return Incoming(kind, view[table : table + body_len], buffers)


_ANCILLARY = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)

Waiter = Callable[[socket.socket, bool], Coroutine[Any, Any, None]]


def blocking(deadline: float | None) -> Waiter:
    async def wait(sock: socket.socket, write: bool) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise socket.timeout("timed out")
        poller = select.poll()
        poller.register(sock, select.POLLOUT if write else select.POLLIN)
        if not poller.poll(None if left is None else max(1, math.ceil(left * 1000))):
            raise socket.timeout("timed out")

    return wait


async def on_loop(sock: socket.socket, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    if write:
        loop.add_writer(fd, _wake, ready)
    else:
        loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine whose waiters never suspend (`blocking`)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()
    raise RuntimeError("a blocking waiter suspended")  # cannot happen: blocking never yields


def _take_fds(ancdata: list[tuple[int, int, bytes]], flags: int, fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    if flags & socket.MSG_CTRUNC:
        raise ProtocolError("frame: more fds than announced (truncated)")


async def recv(sock: socket.socket, scratch: bytearray, wait: Waiter) -> Incoming:
    """One frame from `sock`. Its fds come with its first byte, hence
    recvmsg for the first read."""
    fds: list[int] = []
    reader = _read_frame(scratch, fds)
    try:
        view, first = next(reader), True
        while True:
            try:
                if first:
                    n, ancdata, flags, _ = sock.recvmsg_into([view], _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
                    _take_fds(ancdata, flags, fds)
                else:
                    n = sock.recv_into(view)
            except BlockingIOError:
                await wait(sock, False)
                continue
            first = False
            view = reader.send(n)
    except StopIteration as stop:
        frame: Incoming = stop.value
        return frame
    finally:
        _close_all(fds)  # those not mapped: an error on the way


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


async def send(sock: socket.socket, out: Outgoing, wait: Waiter) -> None:
    try:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out.fds))] if out.fds else []
        while True:
            try:
                sent = sock.sendmsg(out.parts, ancillary, socket.MSG_NOSIGNAL)
                break
            except BlockingIOError:
                await wait(sock, True)
        out.close()  # the receiver holds its own copies of the fds once sent
        for rest in _unsent(out.parts, sent):
            while rest:
                try:
                    rest = rest[sock.send(rest, socket.MSG_NOSIGNAL) :]
                except BlockingIOError:
                    await wait(sock, True)
    finally:
        out.close()


def _unsent(parts: list[Any], sent: int) -> Iterable[memoryview]:
    for part in parts:
        view = memoryview(part).cast("B")
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        yield view[sent:]
        sent = 0


def peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel saw it at
    connect (not anything the peer says)."""
    pid, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid


def describe(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
