"""Zero-copy tensors and arrays through Ray (backends/serialization.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import pipeline_ir as pipeline

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ray(ray_session: Any) -> Iterator[Any]:
    from pipeline_ir.backends import serialization

    serialization.ensure_registered()
    yield ray_session


def _in_object_store(address: int) -> bool:
    """Whether `address` lies in a shared-memory mapping of Ray's object
    store (plasma) in this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *rest = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return "plasma" in line
    return False


def _bf16() -> Any:
    return torch.randn(4, 5).to(torch.bfloat16)


CASES: dict[str, Callable[[], Any]] = {
    "float32": lambda: torch.randn(3, 4),
    "bfloat16": _bf16,
    "zero-dim": lambda: torch.tensor(3.5),
    "empty": lambda: torch.empty(0, 3),
    "bool": lambda: torch.tensor([True, False, True]),
    "complex64": lambda: torch.randn(3, dtype=torch.complex64),
    "int64 transposed": lambda: torch.arange(12).reshape(3, 4).t(),
    "channels_last": lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
    "strided slice": lambda: torch.arange(20.0).reshape(4, 5)[:, ::2],
    "broadcast": lambda: torch.arange(3.0).expand(4, 3),
    "bfloat16 transposed": lambda: _bf16().t(),
}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_tensor_round_trip_keeps_values_dtype_and_shape(ray: Any, make: Callable[[], Any]) -> None:
    t = make()
    got = ray.get(ray.put(t))
    assert type(got) is torch.Tensor
    assert (got.dtype, got.shape, got.device) == (t.dtype, t.shape, t.device)
    assert torch.equal(got, t)


def test_dense_permutations_keep_their_strides(ray: Any) -> None:
    for t in (torch.arange(12).reshape(3, 4).t(), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)):
        assert ray.get(ray.put(t)).stride() == t.stride()
    # Gaps or overlaps: one copy on the sending side, contiguous on arrival.
    assert ray.get(ray.put(torch.arange(3.0).expand(4, 3))).is_contiguous()


def test_tensors_the_bytes_path_cannot_carry_keep_torch_pickling(ray: Any) -> None:
    leaf = torch.ones(3, requires_grad=True)
    got = ray.get(ray.put(leaf))
    assert got.requires_grad and torch.equal(got.detach(), leaf.detach())
    tagged = torch.ones(2)
    tagged.source = "camera-1"  # type: ignore[attr-defined]
    assert ray.get(ray.put(tagged)).source == "camera-1"
    sparse = torch.eye(3).to_sparse()
    assert torch.equal(ray.get(ray.put(sparse)).to_dense(), torch.eye(3))
    # Autograd history does not cross processes: torch's pickling (kept
    # here) rebuilds a leaf that requires grad.
    got = ray.get(ray.put(leaf * 2))
    assert got.requires_grad and got.is_leaf and torch.equal(got.detach(), torch.full((3,), 2.0))


def test_reads_are_zero_copy_and_ray_default_is_not(ray: Any) -> None:
    from pipeline_ir.backends import serialization

    t = torch.arange(2_000_000, dtype=torch.float32)  # 8 MB: stored in plasma
    ref = ray.put(t)
    a, b = ray.get(ref), ray.get(ref)
    assert a.data_ptr() == b.data_ptr() and _in_object_store(a.data_ptr())
    assert torch.equal(a, t)
    serialization.unregister()
    try:
        c = ray.get(ray.put(t))
        assert not _in_object_store(c.data_ptr())  # Ray's default path copies out
    finally:
        serialization.ensure_registered()


@pipeline.step(execution_mode="tasks")
def make_tensor(n: int) -> Any:
    import torch

    return torch.arange(n, dtype=torch.float32)


@pipeline.step(execution_mode="tasks")
def scale(t: Any, k: float) -> Any:
    return t * k


@pipeline.step(execution_mode="tasks")
def with_array(t: Any) -> tuple[Any, np.ndarray[Any, Any]]:
    return t, np.arange(len(t), dtype=np.float64)


def test_pipeline_results_arrive_without_a_copy(ray: Any) -> None:
    n = 1_000_000
    # A chain, so one worker process (importing torch once) can run it all.
    with pipeline.compile(with_array(scale(make_tensor(pipeline.INPUT), 2.0)), optimize=False).deploy() as p:
        t, a = p.call(n)  # type: ignore[misc]
    # Made in a worker: only the worker's registered serializer gets it
    # into the store as bytes a tensor can be rebuilt over.
    assert type(t) is torch.Tensor and t.dtype == torch.float32 and t.shape == (n,)
    assert torch.equal(t, torch.arange(n, dtype=torch.float32) * 2)
    assert _in_object_store(t.data_ptr())
    assert a.flags.writeable is False and _in_object_store(a.ctypes.data)
