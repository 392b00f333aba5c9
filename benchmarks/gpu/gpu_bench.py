"""GPU figures for the fast path's design, measured in one short run on a
lent H100/H200 (well under 4 minutes).

    # on the GPU machine, from the project root (Ray comes from .gpuwork):
    source .gpuwork/setup.sh && python3 benchmarks/gpu/gpu_bench.py
    # here, on CPU, to check that it runs (tiny sizes, no CUDA IPC):
    python benchmarks/gpu/gpu_bench.py --cpu-smoke

Parts (each in its own try/except: a failure is recorded and the others
still run; the JSON is rewritten after each part, so a run cut short keeps
what it measured):

a. transfer: a 100 MB CUDA tensor from one Ray GPU actor to another on the
   same GPU (num_gpus=0.5 each), median of TRANSFERS, each a fresh tensor:
   plain Ray (the tensor crosses host memory: torch's pickling copies it
   out, the receiver copies it back), CUDA IPC (the sender's
   `torch.multiprocessing.reductions.reduce_tensor`, the handle through
   Ray, the rebuild function in the receiver; the sender keeps the tensor
   alive until the receiver is done), CUDA IPC plus a clone in the
   receiver, a tiny payload through the same two actor calls (the floor),
   and a device-to-device copy in one process. Then the same hop between
   two pipeline_ir GPU steps: the fast path with `cuda_ipc=True`, the fast
   path through host memory (the default) and Ray actor calls, every
   value checked; and CUDA IPC's lifetime: one tensor to two GPU steps at
   once, one of them keeping every tensor it gets, over 40 calls (a
   tensor freed or reused under a reader changes the sums it returns).
b. resnet18 (weights=None, eval, no_grad, fixed seed) at batch 1 and 16:
   GPU ms per image (CUDA events) and images/s (synchronized wall clock),
   after a warm-up.
c. preprocess (a torchvision transform, CPU) in one actor -> classifier in
   a GPU actor, vs one GPU actor doing both, at batch 1 and 16: p50 and
   p99 latency of a call from the driver. Then the same two steps as a
   pipeline_ir pipeline: compiled with the default passes, which fold the
   small CPU step into the GPU step's actor (colocate_actors), against
   the split deployment (`fuse=False` on the preprocess step), each ACTORS
   with one replica, calls interleaved between the two.

Output: `$OUT/gpu_bench.json` (OUT defaults to ./gpu_out): the date, the
GPU, the versions and every part's rows; and a table on stdout. No network
is needed (no weights are downloaded).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 0
MB = 100
TRANSFERS = 10
CALL_TIMEOUT_S = 120.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Settings:
    """Sizes and counts: the real run, or tiny ones for --cpu-smoke."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        # Per GPU actor: two share the GPU. The smoke asks for the same
        # shares of one logical GPU, so that every part's actors fit as
        # they must on the GPU machine.
        self.gpus = 0.5
        self.megabytes = 1 if smoke else MB
        self.transfers = 2 if smoke else TRANSFERS
        self.batches = (1, 2) if smoke else (1, 16)
        self.warmup = 1 if smoke else 10
        self.iterations = 1 if smoke else 50
        self.calls = 2 if smoke else 30


def row(label: str, value: float, unit: str) -> dict[str, Any]:
    return {"label": label, "value": value, "unit": unit}


def _seed() -> None:
    import numpy as np
    import torch

    torch.manual_seed(SEED)
    np.random.seed(SEED)


# -- a. one CUDA tensor, actor to actor --


