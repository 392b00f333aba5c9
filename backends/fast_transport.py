"""Same-node fast path: calls from the caller's process to one replica actor
over a Unix socket, instead of a Ray actor task.

A Ray actor task costs the better part of a millisecond; a round trip over
a Unix socket to a thread blocked in `recv` costs tens of microseconds and
no CPU while idle (docs/design.md, "Fast path"). The transport is three
modules and nothing else: the replica pool (pool.py, fast_calls.py)
decides when to use it and falls back to Ray actor calls when it cannot.

- fast_server.py, the replica side: `FastServer`, a thread blocked in
  `accept` on a socket in a fresh 0700 directory (the socket itself
  0600), and one thread per accepted connection blocked in `recvmsg`
  (after polling up to SPIN_S for the next call, when the caller asked
  for it; idle, nothing polls). Each call runs `handler(*args, **kwargs)` and sends back its
  result or its exception.
- fast_client.py, the caller side: `FastClient`, a small pool of
  connections (one call in flight per connection), used from any number
  of threads (`call`, `send`) and from asyncio (`call_async`, `asend`, on
  the running loop's reader callbacks: no thread per call); `Pending`, a
  call sent whose answer is read later. A thread waiting for an answer
  polls for up to SPIN_S before it blocks in `recvmsg`. Every blocking call takes a
  timeout; connecting always has one.
- fast_frames.py and fast_segments.py: the wire format, the socket I/O,
  and the shared-memory segments large buffers travel in.

This module holds what both sides share: where a server listens
(`Address`), whether the transport can be used (`supported`,
`same_node`), the greeting, the errors, and the socket's files.

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

import contextlib
import os
import re
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass

from pipeline_ir.backends.fast_frames import PeerGone, ProtocolError, TransportError
from pipeline_ir.backends.processes import alive

__all__ = [
    "Address", "CallTimeout", "PeerGone", "ProtocolError", "RemoteFailure",
    "TransportError", "Unreachable", "remove_files", "same_node", "supported", "this_node",
]

# Buffers larger than this go through a shared-memory segment, smaller ones
# inline in the frame (benchmarks/bench_fastpath.py measures both at 1 MB:
# with a reused segment, 1 MB costs half of inline; at 256 KiB they tie).
THRESHOLD = 256 * 1024
MAX_CONNECTIONS = 8  # per client: the replica runs one call at a time anyway
CONNECT_TIMEOUT_S = 10.0
# A thread waiting for an answer polls the socket this long before it
# blocks: a blocked thread's wake-up costs 20 to 40 us on a virtual
# machine (the vCPU halts), about half of a small call's round trip
# (docs/design.md, "Spin, then block"). Only one thread of a process spins
# at a time, and a client whose answers keep coming later stops spinning.
SPIN_S = 100e-6
# A side (client or server connection) whose peer came later than the poll
# this many times in a row stops polling, and tries again one wait in
# PROBE_EVERY: a replica whose calls take milliseconds, or a caller calling
# now and then, costs no polling.
QUIET_AFTER = 4
PROBE_EVERY = 32
HELLO = b"PIRFAST1"  # the server's greeting once a peer is admitted...
REFUSED = b"PIRFNO!!"  # ...or its only words to a refused one
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
    gpus: tuple[str, ...] = ()  # GPUs (UUIDs) it opens CUDA IPC handles on: cuda_ipc.py


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


def socket_directory() -> str:
    """A fresh directory only this user can open (mkdtemp makes it 0700,
    failing rather than reusing an existing one), named after this
    process; the directories of dead servers are swept first."""
    base = _base()
    with contextlib.suppress(OSError):
        sweep(base)
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)


def _base() -> str:
    base = tempfile.gettempdir()
    return "/tmp" if len(base) > 80 else base  # a socket path is at most 107 bytes


_SERVER_DIR = re.compile(re.escape(_PREFIX) + r"(\d+)-[^/]+")
_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's flags: a listening socket


def sweep(base: str | None = None) -> list[str]:
    """Remove the socket directories of this user's servers that are gone:
    a replica killed by SIGKILL (ray.kill, a lost driver's actors) cannot
    remove its own, and the pool removes only those it killed. A directory
    goes when the pid in its name runs no process and no socket listens at
    its path (both, so that a reused pid or a server of another namespace
    is left alone). Returns the directories removed."""
    base = base if base is not None else _base()
    listening = _listening_paths()
    removed = []
    for name in os.listdir(base):
        match = _SERVER_DIR.fullmatch(name)
        if match is None:
            continue
        directory = os.path.join(base, name)
        try:
            info = os.lstat(directory)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        path = os.path.join(directory, "s")
        if alive(int(match.group(1))) or path in listening:
            continue
        remove_files(path)
        removed.append(directory)
    return removed


def _listening_paths() -> set[str]:
    """The paths of the Unix sockets listening in this network namespace."""
    paths = set()
    with open("/proc/net/unix") as table:
        next(table, None)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & _ACCEPTING:
                paths.add(fields[7])
    return paths
