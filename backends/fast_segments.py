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

This module holds the bookkeeping of both ends; fast_frames.py carries the
ids, fds and notices in its frames.
"""

from __future__ import annotations

import collections
import mmap
import os
import weakref
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


class Outbox:
    """The segments one end sends from: busy (the peer may still read
    them) or free (released: ready to be filled again)."""

    def __init__(self) -> None:
        self._busy: dict[int, _Segment] = {}
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

    def unplace(self, placed: list[tuple[int, int | None]]) -> None:
        """Undo `place` for a frame that will not be sent: used segments go
        back to free, new ones (the peer never saw them) are closed."""
        for segment_id, fd in placed:
            segment = self._busy.pop(segment_id)
            if fd is None:
                self._free[segment_id] = segment
            else:
                segment.mapping.close()

    def released(self, segment_id: int) -> None:
        """The peer no longer reads this segment."""
        segment = self._busy.pop(segment_id, None)
        if segment is None:
            return  # not ours, or not busy: a confused peer; ignore
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
            segment.mapping.close()  # the peer's own mapping keeps the pages it still uses
        self._busy.clear()
        self._free.clear()


class Inbox:
    """The peer's segments this end maps, and the releases to tell it."""

    def __init__(self) -> None:
        self._mappings: dict[int, mmap.mmap] = {}
        # Filled by finalizers, on whatever thread drops an array last:
        # deque appends and pops are atomic.
        self._released: collections.deque[int] = collections.deque()

    def learn(self, segment_id: int, fd: int) -> None:
        """Map a segment the peer passes for the first time (`fd` stays the caller's)."""
        self._mappings[segment_id] = mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_READ)

    def buffer(self, segment_id: int, length: int) -> Any:
        """A read-only uint8 array over the first `length` bytes of a
        segment; the segment is released when the last array over it goes."""
        import numpy as np

        mapping = self._mappings.get(segment_id)
        if mapping is None or length > len(mapping):
            raise KeyError(f"segment {segment_id} is not mapped here, or shorter than {length} bytes")
        # Arrays that pickle rebuilds over this one keep it alive (as their
        # buffer's exporter), so its finalizer runs when the last is gone.
        base = np.frombuffer(mapping, np.uint8, count=length)
        weakref.finalize(base, self._released.append, segment_id).atexit = False
        return base

    def forget(self, segment_id: int) -> None:
        """The peer closed its segment: drop the mapping (arrays still over
        it, if any, keep it mapped)."""
        self._mappings.pop(segment_id, None)

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
        self._mappings.clear()
