"""CUDA tensors over the fast path by CUDA IPC, without a host copy
(`deploy(cuda_ipc=True)`; docs/design.md, "CUDA tensors between GPU steps").

Without it, a CUDA tensor on the fast path is pickled by torch: copied to
host memory by the replica that made it, and back to a GPU by whoever
reads it. With it, the sending process exports the tensor's CUDA memory
with torch's own reduction (`reduce_tensor`: an IPC handle, the storage's
place in it, an event to wait on, and one slot of torch's cross-process
reference count) and the receiver maps that memory.

Who may send what to whom: a process exports a tensor only if the GPU it
lives on is one its peer sees (`visible_gpus()`, by UUID: Ray gives each
GPU actor its own CUDA_VISIBLE_DEVICES, so device indices do not match
across processes); else the tensor takes torch's pickling as before.

Lifetime, which is where CUDA IPC goes wrong silently (torch's "CUDA IPC
best practices"):

- torch counts one reader per export: the exporting process keeps the
  memory (after its own tensor is gone, in torch's "limbo") until the
  reader's mapping is released. An export is opened once: a value sent
  to two replicas is pickled, and so exported, twice;
- the receiver does not keep the mapping. It clones the tensor (a device
  to device copy), waits for the copy, and lets the mapping go: the step
  gets a tensor of its own, which it may keep, change or send on (torch
  refuses to re-export a mapped tensor), and the sender's memory is free
  again as soon as the copy is done, whatever the step does with the clone;
- an export that never reaches a reader (its frame could not be sent, or
  the pickling failed after it) is released by the sender (`release`), so
  the memory does not stay held until the process ends.

The caller relays values between replicas: it opens what a replica sent
(and so needs CUDA and the GPU in view, as torch's pickling of a CUDA
tensor already did) and exports its clone to the next replica.

The torch calls are the `_`-prefixed functions at the end, so that the
bookkeeping above can be tested on machines without a GPU
(tests/test_cuda_ipc.py swaps them for a ledger). This module must not
import torch at import time: every fast-path process imports it.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any

Export = tuple[Any, ...]  # the arguments of torch's rebuild_cuda_tensor, as reduce_tensor gives them

# rebuild_cuda_tensor's arguments (torch/multiprocessing/reductions.py) that
# are read here: the device index (the sender's numbering; the receiver
# puts its own), and the reference counter's shared-memory file and slot.
_DEVICE, _COUNTER, _COUNTER_SLOT = 6, 11, 12


class _Sending(threading.local):
    """What the fast path's pickling on this thread may export, and what it
    exported (set by fast_frames.dumps around one value)."""

    peer: frozenset[str] = frozenset()  # GPUs (UUIDs) the receiver sees
    exports: list[Export] | None = None


sending = _Sending()

# What this process did, for tests and benchmarks to see that tensors did
# go by CUDA IPC (a fallback to host copies would give the same values).
_counts = {"exported": 0, "opened": 0, "given_back": 0}
_counting = threading.Lock()


def counts() -> dict[str, int]:
    """How many CUDA tensors this process exported, opened, and gave back
    unopened, since it started."""
    with _counting:
        return dict(_counts)


def _count(what: str, n: int = 1) -> None:
    with _counting:
        _counts[what] += n


def visible_gpus() -> tuple[str, ...]:
    """The UUIDs of the GPUs this process can open CUDA IPC handles on
    (importing torch to find out); () without torch or CUDA."""
    if sys.modules.get("torch") is None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return ()  # no torch, no CUDA tensors: nothing to share
    return _uuids()


def share(t: Any) -> tuple[str, Any, Export] | None:
    """(GPU UUID, rebuild function, its args) exporting CUDA tensor `t` to
    the peer of the pickling under way, or None: `t` takes torch's
    pickling (not on a GPU the peer sees, not a plain strided tensor, or
    torch refused)."""
    gpu = _gpu_of(t)
    state = sending
    if gpu is None or gpu not in state.peer or state.exports is None:
        return None
    if t.requires_grad and not t.is_leaf:
        return None  # torch refuses it too; its pickling says why
    try:
        rebuild, args = _export(t)
    except Exception:
        return None
    state.exports.append(args)
    _count("exported")
    return gpu, rebuild, args


def open_shared(gpu: str, rebuild: Any, args: Export) -> Any:
    """The tensor a `share` on the other side exported: a clone of it in
    this process's memory; the sender's memory is released."""
    try:
        index = _local_index(gpu)
        if index is None:
            raise RuntimeError(
                f"a CUDA tensor came over CUDA IPC from GPU {gpu}, which this process does not see "
                f"(its GPUs: {list(_uuids()) or 'none'}); deploy with cuda_ipc=False to copy CUDA tensors through host memory"
            )
        view = _import(rebuild, args, index)
    except BaseException:
        # Not opened (or opened and dropped already): nobody will read it.
        # A second decrement, if torch made one, frees no sooner than due.
        release((args,))
        raise
    try:
        owned = _own(view)
    finally:
        del view  # the mapping goes: the sender's counter drops
    _count("opened")
    return owned


def release(exports: list[Export] | tuple[Export, ...]) -> None:
    """Give back exports no reader will open (their frame was not sent)."""
    for args in exports:
        _release(args)
    _count("given_back", len(exports))


# -- torch


@functools.cache
def _uuids() -> tuple[str, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))


def _gpu_of(t: Any) -> str | None:
    """The UUID of the GPU a plain strided CUDA tensor lives on; None for
    any other tensor."""
    device = t.device
    if device.type != "cuda" or t.is_sparse or t.is_nested or t.layout is not sys.modules["torch"].strided:
        return None
    uuids = _uuids()
    return uuids[device.index] if device.index is not None and device.index < len(uuids) else None


def _local_index(gpu: str) -> int | None:
    uuids = _uuids()
    return uuids.index(gpu) if gpu in uuids else None


def _export(t: Any) -> tuple[Any, Export]:
    from torch.multiprocessing import reductions

    reduce: Any = reductions.reduce_tensor  # untyped in torch
    rebuild, args = reduce(t)
    return rebuild, tuple(args)


def _import(rebuild: Any, args: Export, index: int) -> Any:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    # Only torch's rebuild, with a device index where torch puts it: the
    # frame came from one of the pipeline's processes, but a torch whose
    # reduction changed shape must fail here, not map the wrong memory.
    if rebuild is not rebuild_cuda_tensor or len(args) != 15 or not isinstance(args[_DEVICE], int):
        raise RuntimeError(f"unexpected CUDA IPC reduction from this torch ({getattr(rebuild, '__name__', rebuild)!r}, {len(args)} args)")
    fields = list(args)
    fields[_DEVICE] = index
    opened: Any = rebuild  # torch's, checked above; untyped in torch
    return opened(*fields)


def _own(view: Any) -> Any:
    import torch

    with torch.cuda.device(view.device):
        owned = view.detach().clone()
        # The mapping is released when `view` goes, and then the sender may
        # reuse the memory: the copy must be done by then.
        torch.cuda.current_stream().synchronize()
    if isinstance(view, torch.nn.Parameter):
        return torch.nn.Parameter(owned, requires_grad=view.requires_grad)
    if view.requires_grad:
        owned.requires_grad_(True)
    return owned


def _release(args: Export) -> None:
    import torch

    # Best effort, as in torch: the sender may be gone, and its counter file with it.
    give_back: Any = torch.UntypedStorage._release_ipc_counter  # untyped in torch
    try:
        give_back(args[_COUNTER], args[_COUNTER_SLOT], device=args[_DEVICE])
    except Exception:
        pass
