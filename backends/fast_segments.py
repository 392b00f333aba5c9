"""Shared-memory segments: how the fast path moves large buffers.

A buffer over the sender's threshold is copied into a *segment*, a memfd
that the sender maps writable and keeps. The first frame that carries a
segment passes its fd along (SCM_RIGHTS); the receiver maps it read-only,
keeps the mapping, and later frames name the segment by id alone. The
receiver hands out arrays over its mapping (zero-copy, read-only, as Ray's
object store does); once the last of them is gone it tells the sender so
(a *release* notice on its next frame) and the sender may fill the segment
again. Reuse is the point: a fresh memfd makes the kernel allocate, zero,
map and later free every page, several times the cost of the copy itself
at 100 MB (docs/design.md, "Fast path"), while a reused one costs the copy.

Free segments over CACHE_BYTES per connection end are closed and the
receiver is told to forget them (a *drop* notice). All of it is per
connection and dies with it: the kernel frees a segment's pages with the
last mapping or fd, whichever side goes first, a killed one included.

A buffer that already lies in a segment this process maps (a value one
replica sent, on its way to another: the caller relays values between
replicas) is *forwarded* rather than copied: the frame passes the
segment's fd and the buffer's offset in it, and the receiver maps that
same memory. The forwarding end keeps the buffer (so the segment it came
in) alive until the receiver releases it: only then can its first owner
be told to fill it again. A forwarded segment is never reused; once
released, the receiver is told to forget it.

This module holds the bookkeeping of both ends; fast_frames.py carries the
ids, fds, offsets and notices in its frames.
"""

from __future__ import annotations

import collections
import mmap
import os
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CACHE_BYTES = 256 << 20  # free segments kept per connection end, for reuse
DROP = 1 << 31  # a notice with this bit: "forget my segment", else "your segment is free"
_GRAIN = 1 << 16  # segment sizes are multiples of this, so that near sizes reuse each other


@dataclass(eq=False)
class _Segment:
    id: int
    size: int
    mapping: mmap.mmap  # the sender's, writable


@dataclass(eq=False)
class _Forwarded:
    id: int
    keep: memoryview  # the buffer sent on: keeps the mapping it lies in (and that segment's release) until the peer is done


# The peers' segments this process maps, by start address, each with a
# duplicate of its fd, so that a buffer lying in one can be forwarded
# (Outbox.forward). An entry holds its mapping object, so the memory stays
# mapped while the entry exists: an address found here is that segment's,
# never a later mapping's at the same place. Its Inbox removes it when the
# peer drops the segment or the connection ends.
_mapped: dict[int, tuple[int, int, mmap.mmap]] = {}  # start: (length, fd, mapping)
_mapped_lock = threading.Lock()
MAX_KEPT_FDS = 256  # past it, segments mapped here are not forwarded (a copy instead)


def _address(buffer: Any) -> int:
    import numpy as np

    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


def _keep(mapping: mmap.mmap, fd: int) -> int | None:
    """Note where `mapping` (of the segment `fd`) lies, for forwarding; its
    start address, the key to `_unkeep` it (None: not kept, over the cap)."""
    start = _address(mapping)
    with _mapped_lock:
        if len(_mapped) >= MAX_KEPT_FDS:
            return None
        _mapped[start] = (len(mapping), os.dup(fd), mapping)
    return start


def _unkeep(starts: Iterable[int]) -> None:
    with _mapped_lock:
        entries = [_mapped.pop(start, None) for start in starts]
    for entry in entries:
        if entry is not None:
            os.close(entry[1])


def _find(address: int, length: int) -> tuple[int, int] | None:
    """(a new fd of the segment, the offset) for a buffer at `address` that
    lies wholly in a segment mapped here; None otherwise."""
    with _mapped_lock:
        for start, (size, fd, _) in _mapped.items():
            if start <= address and address + length <= start + size:
                return os.dup(fd), address - start
    return None


