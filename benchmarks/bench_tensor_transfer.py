"""A 100 MB CPU tensor through a 2-actor chain: our serializer vs Ray's paths.

One run measures, side by side, end to end (driver put, two actor hops,
driver get), the median of several calls after warm-up:

- pipeline_ir, 2-actor chain, torch tensor (our zero-copy serializer)
- pipeline_ir, same chain, numpy array of the same size (the floor: Ray's
  own zero-copy path for numpy)
- plain Ray actors, torch tensor, Ray's default path (torch's pickling)
- plain Ray actors, torch tensor, Ray 2.60's opt-in
  RAY_ENABLE_ZERO_COPY_TORCH_TENSORS (set for the actors' processes and,
  the way Ray does it at connect, registered in this driver)
- plain Ray actors, numpy array (what pipeline_ir adds over bare Ray)

Goals (issue 5): ours >= 10x faster than Ray's default path, and within
1.2x of numpy. `run()` starts Ray if this process has not (and stops it
again), so it works alone or under `python -m benchmarks`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

_MB = 100
_REPEATS = 7
_WARMUP = 2
_SMOKE_MB, _SMOKE_REPEATS, _SMOKE_WARMUP = 1, 1, 1  # run(smoke=True): checks that it runs
_OPT_IN = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"


def _identity(x: Any) -> Any:
    return x


class _Hop:
    """A plain Ray actor that hands its input back (the baseline chain)."""

    def f(self, x: Any) -> Any:
        return x


def _interleaved_medians_ms(variants: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median time of each variant, run round-robin so that all of them see
    the object store in the same state (fresh shared memory costs page
    faults on first touch, which would otherwise land on whichever variant
    runs first)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1000.0 for name, ts in times.items()}


def run(smoke: bool = False) -> dict[str, object]:
    """Measure and return the result table (see the module docstring);
    `smoke`: a 1 MB tensor, once."""
    mb, repeats, warmup = (_SMOKE_MB, _SMOKE_REPEATS, _SMOKE_WARMUP) if smoke else (_MB, _REPEATS, _WARMUP)
    import numpy as np
    import ray
    import torch
    from ray._private import tensor_serialization_utils

    import pipeline_ir as pipeline
    from pipeline_ir.backends import serialization

    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    tensor = torch.randn(mb * 1024 * 1024 // 4)
    array = tensor.numpy()
    context = ray._private.worker.global_worker.get_serialization_context()
    hop = ray.remote(num_cpus=0)(_Hop)
    first = pipeline.step(execution_mode="actors", num_cpus=0, name="first")(_identity)
    second = pipeline.step(execution_mode="actors", num_cpus=0, name="second")(_identity)
    chain = pipeline.compile(second(first(pipeline.INPUT)), optimize=False).deploy()
    # Smoke: one actor plays both hops of each plain chain (fewer processes to start).
    hops = 1 if smoke else 2
    plain = [hop.remote() for _ in range(hops)] * (2 // hops)
    opt_in = [hop.options(runtime_env={"env_vars": {_OPT_IN: "1"}}).remote() for _ in range(hops)] * (2 // hops)

    def through_plain(actors: list[Any], x: object = tensor) -> Callable[[], object]:
        return lambda: ray.get(actors[1].f.remote(actors[0].f.remote(x)))

    def ray_default() -> object:
        serialization.unregister()  # this driver back on Ray's default path
        try:
            return through_plain(plain)()
        finally:
            serialization.ensure_registered()

    def ray_opt_in() -> object:
        context._register_cloudpickle_reducer(torch.Tensor, tensor_serialization_utils.zero_copy_tensors_reducer)
        try:
            with warnings.catch_warnings():
                # Ray warns on every send that writes to the tensor may corrupt data.
                warnings.simplefilter("ignore", tensor_serialization_utils.ZeroCopyTensorsWarning)
                return through_plain(opt_in)()
        finally:
            serialization.unregister()
            serialization.ensure_registered()

    try:
        ray.get([a.f.remote(0) for a in plain[:hops] + opt_in[:hops]])
        assert torch.equal(chain.call(tensor), tensor)  # type: ignore[arg-type]
        ms = _interleaved_medians_ms(
            {
                "ours": lambda: chain.call(tensor),
                "numpy": lambda: chain.call(array),
                "default": ray_default,
                "native": ray_opt_in,
                "plain_numpy": through_plain(plain, array),
            },
            repeats,
            warmup,
        )
    finally:
        chain.shutdown()
        for a in plain[:hops] + opt_in[:hops]:
            ray.kill(a)
        if started:
            ray.shutdown()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    ours, numpy, default, native = ms["ours"], ms["numpy"], ms["default"], ms["native"]
    speedup, vs_numpy = default / ours, ours / numpy
    return {
        "name": "tensor_transfer",
        "title": f"{mb} MB CPU float32 tensor through a 2-actor chain (end to end, median of {repeats})",
        "unit": "ms",
        "rows": [
            {"label": "pipeline_ir, torch.Tensor (our serializer)", "value": round(ours, 2)},
            {"label": "pipeline_ir, numpy array (Ray zero-copy)", "value": round(numpy, 2)},
            {"label": "plain Ray actors, torch.Tensor (Ray default)", "value": round(default, 2)},
            {"label": f"plain Ray actors, torch.Tensor ({_OPT_IN}=1)", "value": round(native, 2)},
            {"label": "plain Ray actors, numpy array", "value": round(ms["plain_numpy"], 2)},
        ],
        "ratios": {
            "ray_default_over_ours": round(speedup, 2),
            "ours_over_numpy": round(vs_numpy, 2),
            "ray_opt_in_over_ours": round(native / ours, 2),
        },
        "notes": (
            f"{machine}; torch {torch.__version__}, ray {ray.__version__}, numpy {np.__version__}. "
            f"Goals: ray_default_over_ours >= 10 ({'met' if speedup >= 10 else 'NOT met'}), "
            f"ours_over_numpy <= 1.2 ({'met' if vs_numpy <= 1.2 else 'NOT met'}). "
            "Each call: driver put, two actor hops (each returns its input, so each hop stores a new "
            "object), driver get; zero-copy reads return views of the object store."
        ),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
