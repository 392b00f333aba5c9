"""The fast path's wire format and socket I/O (used by fast_transport.py).

A frame is a 16-byte header (kind, version, buffer count, fd count, notice
count, body length), one (length, carrier, segment, offset) entry per
out-of-band buffer, the notices (fast_segments.py), the pickle body, then
the buffers that travel inline. The body is pickled as Ray pickles (cloudpickle:
classes and functions of `__main__` by value), protocol 5, with CPU torch
tensors through serialization.py, so numpy arrays and tensors leave their
data out of band: a buffer up to the threshold travels inline with the
frame (one sendmsg, no copy in user space), a larger one is copied once
into a shared-memory segment that the receiver maps read-only
(fast_segments.py): zero-copy on arrival. A buffer that arrived in a
segment and is sent on (the caller relaying a value between replicas)
is forwarded in that segment, without a copy.

A `Link` is one end of a connection with that state. A thread sends and
receives with `Blocking(deadline)`: the socket blocks in the kernel (one
recvmsg, no poll), bounded by SO_RCVTIMEO/SO_SNDTIMEO. asyncio uses
`ON_LOOP`: each call is MSG_DONTWAIT and waits on the running loop's
reader (writer) callback. Both take the same steps; the uncommon rest of
a frame (partial writes, large frames) is one coroutine, which a thread
runs to completion synchronously (`run`: with `Blocking` it never
suspends). This module knows nothing of servers, clients, pids or
replicas.
"""

from __future__ import annotations

import array
import asyncio
import io
import os
import pickle
import socket
import struct
import sys
import threading
import time
from collections import ChainMap
from collections.abc import Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pipeline_ir.backends import cuda_ipc
from pipeline_ir.backends.fast_segments import DROP, Inbox, Outbox

T = TypeVar("T")