class Outbox:
    """The segments one end sends from: busy (the peer may still read
    them) or free (released: ready to be filled again)."""

    def __init__(self) -> None:
        self._busy: dict[int, _Segment | _Forwarded] = {}
        self._free: dict[int, _Segment] = {}  # oldest first
        self._next = 0
        self._drops: list[int] = []

    def place(self, raw: memoryview) -> tuple[int, int | None]:
        """Copy `raw` into the smallest free segment that holds it, or a new
        one; its id, and for a new one the fd to pass (the caller closes it
        once sent; the mapping keeps the segment)."""
        size = raw.nbytes
        fits = [s for s in self._free.values() if s.size >= size]
        fd = None
        if fits:
            segment = min(fits, key=lambda s: s.size)
            del self._free[segment.id]
        else:
            fd = os.memfd_create("pipeline_ir", os.MFD_CLOEXEC)
            try:
                rounded = -(-size // _GRAIN) * _GRAIN
                os.ftruncate(fd, rounded)
                segment = _Segment(self._next, rounded, mmap.mmap(fd, rounded))
            except BaseException:
                os.close(fd)
                raise
            self._next += 1
        self._busy[segment.id] = segment
        segment.mapping[:size] = raw
        return segment.id, fd

    def forward(self, raw: memoryview) -> tuple[int, int, int] | None:
        """If `raw` lies in a segment this process maps (a peer's), send that
        segment instead of a copy: (id, the fd to pass, `raw`'s offset in
        it); None if it does not."""
        found = _find(_address(raw), raw.nbytes)
        if found is None:
            return None
        fd, offset = found
        segment = _Forwarded(self._next, raw)
        self._next += 1
        self._busy[segment.id] = segment
        return segment.id, fd, offset

    def unplace(self, placed: list[tuple[int, int | None]]) -> None:
        """Undo `place` and `forward` for a frame that will not be sent:
        used segments go back to free, new ones (the peer never saw them)
        are closed, forwarded buffers let go."""
        for segment_id, fd in placed:
            segment = self._busy.pop(segment_id)
            if isinstance(segment, _Forwarded):
                continue
            if fd is None:
                self._free[segment_id] = segment
            else:
                segment.mapping.close()

    def released(self, segment_id: int) -> None:
        """The peer no longer reads this segment."""
        segment = self._busy.pop(segment_id, None)
        if segment is None:
            return  # not ours, or not busy: a confused peer; ignore
        if isinstance(segment, _Forwarded):
            self._drops.append(segment_id | DROP)  # not ours to fill again: the peer unmaps it
            return
        self._free[segment_id] = segment
        cached = sum(s.size for s in self._free.values())
        while cached > CACHE_BYTES:
            oldest = next(iter(self._free.values()))
            del self._free[oldest.id]
            oldest.mapping.close()
            cached -= oldest.size
            self._drops.append(oldest.id | DROP)

    def due(self) -> bool:
        """Whether notices wait to be sent."""
        return bool(self._drops)

    def notices(self) -> list[int]:
        """Drop notices for the peer, each sent once."""
        drops, self._drops = self._drops, []
        return drops

    def close(self) -> None:
        for segment in [*self._busy.values(), *self._free.values()]:
            if isinstance(segment, _Segment):
                segment.mapping.close()  # the peer's own mapping keeps the pages it still uses
        self._busy.clear()
        self._free.clear()


class Inbox:
    """The peer's segments this end maps, and the releases to tell it."""

    def __init__(self) -> None:
        self._mappings: dict[int, mmap.mmap] = {}
        self._kept: dict[int, int] = {}  # segment id: its start address in `_mapped`
        # Filled by finalizers, on whatever thread drops an array last:
        # deque appends and pops are atomic.
        self._released: collections.deque[int] = collections.deque()
        # An end dropped without close() still takes its entries out of `_mapped`.
        weakref.finalize(self, _unkeep, self._kept.values()).atexit = False

    def learn(self, segment_id: int, fd: int) -> None:
        """Map a segment the peer passes for the first time (`fd` stays the caller's)."""
        mapping = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_READ)
        self._mappings[segment_id] = mapping
        start = _keep(mapping, fd)
        if start is not None:
            self._kept[segment_id] = start

    def buffer(self, segment_id: int, length: int, offset: int = 0) -> Any:
        """A read-only uint8 array over `length` bytes of a segment from
        `offset`; the segment is released when the last array over it goes."""
        import numpy as np

        mapping = self._mappings.get(segment_id)
        if mapping is None or offset + length > len(mapping):
            raise KeyError(f"segment {segment_id} is not mapped here, or shorter than {offset + length} bytes")
        # Arrays that pickle rebuilds over this one keep it alive (as their
        # buffer's exporter), so its finalizer runs when the last is gone.
        base = np.frombuffer(mapping, np.uint8, count=length, offset=offset)
        weakref.finalize(base, self._released.append, segment_id).atexit = False
        return base

    def forget(self, segment_id: int) -> None:
        """The peer closed its segment: drop the mapping (arrays still over
        it, if any, keep it mapped, but it is forwarded no more)."""
        self._mappings.pop(segment_id, None)
        start = self._kept.pop(segment_id, None)
        if start is not None:
            _unkeep([start])

    def due(self) -> bool:
        """Whether notices wait to be sent."""
        return bool(self._released)

    def notices(self) -> list[int]:
        """Release notices for the peer, each sent once."""
        out = []
        while self._released:
            out.append(self._released.popleft())
        return out

    def close(self) -> None:
        _unkeep(list(self._kept.values()))
        self._kept.clear()
        self._mappings.clear()
