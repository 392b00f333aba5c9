"""What the passes buy on a model-shaped chain: tensors between the steps,
a small answer at the end.

    embed(x: int) -> Tensor[n]  ->  model(Tensor) -> Tensor  ->  head(Tensor) -> float

Three class steps, all ACTORS (then all TASKS), compiled with
`optimize=False` (three processes, the tensors cross the object store
twice per call), with the default passes (colocate_actors / fuse_tasks
make one unit: the tensors never leave its process) and, on actors, with
`channels=True` too (the unit is called over Compiled Graph channels). The tensor size is
swept from none (a one-element tensor) to 16 MB, since the saving is the
hand-off. Per row: warm-up calls, then the median over REPEATS of the mean
latency of BATCH sequential calls.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import pipeline_ir as pipeline

REPEATS = 5
BATCH = 20
WARMUP = 3
SIZES = {"4 B": 1, "256 KB": 2**16, "4 MB": 2**20, "16 MB": 2**22}
# run(smoke=True): the smallest size only, and no optimize=False actor chain
# (three more actors to start): checks that it runs
SMOKE_SIZES = {"4 B": 1}
SMOKE_REPEATS, SMOKE_BATCH, SMOKE_WARMUP = 1, 2, 1


class Embed:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: int) -> torch.Tensor:
        return torch.full((self.n,), float(x))


class Model:
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t.mul(2.0)


class Head:
    def __call__(self, t: torch.Tensor) -> float:
        return float(t[::1024].sum())


def per_call_ms(call: Callable[[object], object], smoke: bool = False) -> float:
    warmup, repeats, batch = (SMOKE_WARMUP, SMOKE_REPEATS, SMOKE_BATCH) if smoke else (WARMUP, REPEATS, BATCH)
    for _ in range(warmup):
        call(1)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batch):
            call(1)
        samples.append((time.perf_counter() - start) / batch * 1e3)
    return statistics.median(samples)


def run(smoke: bool = False) -> dict[str, Any]:
    import ray

    sizes = SMOKE_SIZES if smoke else SIZES
    repeats, batch = (SMOKE_REPEATS, SMOKE_BATCH) if smoke else (REPEATS, BATCH)

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    rows: dict[str, float] = {}
    ratios: dict[str, float] = {}
    skipped: dict[str, str] = {}
    explained: dict[str, str] = {}
    for mode in ("actors", "tasks"):
        embed, model, head = (pipeline.step(execution_mode=mode)(c) for c in (Embed, Model, Head))
        for size_label, n in sizes.items():
            chain = head()(model()(embed(n)(pipeline.INPUT)))
            variants = [(False, False), (True, False)] + ([(True, True)] if mode == "actors" else [])
            if smoke and mode == "actors":
                variants.remove((False, False))
                skipped[f"{mode}, {size_label}, optimize=False"] = "smoke run: three more actors to start"
            for optimize, channels in variants:
                label = f"{mode}, {size_label}" + ("" if optimize else ", optimize=False") + (", channels=True" if channels else "")
                compiled = pipeline.compile(chain, optimize=optimize, channels=channels)
                if optimize and not channels:
                    explained[mode] = compiled.explain()
                with compiled.deploy() as p:
                    rows[label] = per_call_ms(p.call, smoke)
            unopt = rows.get(f"{mode}, {size_label}, optimize=False")
            if unopt is None:
                continue
            ratios[f"{mode}, {size_label}: speed-up from passes"] = unopt / rows[f"{mode}, {size_label}"]
            if mode == "actors":
                ratios[f"{mode}, {size_label}: speed-up from passes + channels"] = unopt / rows[f"{mode}, {size_label}, channels=True"]
    rewrites = {m: [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ")] for m, text in explained.items()}
    return {
        "name": "passes",
        "title": "3 class steps passing tensors (embed -> model -> head), latency per call, without and with passes",
        "unit": "ms per call",
        "rows": [{"label": label, "value": value} for label, value in rows.items()],
        "ratios": ratios,
        "skipped": skipped,
        "notes": (
            f"median of {repeats} batches of {batch} sequential calls; "
            + " / ".join(f"passes on {m}: {'; '.join(r)}" for m, r in rewrites.items())
        ),
    }