CALL, OK, ERR = 1, 2, 3  # frame kinds
# A flag on a CALL's kind: the caller polls for this answer, and asks the
# server to poll for its next call too (docs/design.md, "Spin, then block").
POLL = 0x80
SCRATCH = 64 * 1024  # per-connection receive buffer: small frames land here
_MAX_FDS = 64  # per frame (the kernel allows 253); further large buffers go inline
_MAX_PARTS = 512  # iovecs per sendmsg (IOV_MAX is 1024)
_HEADER = struct.Struct("<BBHHHQ")  # kind, version, buffers, fds, notices, body length
_ENTRY = struct.Struct("<QIIQ")  # buffer length, carrier, segment id, offset in the segment
_NOTICE = struct.Struct("<I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_TIMEVAL = struct.Struct("ll")  # struct timeval: seconds, microseconds
# socket's flags are IntFlags, whose | and & run Python code: plain ints here.
_NOSIGNAL, _DONTWAIT = int(socket.MSG_NOSIGNAL), int(socket.MSG_DONTWAIT)
_CLOEXEC, _CTRUNC = int(socket.MSG_CMSG_CLOEXEC), int(socket.MSG_CTRUNC)
_VERSION = 2
# Carriers. A new segment's fd comes with the frame, and so does a
# forwarded one's: a segment of a third process's that this end maps
# (fast_segments.py), sent on as it is.
_INLINE, _SEGMENT, _NEW_SEGMENT, _FORWARDED = 0, 1, 2, 3
_WITH_FD = (_NEW_SEGMENT, _FORWARDED)


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
    """One cloudpickle Pickler per thread, reused: building one costs more
    than a small call's pickling. (The C pickler would save a fraction of
    a microsecond, not worth telling apart what cloudpickle ships by
    value.)"""

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
            return _Encoder().dumps(obj)
        if self.pickler is None or (not self.torch and "torch" in sys.modules):
            self._build()
        pickler, file, buffers = self.pickler, self.file, self.buffers
        self.busy = True
        try:
            pickler.dump(obj)
            return file.getvalue(), buffers[:]
        except BaseException:
            self.pickler = None  # cloudpickle keeps Python-side state: not trusted after a failure
            raise
        finally:
            self.busy = False
            pickler.clear_memo()  # the memo holds the objects just pickled
            file.seek(0)
            file.truncate()
            buffers.clear()


_encoder = _Encoder()


@dataclass
class Pickled:
    """A value pickled: the body, the buffers it left out of band, and the
    CUDA IPC exports it holds (to give back if it is never sent)."""

    body: bytes
    buffers: list[pickle.PickleBuffer]
    exports: tuple[cuda_ipc.Export, ...] = ()

    def unsent(self) -> None:
        """This value will not be sent: give back its CUDA IPC exports,
        once (a server that could not build the frame gives them back,
        then may fail to send the error that replaces it)."""
        if self.exports:
            exports, self.exports = self.exports, ()
            cuda_ipc.release(exports)


_NO_GPUS: frozenset[str] = frozenset()


def dumps(value: object, gpus: frozenset[str] = _NO_GPUS) -> Pickled:
    """Pickle `value` as the fast path does (see the module docstring);
    `gpus`: the receiver's GPUs, to which CUDA tensors go by CUDA IPC."""
    if not gpus:
        return Pickled(*_encoder.dumps(value))
    state = cuda_ipc.sending
    outer = state.peer, state.exports  # put back after: a dumps nested in a __reduce__ keeps the outer one's
    exports: list[cuda_ipc.Export] = []
    state.peer, state.exports = gpus, exports
    try:
        body, buffers = _encoder.dumps(value)
    except BaseException:
        cuda_ipc.release(exports)
        raise
    finally:
        state.peer, state.exports = outer
    return Pickled(body, buffers, tuple(exports))


@dataclass
class Outgoing:
    """A frame ready to send: its parts (header first) and the fds of the
    new segments it carries."""

    parts: list[Any]
    size: int  # bytes in all parts
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        if self.fds:
            _close_all(self.fds)


@dataclass
class Incoming:
    """A frame received; `value()` unpickles its body over its buffers."""

    kind: int
    body: memoryview
    buffers: list[Any]

    def value(self) -> object:
        return pickle.loads(self.body, buffers=self.buffers)


class Link:
    """One end of a connection: the socket, a receive buffer for small
    frames, the segments this end sends from and the peer's it maps. One
    exchange at a time (the client pools links; the server has a thread
    per link)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)  # ON_LOOP asks for non-blocking calls one by one
        self.sock = sock
        self.armed = False  # a timeout is set on the socket (Blocking.arm)
        self.scratch = bytearray(SCRATCH)
        self._scratch = memoryview(self.scratch)
        self.outbox = Outbox()
        self.inbox = Inbox()

    def frame(self, kind: int, pickled: Pickled, threshold: int) -> Outgoing:
        """The frame for `pickled`: buffers over `threshold` bytes go into
        segments, the rest inline; the notices due ride along."""
        body = pickled.body
        if not pickled.buffers and not self.inbox.due() and not self.outbox.due():
            return Outgoing([_HEADER.pack(kind, _VERSION, 0, 0, 0, len(body)), body], _HEADER.size + len(body))
        out = Outgoing([b"", body], 0)
        entries = []
        placed: list[tuple[int, int | None]] = []
        try:
            for buffer in pickled.buffers:
                try:
                    raw = buffer.raw()
                except BufferError:  # not contiguous: one copy
                    raw = memoryview(bytes(buffer))
                if raw.nbytes > threshold and len(out.fds) < _MAX_FDS:
                    forwarded = self.outbox.forward(raw)
                    if forwarded is not None:
                        segment, fd, offset = forwarded
                        placed.append((segment, fd))
                        out.fds.append(fd)
                        entries.append(_ENTRY.pack(raw.nbytes, _FORWARDED, segment, offset))
                        continue
                    segment, new = self.outbox.place(raw)
                    placed.append((segment, new))
                    if new is not None:
                        out.fds.append(new)
                    entries.append(_ENTRY.pack(raw.nbytes, _SEGMENT if new is None else _NEW_SEGMENT, segment, 0))
                else:
                    out.parts.append(raw)
                    entries.append(_ENTRY.pack(raw.nbytes, _INLINE, 0, 0))
        except BaseException:
            out.close()
            self.outbox.unplace(placed)
            raise
        notices = self.inbox.notices() + self.outbox.notices()
        head = _HEADER.pack(kind, _VERSION, len(entries), len(out.fds), len(notices), len(body))
        out.parts[0] = head + b"".join(entries) + b"".join(_NOTICE.pack(n) for n in notices)
        out.size = sum(memoryview(part).nbytes for part in out.parts)
        if len(out.parts) > _MAX_PARTS:
            out.parts = [out.parts[0], body, b"".join(out.parts[2:])]
        return out

    # Sending and receiving: a thread calls the *_blocking methods, which
    # do the common case (a frame in one sendmsg, a small frame in one
    # recvmsg) without a coroutine; asyncio awaits send and recv. Both go
    # through the same steps, and the rare rest through one coroutine.

    def send_blocking(self, out: Outgoing, io: Blocking) -> None:
        """Send a frame from a thread; its fds are closed, sent or not."""
        try:
            try:
                sent = self._send_first(out, io)
            except BlockingIOError:  # a blocking call's timeout ran out
                raise socket.timeout("timed out") from None
            if sent < out.size:
                run(self._send_rest(out, sent, io))
        finally:
            if out.fds:
                out.close()

    async def send(self, out: Outgoing, io: IO) -> None:
        """`send_blocking` for asyncio."""
        try:
            while True:
                try:
                    sent = self._send_first(out, io)
                    break
                except BlockingIOError:
                    await io.wait(self.sock, True)
            if sent < out.size:
                await self._send_rest(out, sent, io)
        finally:
            if out.fds:
                out.close()

    def _send_first(self, out: Outgoing, io: IO) -> int:
        """The frame's first sendmsg, which carries its fds: bytes sent."""
        io.arm(self, True)
        if not out.fds:
            return self.sock.sendmsg(out.parts, (), io.flags | _NOSIGNAL)
        sent = self.sock.sendmsg(out.parts, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out.fds))], io.flags | _NOSIGNAL)
        out.close()  # the receiver holds its own copies once sent
        return sent

    async def _send_rest(self, out: Outgoing, sent: int, io: IO) -> None:
        for rest in _unsent(out.parts, sent):
            while rest:
                io.arm(self, True)
                try:
                    rest = rest[self.sock.send(rest, io.flags | _NOSIGNAL) :]
                except BlockingIOError:
                    await io.wait(self.sock, True)

    def recv_blocking(self, io: Blocking) -> Incoming:
        """One frame, from a thread."""
        fds: list[int] = []
        try:
            try:
                n = self._recv_first(fds, io)
            except BlockingIOError:  # a blocking call's timeout ran out
                raise socket.timeout("timed out") from None
            frame = self._whole(n)
            return frame if frame is not None else run(self._recv_rest(fds, n, io))
        finally:
            if fds:
                _close_all(fds)  # those not mapped: an error on the way

    def recv_spinning(self, until: float, io: Blocking) -> Incoming | None:
        """The frame if its first bytes arrive before `until` (a
        time.perf_counter() value), polling without blocking until then;
        None if none came (nothing read). The rest of a frame that started
        is read with `io`."""
        fds: list[int] = []
        clock = time.perf_counter
        try:
            while True:
                try:
                    n = self._recv_first(fds, ON_LOOP)  # MSG_DONTWAIT, nothing else of the loop
                    break
                except BlockingIOError:
                    if clock() >= until:
                        return None
                    # Where the peer waits for this very CPU (a busy
                    # machine), let it run: its answer is what we wait for.
                    os.sched_yield()
            frame = self._whole(n)
            return frame if frame is not None else run(self._recv_rest(fds, n, io))
        finally:
            if fds:
                _close_all(fds)

    async def recv(self, io: IO) -> Incoming:
        """`recv_blocking` for asyncio."""
        fds: list[int] = []
        try:
            while True:
                try:
                    n = self._recv_first(fds, io)
                    break
                except BlockingIOError:
                    await io.wait(self.sock, False)
            frame = self._whole(n)
            return frame if frame is not None else await self._recv_rest(fds, n, io)
        finally:
            if fds:
                _close_all(fds)

    def _recv_first(self, fds: list[int], io: IO) -> int:
        """The frame's first read, into the scratch buffer: its fds come
        with its first byte, hence recvmsg."""
        io.arm(self, False)
        n, ancdata, flags, _ = self.sock.recvmsg_into([self._scratch], _ANCILLARY, io.flags | _CLOEXEC)
        if ancdata or flags & _CTRUNC:
            _take_fds(ancdata, flags, fds)
        return n

    def _whole(self, n: int) -> Incoming | None:
        """The frame, if the first read holds all of it and it has no buffers
        or notices (a small call, the common case)."""
        if n < _HEADER.size:
            return None
        kind, version, nbuf, nfd, nnotice, body_len = _HEADER.unpack_from(self.scratch)
        if n != _HEADER.size + body_len or version != _VERSION or nbuf or nfd or nnotice:
            return None
        return Incoming(kind, self._scratch[_HEADER.size : n], [])

    async def _recv_rest(self, fds: list[int], n: int, io: IO) -> Incoming:
        reader = self._read_frame(fds)
        next(reader)  # it reads into the scratch buffer first: where n bytes already are
        try:
            view = reader.send(n)
            while True:
                io.arm(self, False)
                try:
                    n = self.sock.recv_into(view, 0, io.flags)
                except BlockingIOError:
                    await io.wait(self.sock, False)
                    continue
                view = reader.send(n)
        except StopIteration as stop:
            frame: Incoming = stop.value
            return frame

    def _read_frame(self, fds: list[int]) -> Generator[memoryview, int, Incoming]:
        """Receives one frame: yields where to read next and is sent how
        many bytes arrived (`recv` drives it; the fds land in `fds`)."""
        buf, got = self.scratch, 0
        for stage in range(3):
            if stage == 0:
                need = _HEADER.size
            elif stage == 1:
                kind, version, nbuf, nfd, nnotice, body_len = _HEADER.unpack_from(buf)
                if version != _VERSION or nfd > _MAX_FDS or nfd != len(fds):
                    raise ProtocolError(f"bad frame header (version {version}, {nfd} fds announced, {len(fds)} received)")
                table = _HEADER.size + nbuf * _ENTRY.size
                start = table + nnotice * _NOTICE.size
                need = start
            else:
                entries = [_ENTRY.unpack_from(buf, _HEADER.size + i * _ENTRY.size) for i in range(nbuf)]
                if sum(carrier in _WITH_FD for _, carrier, _, _ in entries) != nfd:
                    raise ProtocolError("frame: its buffer table does not match the fds received")
                need = start + body_len + sum(length for length, carrier, _, _ in entries if carrier == _INLINE)
            if need > len(buf):
                bigger = bytearray(need)
                bigger[:got] = buf[:got]
                buf = bigger
            while got < need:
                n = yield memoryview(buf)[got:]
                if n == 0:
                    raise PeerGone("the connection closed at or in the middle of a frame")
                got += n
        if got != need:
            raise ProtocolError(f"frame: {got - need} bytes past its end")
        for i in range(nnotice):
            (notice,) = _NOTICE.unpack_from(buf, table + i * _NOTICE.size)
            if notice & DROP:
                self.inbox.forget(notice & ~DROP)
            else:
                self.outbox.released(notice)
        view = memoryview(buf)
        own = buf is not self.scratch  # the scratch buffer is reused: copy out what must outlive this frame
        buffers: list[Any] = []
        offset = start + body_len
        for length, carrier, segment, at in entries:
            if carrier == _INLINE:
                piece = view[offset : offset + length]
                buffers.append(piece.toreadonly() if own else piece.tobytes())
                offset += length
                continue
            if carrier in _WITH_FD:
                fd = fds.pop(0)
                try:
                    self.inbox.learn(segment, fd)
                finally:
                    os.close(fd)
            try:
                buffers.append(self.inbox.buffer(segment, length, at))
            except KeyError as e:
                raise ProtocolError(f"frame: {e}") from None
        return Incoming(kind, view[start : start + body_len], buffers)

    def close(self) -> None:
        self.sock.close()
        self.outbox.close()
        self.inbox.close()


