"""CUDA IPC between GPU steps on a real GPU (`deploy(cuda_ipc=True)`):
runs only where torch sees CUDA (the lent GPU machine; see
docs/benchmarks.md, "GPU"). tests/test_cuda_ipc.py covers the bookkeeping
everywhere; this checks torch's side of it: values exact, tensors on the
GPU, and that they did go by IPC (a fallback to host copies would give
the same values).
"""

from __future__ import annotations

from typing import Any

import pytest

import pipeline_ir as pipeline

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("ray_session"),
]

SHARE = 0.25  # of the one GPU: three steps' replicas on it


def make(i: int) -> Any:
    return torch.full((1 << 20,), float(i), device="cuda")


def twice(t: Any) -> tuple[Any, str, dict[str, int]]:
    from pipeline_ir.backends import cuda_ipc

    assert t.is_cuda
    t.mul_(2)  # its own clone: the producer's and the caller's tensors are untouched
    return t, str(t.device), cuda_ipc.counts()


class Keep:
    """Keeps every tensor it gets: one freed or reused under it changes the sum."""

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def __call__(self, t: Any) -> float:
        self.kept.append(t)
        return float(sum(float(k[0]) + float(k[-1]) for k in self.kept))


def test_cuda_tensors_go_between_gpu_steps_by_ipc_and_stay_exact() -> None:
    from pipeline_ir.backends import cuda_ipc

    produce = pipeline.step(make, execution_mode="actors", num_gpus=SHARE, fuse=False)
    double = pipeline.step(twice, execution_mode="actors", num_gpus=SHARE, fuse=False)
    keep = pipeline.step(Keep, execution_mode="actors", num_gpus=SHARE, fuse=False)()
    t = produce(pipeline.INPUT)
    before = cuda_ipc.counts()
    with pipeline.compile((double(t), keep(t))).deploy(cuda_ipc=True) as p:
        for i in range(1, 31):
            (doubled, device, seen), kept = p.call(i, timeout=60)
            assert doubled.is_cuda and device.startswith("cuda")
            assert torch.equal(doubled, torch.full((1 << 20,), 2.0 * i, device=doubled.device))
            assert kept == float(i * (i + 1))  # 2 * (1 + ... + i): every kept tensor intact
        assert seen["opened"] >= 30  # the doubling replica got its inputs by IPC
    after = cuda_ipc.counts()
    # The caller opened each produced tensor and each doubled one, and
    # exported the produced one to both steps.
    assert after["opened"] - before["opened"] == 60
    assert after["exported"] - before["exported"] == 60
    assert after["given_back"] == before["given_back"]


def test_without_cuda_ipc_the_same_values_cross_host_memory() -> None:
    from pipeline_ir.backends import cuda_ipc

    produce = pipeline.step(make, execution_mode="actors", num_gpus=SHARE, fuse=False)
    double = pipeline.step(twice, execution_mode="actors", num_gpus=SHARE, fuse=False)
    before = cuda_ipc.counts()
    with pipeline.compile(double(produce(pipeline.INPUT))).deploy() as p:
        doubled, _, seen = p.call(3, timeout=60)
    assert torch.equal(doubled, torch.full((1 << 20,), 6.0, device=doubled.device))
    assert seen["opened"] == 0 and cuda_ipc.counts() == before
