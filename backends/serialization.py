"""Zero-copy CPU torch tensors through Ray's object store.

Ray moves numpy arrays without copying them (pickle protocol 5 puts their
buffer out of band, straight into the object store, and `ray.get` returns
an array over the store's shared memory). A torch tensor, left to Ray,
goes through torch's own pickling instead: its storage is copied into a
bytes object on the way in and again on the way out (measured in
benchmarks/bench_tensor_transfer.py and docs/backends.md).

`ensure_registered()` installs, in the process that calls it, a serializer
for `torch.Tensor` that ships the tensor's bytes as a flat uint8 numpy view,
plus the dtype and shape; the receiver rebuilds a tensor over the very
buffer `ray.get` hands it. Any dtype works this way, bfloat16 included
(numpy never interprets the bytes). Strides survive when the tensor is a
permutation of a dense layout (a transpose, channels-last); other
non-contiguous tensors are copied once on the sending side, never twice.
Tensors this path cannot represent exactly (CUDA or other devices,
sparse, quantized, conjugate or negative views, named, with Python
attributes, or with autograd history) keep torch's own pickling, i.e.
Ray's default behaviour; on the fast path, with `cuda_ipc`, a CUDA tensor
may travel as a CUDA IPC export instead (cuda_ipc.py).

Registration is per process (Ray's serializer table is a class attribute
of its pickler), so the driver registers at deploy and every worker that
runs a step registers before Ray serializes what the step returned
(backends/worker.py). The deserializer is importable, so a receiving
process needs nothing registered. Received tensors share the object
store's memory: treat them as read-only (see docs/backends.md).

This module must not import torch or ray at import time: it is imported by
every worker, most of which never see a tensor.
"""

from __future__ import annotations

import re
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any

from pipeline_ir.backends import cuda_ipc

if TYPE_CHECKING:
    import numpy as np
    import torch

_registered = False
_lock = threading.Lock()

# A received tensor views the read-only object-store buffer on purpose
# (docs/backends.md), and torch warns about that once per process. Set at
# import: a worker deserializes our payloads through this module before it
# registers anything. The filter matches only warnings raised from here.
warnings.filterwarnings(
    "ignore",
    message="The given NumPy array is not writable",
    category=UserWarning,
    module=re.escape(__name__),
)


def ensure_registered() -> None:
    """Register the tensor serializer in this process, once, if torch is
    loaded (a process without torch has no tensor to serialize). Cheap
    enough to call before every submission."""
    global _registered
    if _registered or "torch" not in sys.modules:
        return
    with _lock:
        if _registered:
            return
        import ray.util
        import torch

        ray.util.register_serializer(torch.Tensor, serializer=serialize_tensor, deserializer=deserialize_tensor)
        _registered = True


def unregister() -> None:
    """Give `torch.Tensor` back to Ray's default path in this process (for
    benchmarks comparing the two)."""
    global _registered
    with _lock:
        if _registered:
            import ray.util
            import torch

            ray.util.deregister_serializer(torch.Tensor)
            _registered = False


# Payload kinds: a tuple's first item says how to rebuild the tensor.
_BYTES = 0  # (kind, uint8 array, dtype, shape, inverse permutation or None, requires_grad)
_TORCH = 1  # (kind, rebuild function, its args): torch's own pickling
_CUDA_IPC = 2  # (kind, GPU UUID, rebuild function, its args): exported by CUDA IPC (cuda_ipc.py)


def _dense_permutation(t: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation `p` with `t.permute(p)` contiguous, if there is one
    (then `t` covers its memory exactly, only in another dimension order)."""
    strides, sizes = t.stride(), t.shape
    order = tuple(sorted(range(t.dim()), key=lambda d: (-strides[d], -sizes[d])))
    return order if t.permute(order).is_contiguous() else None


def _zero_copy_ok(t: torch.Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and t.layout is _torch().strided
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
        and (not t.requires_grad or t.is_leaf)
        and not any(getattr(t, "names", None) or ())  # named tensors (gone in recent torch)
        and not t.__dict__  # Python attributes set on the tensor: torch's pickling keeps them
    )


def serialize_tensor(t: torch.Tensor) -> tuple[object, ...]:
    """The payload Ray pickles for `t`; its uint8 array travels out of band."""
    if cuda_ipc.sending.peer:  # only the fast path's pickling sets a peer (fast_frames.dumps)
        shared = cuda_ipc.share(t)
        if shared is not None:
            return (_CUDA_IPC, *shared)
    if not _zero_copy_ok(t):
        # torch.Tensor.__reduce_ex__ always gives (function, args).
        reduce_ex: Any = t.__reduce_ex__
        rebuild, args = reduce_ex(2)
        return (_TORCH, rebuild, args)
    data = t.detach()
    inverse: tuple[int, ...] | None = None
    if not data.is_contiguous():
        order = _dense_permutation(data)
        if order is None:
            data = data.contiguous()  # strided with gaps or overlaps: one copy, here
        else:
            data = data.permute(order)
            inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    flat = data.reshape(-1).view(_torch().uint8).numpy()
    return (_BYTES, flat, t.dtype, tuple(data.shape), inverse, t.requires_grad)


def deserialize_tensor(payload: tuple[Any, ...]) -> torch.Tensor:
    """The tensor for a `serialize_tensor` payload, over the received buffer."""
    if payload[0] == _TORCH:
        rebuilt: torch.Tensor = payload[1](*payload[2])
        return rebuilt
    if payload[0] == _CUDA_IPC:
        opened: torch.Tensor = cuda_ipc.open_shared(*payload[1:])
        return opened
    _, flat, dtype, shape, inverse, requires_grad = payload
    array: np.ndarray[Any, Any] = flat
    t: torch.Tensor = _from_numpy(array).view(dtype).reshape(shape)
    if inverse is not None:
        t = t.permute(inverse)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _from_numpy(array: np.ndarray[Any, Any]) -> torch.Tensor:
    return _torch().from_numpy(array)  # type: ignore[no-any-return]


def _torch() -> Any:
    # Imported on first use: see the module docstring.
    import torch

    return torch