_ANCILLARY = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)

class IO(Protocol):
    """How a Link's send and recv wait for the socket."""

    flags: int  # added to every send and recv

    def arm(self, link: Link, write: bool) -> None:
        """Called before each send (write) or recv."""

    async def wait(self, sock: socket.socket, write: bool) -> None:
        """Called when a call would block (EAGAIN)."""


class Blocking:
    """A thread's waits: blocking calls, bounded by `deadline` (None:
    none) through the socket's SO_SNDTIMEO / SO_RCVTIMEO."""

    flags = 0

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def arm(self, link: Link, write: bool) -> None:
        option = socket.SO_SNDTIMEO if write else socket.SO_RCVTIMEO
        if self.deadline is None:
            if link.armed:  # a deadline of an earlier call: clear both
                link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(0, 0))
                link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(0, 0))
                link.armed = False
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        seconds = int(left)
        link.sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(seconds, max(1, int((left - seconds) * 1e6))))
        link.armed = True

    async def wait(self, sock: socket.socket, write: bool) -> None:
        raise socket.timeout("timed out")  # EAGAIN from a blocking call: its timeout ran out


class _OnLoop:
    """A coroutine's waits: non-blocking calls, and the running loop's
    reader (writer) callback when one would block."""

    flags = _DONTWAIT

    def arm(self, link: Link, write: bool) -> None:
        pass

    async def wait(self, sock: socket.socket, write: bool) -> None:
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


ON_LOOP = _OnLoop()


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (its IO is `Blocking`)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()
    raise RuntimeError("a Blocking wait suspended")  # cannot happen: it never awaits a future


def _take_fds(ancdata: list[tuple[int, int, bytes]], flags: int, fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    if flags & _CTRUNC:
        raise ProtocolError("frame: more fds than announced (truncated)")


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


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