class Sender:
    """Makes fresh tensors and keeps each alive until `drop` (CUDA IPC:
    the receiver maps the sender's memory)."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        self.kept: dict[int, Any] = {}
        torch.zeros(1, device=device)  # CUDA initialised before anything is timed

    def make(self, i: int, megabytes: int) -> Any:
        import torch

        t = torch.full((megabytes * 2**20 // 4,), float(i), device=self.device)
        self.kept[i] = t
        return t

    def plain(self, i: int, megabytes: int) -> Any:
        """The tensor itself, through Ray (torch's pickling: host memory)."""
        return self.make(i, megabytes)

    def ipc(self, i: int, megabytes: int) -> Any:
        """A CUDA IPC handle to the tensor (rebuild function and its args)."""
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(self.make(i, megabytes))

    def tiny(self, i: int, megabytes: int) -> int:
        return i

    def drop(self, i: int) -> None:
        import torch

        self.kept.pop(i, None)
        if self.device == "cuda":
            torch.cuda.ipc_collect()  # frees memory whose IPC consumers are done

    def local_copy_ms(self, megabytes: int, repeats: int) -> float:
        """Median ms of a device-to-device copy of the same size, in one process."""
        import torch

        src = torch.ones(megabytes * 2**20 // 4, device=self.device)
        dst = torch.empty_like(src)
        times = []
        for _ in range(repeats + 1):
            _sync(self.device)
            start = time.perf_counter()
            dst.copy_(src)
            _sync(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]) * 1e3


class Receiver:
    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        torch.zeros(1, device=device)

    def take(self, t: Any, i: int) -> str:
        """A tensor that came through Ray: check it where it is."""
        assert float(t[0]) == float(i) and str(t.device).startswith(self.device)
        return str(t.device)

    def take_ipc(self, handle: Any, i: int, clone: bool) -> str:
        rebuild, args = handle
        t = rebuild(*args)
        if clone:
            t = t.clone()
        assert float(t[0]) == float(i)
        device = str(t.device)
        del t  # released before the sender may free it
        return device

    def take_tiny(self, x: int, i: int) -> str:
        return "none"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def transfer(ray: Any, s: Settings) -> dict[str, Any]:
    sender = ray.remote(num_gpus=s.gpus)(Sender).remote(s.device)
    receiver = ray.remote(num_gpus=s.gpus)(Receiver).remote(s.device)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    ways: dict[str, tuple[str, Callable[[int], Any]]] = {
        "tiny payload, same two actor calls (floor)": ("tiny", lambda i: receiver.take_tiny.remote(sender.tiny.remote(i, s.megabytes), i)),
        "plain Ray (through host memory)": ("plain", lambda i: receiver.take.remote(sender.plain.remote(i, s.megabytes), i)),
        "CUDA IPC (receiver maps the sender's memory)": ("ipc", lambda i: receiver.take_ipc.remote(sender.ipc.remote(i, s.megabytes), i, False)),
        "CUDA IPC + clone in the receiver": ("ipc", lambda i: receiver.take_ipc.remote(sender.ipc.remote(i, s.megabytes), i, True)),
    }
    try:
        ray.get([sender.tiny.remote(0, 0), receiver.take_tiny.remote(0, 0)], timeout=CALL_TIMEOUT_S)
        times: dict[str, list[float]] = {label: [] for label in ways}
        devices: dict[str, str] = {}
        for label, (kind, _) in ways.items():
            if kind == "ipc" and s.device != "cuda":
                skipped[label] = "needs CUDA"
        for n in range(s.transfers + 1):  # interleaved; the first round is a warm-up
            for k, (label, (kind, send)) in enumerate(ways.items()):
                if label in skipped:
                    continue
                i = 1 + n * len(ways) + k
                start = time.perf_counter()
                try:
                    devices[label] = ray.get(send(i), timeout=CALL_TIMEOUT_S)
                except Exception as e:  # this way fails: record it, keep the others
                    skipped[label] = f"failed: {type(e).__name__}: {e}"[:2000]
                    continue
                finally:
                    ray.get(sender.drop.remote(i), timeout=CALL_TIMEOUT_S)
                times[label].append(time.perf_counter() - start)
        for label, taken in times.items():
            if taken:
                rows.append(row(f"{s.megabytes} MB actor -> actor: {label}", statistics.median(taken[1:]) * 1e3, "ms"))
        local = ray.get(sender.local_copy_ms.remote(s.megabytes, s.transfers), timeout=CALL_TIMEOUT_S)
        rows.append(row(f"{s.megabytes} MB copy on the device, one process", local, "ms"))
        notes = f"median of {s.transfers} after a warm-up; wall clock from the driver (two actor calls each); devices seen by the receiver: {devices}"
    finally:
        for actor in (sender, receiver):
            ray.kill(actor)
    _wait_released(ray)
    _pipeline_ir_hop(ray, s, rows, skipped)
    return {"rows": rows, "skipped": skipped, "notes": notes}


def make_tensor(arg: tuple[int, int, str]) -> Any:
    """A pipeline_ir GPU step: a fresh tensor of `megabytes` on `device`."""
    import torch

    i, megabytes, device = arg
    return torch.full((megabytes * 2**20 // 4,), float(i), device=device)


def where_is(t: Any) -> tuple[str, float, float]:
    """A pipeline_ir GPU step reading the tensor where it arrived."""
    return str(t.device), float(t[0]), float(t[-1])


def total(t: Any) -> float:
    """A pipeline_ir GPU step: the sum of what arrived."""
    return float(t.sum())


class Keeper:
    """A pipeline_ir GPU step that keeps every tensor it is given, and
    returns the sum of their first elements: a tensor whose memory was
    freed or reused under it (a CUDA IPC lifetime bug) changes that sum."""

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def __call__(self, t: Any) -> float:
        self.kept.append(t)
        return float(sum(float(k[0]) for k in self.kept))


def _pipeline_ir_hop(ray: Any, s: Settings, rows: list[dict[str, Any]], skipped: dict[str, str]) -> None:
    """The same hop between two pipeline_ir GPU steps (`fuse=False`, so
    two actors): over the fast path with CUDA IPC (`cuda_ipc=True`), over
    the fast path through host memory (the default), and through Ray
    actor calls (`fast_path=False`), interleaved, each call's values
    checked. Then CUDA IPC's lifetime on the GPU: one tensor to two steps
    at once, one of which keeps every tensor it gets (`_check_ipc`)."""
    import pipeline_ir as pipeline

    gpus = 0.16  # three pipelines of two GPU actors on one GPU
    make = pipeline.step(make_tensor, execution_mode="actors", num_gpus=gpus, fuse=False)
    read = pipeline.step(where_is, execution_mode="actors", num_gpus=gpus, fuse=False)
    node = read(make(pipeline.INPUT))
    ways = {
        "fast path, cuda_ipc=True": {"cuda_ipc": True},
        "fast path, through host memory (default)": {},
        "Ray actor calls (fast_path=False)": {"fast_path": False},
    }
    deployed: dict[str, Any] = {}
    try:
        for label, options in ways.items():
            deployed[label] = pipeline.compile(node).deploy(**options)
        from pipeline_ir.backends import cuda_ipc

        times: dict[str, list[float]] = {label: [] for label in ways}
        seen: dict[str, str] = {}
        opened = dict.fromkeys(ways, 0)  # CUDA IPC exports the caller opened: did the tensor go that way?
        for i in range(s.transfers + 1):
            for label, p in deployed.items():
                before = cuda_ipc.counts()["opened"]
                start = time.perf_counter()
                device, first, last = p.call((i, s.megabytes, s.device), timeout=CALL_TIMEOUT_S)
                times[label].append(time.perf_counter() - start)
                opened[label] += cuda_ipc.counts()["opened"] - before
                if (first, last) != (float(i), float(i)):
                    raise AssertionError(f"{label}: call {i} read {(first, last)}, expected {float(i)}")
                seen[label] = device
        for label, taken in times.items():
            rows.append(row(f"{s.megabytes} MB GPU step -> GPU step, pipeline_ir: {label}", statistics.median(taken[1:]) * 1e3, "ms"))
        for label in ways:
            rows.append(row(f"CUDA IPC exports the caller opened per call: {label}", opened[label] / (s.transfers + 1), "per call"))
        rows.append(row(f"values checked on every call; devices the reader saw: {seen}", 1.0, "ok"))
    except Exception as e:
        skipped["pipeline_ir GPU step -> GPU step"] = f"failed: {type(e).__name__}: {e}"[:2000]
    finally:
        for p in deployed.values():
            p.shutdown()
    _wait_released(ray)
    try:
        rows.append(_check_ipc(s))
    except Exception as e:
        skipped["cuda_ipc lifetime check"] = f"failed: {type(e).__name__}: {e}"[:2000]


def _check_ipc(s: Settings) -> dict[str, Any]:
    """One CUDA tensor to two GPU steps at once (two exports of one
    tensor), one of them keeping everything it gets, over many calls while
    the producer keeps making new tensors: every sum must be exact."""
    import pipeline_ir as pipeline

    gpus = s.gpus / 2  # three GPU actors on one GPU
    make = pipeline.step(make_tensor, execution_mode="actors", num_gpus=gpus, fuse=False)
    add = pipeline.step(total, execution_mode="actors", num_gpus=gpus, fuse=False)
    keep = pipeline.step(Keeper, execution_mode="actors", num_gpus=gpus, fuse=False)()
    t = make(pipeline.INPUT)
    node = (add(t), keep(t))  # two outputs: call() returns both
    calls = 5 if s.smoke else 40
    megabytes = 1 if s.smoke else 8
    elements = megabytes * 2**20 // 4
    with pipeline.compile(node).deploy(cuda_ipc=True) as p:
        start = 0.0
        for i in range(1, calls + 1):
            if i == 2:
                start = time.perf_counter()  # the first call is a warm-up (the replicas import torch)
            summed, kept = p.call((i, megabytes, s.device), timeout=CALL_TIMEOUT_S)
            if summed != float(i * elements) or kept != float(i * (i + 1) // 2):
                raise AssertionError(f"call {i}: sum {summed} (expected {i * elements}), kept {kept} (expected {i * (i + 1) // 2})")
        seconds = time.perf_counter() - start
    return row(f"cuda_ipc lifetime: {calls} calls of {megabytes} MB to two steps, one keeping all, values exact", seconds / (calls - 1) * 1e3, "ms per call")


# -- b. resnet18, batch 1 vs 16 --


def resnet(ray: Any, s: Settings) -> dict[str, Any]:
    import torch
    import torchvision

    _seed()
    model = torchvision.models.resnet18(weights=None).eval().to(s.device)
    rows = []
    with torch.no_grad():
        for batch in s.batches:
            x = torch.randn(batch, 3, 224, 224, device=s.device)
            for _ in range(s.warmup):
                model(x)
            _sync(s.device)
            events = s.device == "cuda"
            if events:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            start = time.perf_counter()
            for _ in range(s.iterations):
                model(x)
            if events:
                end.record()
            _sync(s.device)
            wall = time.perf_counter() - start
            gpu_ms = begin.elapsed_time(end) if events else wall * 1e3
            rows.append(row(f"resnet18 batch {batch}: {'GPU' if events else 'CPU'} time per image", gpu_ms / (s.iterations * batch), "ms"))
            rows.append(row(f"resnet18 batch {batch}: images/s", s.iterations * batch / wall, "images/s"))
    notes = f"fp32, weights=None, eval, no_grad; {s.warmup} warm-up then {s.iterations} batches; per-image time from CUDA events, images/s from the synchronized wall clock"
    return {"rows": rows, "notes": notes}


# -- c. preprocess -> classify: two actors vs one --


def _transform() -> Any:
    import torch

    try:
        from torchvision.transforms import v2

        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    except ImportError:  # torchvision < 0.16
        from torchvision import transforms

        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def _zero_copy() -> str:
    """Use pipeline_ir's zero-copy tensor serializer, as a pipeline would."""
    try:
        import torch  # noqa: F401  (the serializer registers only once torch is loaded)

        from pipeline_ir.backends.serialization import ensure_registered

        ensure_registered()
        return "pipeline_ir zero-copy"
    except Exception as e:
        return f"Ray's default ({type(e).__name__})"


class Preprocess:
    def __init__(self) -> None:
        self.transform = _transform()
        self.serializer = _zero_copy()

    def run(self, images: list[Any]) -> Any:
        import torch

        return torch.stack([self.transform(image) for image in images])

    def serializer_used(self) -> str:
        return self.serializer


class Classify:
    def __init__(self, device: str) -> None:
        import torch
        import torchvision

        _seed()
        self.device = device
        self.model = torchvision.models.resnet18(weights=None).eval().to(device)
        self.serializer = _zero_copy()
        with torch.no_grad():
            self.model(torch.zeros(1, 3, 224, 224, device=device))

    def run(self, batch: Any) -> list[int]:
        import torch

        with torch.no_grad():
            labels: list[int] = self.model(batch.to(self.device)).argmax(1).tolist()
        return labels


class Both:
    """One GPU actor: preprocess, then classify."""

    def __init__(self, device: str) -> None:
        self.preprocess = Preprocess()
        self.classify = Classify(device)

    def run(self, images: list[Any]) -> list[int]:
        return self.classify.run(self.preprocess.run(images))


def _timed(ways: dict[str, Callable[[list[Any]], object]], s: Settings, skipped: dict[str, str]) -> list[dict[str, Any]]:
    """p50 and p99 ms of each way at each batch size, calls interleaved
    between the ways; a way that fails is recorded in `skipped`."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    rows: list[dict[str, Any]] = []
    for batch in s.batches:
        images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(batch)]
        times: dict[str, list[float]] = {label: [] for label in ways}
        for n in range(s.calls + s.warmup):  # interleaved
            for label, call in ways.items():
                if label in skipped:
                    continue
                start = time.perf_counter()
                try:
                    call(images)
                except Exception as e:  # this way fails: record it, keep the others
                    skipped[label] = f"failed: {type(e).__name__}: {e}"[:2000]
                    continue
                if n >= s.warmup:
                    times[label].append(time.perf_counter() - start)
        for label, taken in times.items():
            if not taken:
                continue
            taken.sort()
            rows.append(row(f"batch {batch}: {label}: p50", taken[len(taken) // 2] * 1e3, "ms"))
            rows.append(row(f"batch {batch}: {label}: p99", taken[min(len(taken) - 1, int(len(taken) * 0.99))] * 1e3, "ms"))
    return rows


class _PreprocessStep:
    """The preprocess as a pipeline_ir step (no GPU, at most 1 CPU: small)."""

    def __init__(self) -> None:
        self.preprocess = Preprocess()

    def __call__(self, images: list[Any]) -> Any:
        return self.preprocess.run(images)


class _ClassifyStep:
    """The classifier as a pipeline_ir step."""

    def __init__(self, device: str) -> None:
        self.classify = Classify(device)

    def __call__(self, batch: Any) -> list[int]:
        return self.classify.run(batch)


def pipeline(ray: Any, s: Settings) -> dict[str, Any]:
    pre = ray.remote(num_cpus=1)(Preprocess).remote()
    cls = ray.remote(num_gpus=s.gpus)(Classify).remote(s.device)
    both = ray.remote(num_gpus=s.gpus)(Both).remote(s.device)
    skipped: dict[str, str] = {}
    try:
        ways: dict[str, Callable[[list[Any]], object]] = {
            "preprocess actor (CPU) -> classifier actor (GPU)": lambda images: ray.get(cls.run.remote(pre.run.remote(images)), timeout=CALL_TIMEOUT_S),
            "one GPU actor doing both": lambda images: ray.get(both.run.remote(images), timeout=CALL_TIMEOUT_S),
        }
        rows = _timed(ways, s, skipped)
        serializer = ray.get(pre.serializer_used.remote(), timeout=CALL_TIMEOUT_S)
    finally:
        for actor in (pre, cls, both):
            ray.kill(actor)
    _wait_released(ray)
    folded = _pipeline_ir_fold(s, rows, skipped)
    notes = (
        f"224x224 uint8 images; transform ToImage, ToDtype(float32, scale), Normalize; {s.calls} calls after {s.warmup} "
        f"warm-up, interleaved; tensors between actors: {serializer}; pipeline_ir: {folded}"
    )
    return {"rows": rows, "skipped": skipped, "notes": notes}


def _wait_released(ray: Any, limit_s: float = 30.0) -> None:
    """Wait (bounded) until killed actors' CPUs and GPUs are free again:
    deploy() checks what is free before it starts anything."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        free, total = ray.available_resources(), ray.cluster_resources()
        if all(free.get(k, 0.0) >= total.get(k, 0.0) for k in ("CPU", "GPU")):
            return
        time.sleep(0.2)


def _pipeline_ir_fold(s: Settings, rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    """The same two steps through pipeline_ir, folded (default passes) and
    split (fuse=False on preprocess), deployed side by side once the raw
    actors are gone (each holds `s.gpus`); rows appended to `rows`.
    Returns what colocate_actors decided, for the notes."""
    import pipeline_ir as pl

    classify = pl.step(_ClassifyStep, execution_mode="actors", num_gpus=s.gpus)
    folded = pl.compile(classify(s.device)(pl.step(_PreprocessStep, execution_mode="actors")()(pl.INPUT)), name="folded")
    split = pl.compile(classify(s.device)(pl.step(_PreprocessStep, execution_mode="actors", fuse=False)()(pl.INPUT)), name="split")
    units = {name: len(c.graph.units()) for name, c in (("folded", folded), ("split", split))}
    with folded.deploy() as one, split.deploy() as two:
        ways: dict[str, Callable[[list[Any]], object]] = {
            "pipeline_ir, preprocess folded in the GPU actor (default)": lambda images: one.call(images, timeout=CALL_TIMEOUT_S),
            "pipeline_ir, split (fuse=False on preprocess)": lambda images: two.call(images, timeout=CALL_TIMEOUT_S),
        }
        rows.extend(_timed(ways, s, skipped))
    record = next((r for rec in folded.records if rec.name == "colocate_actors" for r in rec.rewrites), "no change")
    return f"actor units folded {units['folded']}, split {units['split']}; colocate_actors: {record}"


# -- the run --


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(s: Settings) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "cpu-smoke" if s.smoke else "gpu",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "ray": _version("ray"),
        "numpy": _version("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    else:
        info["gpu"] = None
    return info


# -- d. pipeline_ir's dynamic batching of a GPU model step --


class _BatchedClassifier:
    """resnet18 over a list of images (max_batch_size): one forward a batch."""

    def __init__(self, device: str) -> None:
        import torchvision

        _seed()
        self.device = device
        self.model = torchvision.models.resnet18(weights=None).eval().to(device)

    def __call__(self, images: list[Any]) -> list[int]:
        import torch

        with torch.no_grad():
            x = torch.stack(images).to(self.device)
            return [int(i) for i in self.model(x).argmax(1).tolist()]


class _OneClassifier(_BatchedClassifier):
    """The same model, one image a call."""

    def __call__(self, image: Any) -> int:  # type: ignore[override]
        return super().__call__([image])[0]


def batching(ray: Any, s: Settings) -> dict[str, Any]:
    import torch

    import pipeline_ir as pl

    images = [torch.randn(3, 224, 224) for _ in range(8)]
    calls = 16 if s.smoke else 512
    in_flight = 8 if s.smoke else 128
    rows = []
    rates: dict[str, float] = {}
    variants = {
        "unbatched": pl.step(_OneClassifier, execution_mode="actors", num_gpus=s.gpus),
        "max_batch_size=16": pl.step(
            _BatchedClassifier, execution_mode="actors", num_gpus=s.gpus, max_batch_size=16, batch_wait_timeout_s=0.005
        ),
    }
    for label, step in variants.items():
        with step(s.device)(pl.INPUT).deploy() as p:
            list(p.map([images[i % 8] for i in range(2 * in_flight)], max_in_flight=in_flight))  # warm up
            start = time.perf_counter()
            list(p.map([images[i % 8] for i in range(calls)], max_in_flight=in_flight, timeout=CALL_TIMEOUT_S))
            wall = time.perf_counter() - start
            figures = p.stats()
        rates[label] = calls / wall
        rows.append(row(f"pipeline_ir ACTORS resnet18, {label}, {in_flight} calls in flight: images/s", rates[label], "images/s"))
        batch = next(iter(figures.values())).get("mean_batch_size")
        if batch is not None:
            rows.append(row(f"pipeline_ir ACTORS resnet18, {label}: mean batch size", float(batch), "items"))
    rows.append(row("dynamic batching throughput ratio (batched / unbatched)", rates["max_batch_size=16"] / rates["unbatched"], "x"))
    notes = f"{calls} calls of one 3x224x224 CPU tensor each, {in_flight} in flight (Pipeline.map), one GPU replica; batch_wait_timeout_s=5 ms"
    return {"rows": rows, "notes": notes}


PARTS: dict[str, Callable[[Any, Settings], dict[str, Any]]] = {
    "a_transfer": transfer,
    "b_resnet18": resnet,
    "c_pipeline": pipeline,
    "d_batching": batching,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks that the script runs")
    args = parser.parse_args(argv)
    s = Settings(args.cpu_smoke)
    out = Path(os.environ.get("OUT") or "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_bench.json"
    report: dict[str, Any] = {"machine": {}, "parts": {}}

    def save() -> None:
        path.write_text(json.dumps(report, indent=2) + "\n")

    try:
        report["machine"] = machine(s)
    except Exception:
        report["machine"] = {"error": traceback.format_exc(limit=3)}
    save()
    if not s.smoke and not report["machine"].get("gpu"):
        report["error"] = "no CUDA device: run with --cpu-smoke on a machine without a GPU"
        save()
        print(report["error"], file=sys.stderr)
        return 1
    import ray

    # A Ray of its own (never another user's `ray start` on this machine);
    # smoke: logical CPUs enough for every actor of a part (a GPU machine has
    # 16), and one logical GPU, which the GPU machine has for real.
    options = {"num_gpus": 1, "num_cpus": 16} if s.smoke else {}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **options)
    failed = False
    try:
        for name, part in PARTS.items():
            start = time.monotonic()
            print(f"== {name}", flush=True)
            try:
                result = part(ray, s)
            except Exception:
                result = {"error": traceback.format_exc(limit=6)}
                failed = True
                print(result["error"], file=sys.stderr)
            result["seconds"] = round(time.monotonic() - start, 1)
            report["parts"][name] = result
            save()
            for r in result.get("rows", []):
                print(f"  {r['label']:<72} {r['value']:>10.4g} {r['unit']}")
            for label, reason in result.get("skipped", {}).items():
                print(f"  {label:<72} not run: {reason}")
                failed = failed or reason.startswith("failed")  # the other rows stand; the exit status says so
            print(f"  ({result['seconds']} s)", flush=True)
    finally:
        ray.shutdown()
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
