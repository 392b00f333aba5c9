"""The fast path's replica side: `FastServer` serves one handler to the
pipeline's caller processes over a Unix socket (fast_transport.py says
how the pieces fit, and what the security checks are)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from pipeline_ir.backends import fast_frames as fr
from pipeline_ir.backends.fast_frames import ProtocolError
from pipeline_ir.backends.fast_transport import HELLO, PROBE_EVERY, QUIET_AFTER, REFUSED, SPIN_S, THRESHOLD, Address, RemoteFailure, remove_files, socket_directory, this_node


# A connection polls for the next call when the caller asked it to (its
# last call carried POLL: the caller measures whether polling pays, see
# fast_client.py) and, as the client does, stops while the next call keeps
# coming after the poll (QUIET_AFTER, PROBE_EVERY); one connection thread
# of the replica polls at a time.


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
        spin_s: float = SPIN_S,
        gpus: Iterable[str] = (),
        caller_gpus: Iterable[str] = (),
    ) -> None:
        self.handler = handler
        # CUDA IPC (cuda_ipc.py): the GPUs this process opens handles on
        # (told to callers in the address), and those its callers see (a
        # result's CUDA tensors on one of them are exported, not copied).
        self.gpus = tuple(gpus)
        self.caller_gpus = frozenset(caller_gpus)
        self.threshold = threshold
        self.spin_s = spin_s
        self._spinner = threading.Lock()
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
        path = os.path.join(socket_directory(), "s")
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
        self.address = Address(path, os.getpid(), this_node(), self.gpus)
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
                    conn.send(REFUSED, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        link = fr.Link(conn)
        io = fr.Blocking(None)
        late = waits = 0
        polls = False
        try:
            link.send_blocking(fr.Outgoing([HELLO], len(HELLO)), io)
            while True:
                # Poll a little for the next call before blocking: a caller
                # calling in a loop sends it within microseconds.
                frame = None
                waits += 1
                if polls and (late < QUIET_AFTER or not waits % PROBE_EVERY) and self._spinner.acquire(blocking=False):
                    try:
                        frame = link.recv_spinning(time.perf_counter() + self.spin_s, io)
                    finally:
                        self._spinner.release()
                    late = 0 if frame is not None else late + 1
                if frame is None:
                    frame = link.recv_blocking(io)
                polls = bool(self.spin_s) and bool(frame.kind & fr.POLL)
                kind, pickled = self._answer(frame)
                # The arguments are gone with the frame: their segments are
                # released now, and the notices ride on this very reply.
                del frame
                try:
                    link.send_blocking(self._frame(link, kind, pickled), io)
                except BaseException:
                    pickled.unsent()  # its CUDA exports reach nobody
                    raise
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
            if frame.kind & ~fr.POLL != fr.CALL:
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
            return kind, fr.dumps(value, self.caller_gpus)
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
            pickled.unsent()
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
