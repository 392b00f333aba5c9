"""Serving figures (issue 10): what a deployed pipeline costs at rest and
under load, side by side in one run with plain Ray actors doing the same.

- **idle CPU**: a 3-step ACTORS chain deployed with the default passes (one
  actor), the same chain with `channels=True`, and a plain Ray actor (the
  anchor), left alone for IDLE_S seconds each after a few calls: CPU time
  (utime + stime of /proc/PID/stat) of each replica process and of this
  driver process, as a fraction of one core. The replicas' pids come from
  the pipeline's actor pools (private: there is no public API for them).
- **throughput**, 500 calls in flight: the 3-step chain with
  `num_replicas=2` (default passes: one actor per replica) through
  `call_async` under an asyncio window of IN_FLIGHT calls, against plain
  Ray actors awaited the same way: three stage actors per replica with the
  refs chained (as written by hand), and one actor per replica running the
  three stages (the shape our passes produce).
- **fan-out-4 ensemble**: preprocess -> 4 models -> merge, all ACTORS
  steps: p50 and p99 of sequential calls, pipeline_ir with the default
  passes (everything colocated in one actor), with `optimize=False` (one
  actor per step) and hand-written plain Ray actors (six actors, refs
  passed along). Each model is a [1, 256] x [256, 256] float32 product.
- **dynamic batching**: an ACTORS step costing a fixed 2 ms per call
  (time.sleep) plus a numpy [B, 256] x [256, 256] product, with
  `max_batch_size=16, batch_wait_timeout_s=0.005` and without
  (`max_batch_size` omitted), BATCH_IN_FLIGHT calls in flight: items/s.
- **driver memory under a flood**: FLOOD `call_async` gathered at once
  on a one-actor pipeline deployed with `max_in_flight=64,
  overload_timeout_s=60` and without a bound; each call sends 8 KB and
  gets a small int back. The peak RSS of this process (VmHWM, reset through
  /proc/self/clear_refs before each flood) minus its RSS before, and in a
  second pass the tracemalloc peak (Python objects only).

All on one Ray instance, in this process. Each section's rows share a
unit, written in the label; the chart has one panel per section.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import statistics
import textwrap
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pipeline_ir as pipeline


@dataclass(frozen=True)
class Sizes:
    """How much each section runs (the full run, or a smoke run)."""

    idle_s: float = 3.0
    in_flight: int = 500
    throughput_calls: int = 3000
    ensemble_calls: int = 300
    batch_in_flight: int = 256
    batch_items: int = 1500
    unbatched_items: int = 600
    flood: int = 10_000
    flood_bound: int = 64
    warmup: int = 20
    replicas: int = 2  # of the throughput chain, ours and plain
    plain_actors: int = 6  # the anchors' actors; fewer than 6 play several roles each
    ensemble_unoptimized: bool = True  # the optimize=False ensemble: one actor per step
    idle_channels: bool = True  # the channels=True chain at rest (a compiled graph to set up)


FULL = Sizes()
# Smoke: every section and every code path, at the fewest actors (each costs
# a process start, about a second on a loaded 2-core machine).
SMOKE = Sizes(
    idle_s=0.2, in_flight=8, throughput_calls=16, ensemble_calls=4, batch_in_flight=8, batch_items=16,
    unbatched_items=8, flood=40, flood_bound=4, warmup=1, replicas=1, plain_actors=2, ensemble_unoptimized=False,
    idle_channels=False,
)
DIM = 256
FIXED_COST_S = 0.002  # the batched step's cost per call, whatever the batch
MAX_BATCH, BATCH_WAIT_S = 16, 0.005
FLOOD_PAYLOAD = b"x" * 8192
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the steps, plain classes: wrapped by pipeline.step below, or by ray.remote --


class Stage:
    """One stage of the 3-step chain: returns its input."""

    def __call__(self, x: object) -> object:
        return x


class Preprocess:
    def __call__(self, x: int) -> np.ndarray:
        return np.full(DIM, float(x % 7), dtype=np.float32)


class Model:
    """A small model: a [1, 256] x [256, 256] product, one weight per seed."""

    def __init__(self, seed: int) -> None:
        self.w = np.random.default_rng(seed).standard_normal((DIM, DIM), dtype=np.float32)

    def __call__(self, v: np.ndarray) -> float:
        return float((v[None, :] @ self.w).sum())


class Merge:
    def __call__(self, a: float, b: float, c: float, d: float) -> float:
        return (a + b + c + d) / 4


class Scorer:
    """A fixed cost per call plus a small cost per item: one item (unbatched)
    or a list of them (`max_batch_size` set: the step gets a list)."""

    def __init__(self) -> None:
        self.w = np.random.default_rng(0).standard_normal((DIM, DIM), dtype=np.float32)

    def __call__(self, x: int | list[int]) -> float | list[float]:
        items = x if isinstance(x, list) else [x]
        time.sleep(FIXED_COST_S)
        batch = np.repeat(np.asarray(items, dtype=np.float32)[:, None], DIM, axis=1)
        scores = (batch @ self.w).sum(axis=1)
        return [float(s) for s in scores] if isinstance(x, list) else float(scores[0])


class Length:
    def __call__(self, x: bytes) -> int:
        return len(x)


class Plain:
    """The plain Ray actor of the anchors: it can play every role, so that
    one set of actors serves every section."""

    def __init__(self) -> None:
        self.models = {seed: Model(seed) for seed in range(4)}
        self.pre, self.merger = Preprocess(), Merge()

    def stage(self, x: object) -> object:
        return x

    def chain(self, x: object) -> object:  # the 3 stages in one actor
        return self.stage(self.stage(self.stage(x)))

    def preprocess(self, x: int) -> np.ndarray:
        return self.pre(x)

    def score(self, seed: int, v: np.ndarray) -> float:
        return self.models[seed](v)

    def merge(self, a: float, b: float, c: float, d: float) -> float:
        return self.merger(a, b, c, d)

    def pid(self) -> int:
        return os.getpid()


def _actors(cls: type, **options: object) -> Any:
    return pipeline.step(cls, execution_mode="actors", **options)  # type: ignore[call-overload]


def chain_node(replicas: int = 1) -> Any:
    a, b, c = (_actors(Stage, num_replicas=replicas, name=f"stage_{k}") for k in "abc")
    return c()(b()(a()(pipeline.INPUT)))


def ensemble_node() -> Any:
    pre = _actors(Preprocess)()(pipeline.INPUT)
    models = [_actors(Model, name=f"model_{i}")(i)(pre) for i in range(4)]
    return _actors(Merge)()(*models)


class Unavailable(Exception):
    """A section this version of pipeline_ir cannot run (the reason)."""


# -- measuring --


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15


def idle_cores(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each process's CPU over `seconds` of doing nothing, in cores."""
    before = {label: cpu_s(pid) for label, pid in pids.items()}
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return {label: (cpu_s(pid) - before[label]) / elapsed for label, pid in pids.items()}


def replica_pids(p: pipeline.Pipeline) -> list[int]:
    """The pids of a deployed pipeline's actor replicas. Private: reads the
    actor launcher's pools out of the program's closers."""
    pids = []
    for close in p._program.closers:
        for pool in getattr(getattr(close, "__self__", None), "pools", {}).values():
            pids += [slot.pid for slot in pool.slots if slot.pid is not None]
    if not pids:
        raise RuntimeError("found no replica pids in the pipeline's program: its internals changed")
    return pids


def windowed(submit: Callable[[int], Awaitable[object]], calls: int, in_flight: int) -> float:
    """Seconds to run `calls` calls of `submit(i)` with at most `in_flight` at once."""

    async def main() -> float:
        gate = asyncio.Semaphore(in_flight)

        async def one(i: int) -> object:
            async with gate:
                return await submit(i)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(calls)))
        return time.perf_counter() - start

    return asyncio.run(main())


def latencies_ms(call: Callable[[int], object], calls: int, warmup: int) -> list[float]:
    for i in range(warmup):
        call(i)
    out = []
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def p50_p99(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@contextmanager
def rss_peak_delta() -> Iterator[dict[str, float]]:
    """Peak RSS growth of this process inside the block, in MiB ('mib'),
    or nothing where the peak cannot be reset (Linux < 4.0, no /proc)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        yield out
        return
    before = _status_kib("VmRSS")
    yield out
    out["mib"] = (_status_kib("VmHWM") - before) / 1024


# -- the sections; each returns {label: value} --


def idle(ray: Any, plain: Any, sizes: Sizes) -> dict[str, float]:
    """Idle cores: the plain actor alone, then each pipeline deployed."""
    rows: dict[str, float] = {}
    me = os.getpid()
    ray.get(plain.chain.remote(1))
    got = idle_cores({"plain Ray actor": ray.get(plain.pid.remote()), "driver": me}, sizes.idle_s)
    rows["idle: plain Ray actor (anchor)"] = got["plain Ray actor"]
    rows["idle: driver, plain actor only"] = got["driver"]
    variants = [("default passes", False)] + ([("channels=True", True)] if sizes.idle_channels else [])
    for label, channels in variants:
        with pipeline.compile(chain_node(), channels=channels).deploy() as p:
            for i in range(sizes.warmup):
                p.call(i)
            pids = {f"replica {k}": pid for k, pid in enumerate(replica_pids(p))}
            got = idle_cores({**pids, "driver": me}, sizes.idle_s)
        rows[f"idle: 3-step chain, {label}: replicas ({len(pids)})"] = sum(got[k] for k in pids)
        rows[f"idle: driver, chain with {label} deployed"] = got["driver"]
    return rows


def throughput(ray: Any, plain: list[Any], sizes: Sizes) -> dict[str, float]:
    """Calls/s with `sizes.in_flight` in flight: ours vs the plain anchors."""
    rows: dict[str, float] = {}
    n = sizes.replicas
    by_stage = [[_role(plain, 3 * r + k) for k in range(3)] for r in range(n)]  # n replicas of 3 stage actors
    one_actor = [_role(plain, 3 * r) for r in range(n)]

    def by_hand(i: int) -> Any:
        a, b, c = by_stage[i % n]
        return c.stage.remote(b.stage.remote(a.stage.remote(i)))

    async def awaited(ref: Any) -> object:
        return await ref

    with pipeline.compile(chain_node(replicas=n)).deploy() as p:
        for i in range(sizes.warmup):
            p.call(i)
        candidates: dict[str, Callable[[int], Awaitable[object]]] = {
            "pipeline_ir, default passes (one actor per replica)": p.call_async,
            "plain Ray, 3 stage actors per replica, refs chained": lambda i: awaited(by_hand(i)),
            "plain Ray, one actor per replica running the 3 stages": lambda i: awaited(one_actor[i % n].chain.remote(i)),
        }
        for label, submit in candidates.items():
            windowed(submit, sizes.warmup, sizes.in_flight)
            rows[f"throughput: {label}"] = sizes.throughput_calls / windowed(submit, sizes.throughput_calls, sizes.in_flight)
    return rows


def ensemble(ray: Any, plain: list[Any], sizes: Sizes) -> dict[str, float]:
    """p50 and p99 (ms) of sequential calls of the fan-out-4 ensemble."""
    samples: dict[str, list[float]] = {}
    pre, models, merge = _role(plain, 0), [_role(plain, k) for k in range(1, 5)], _role(plain, 5)

    def by_hand(x: int) -> object:
        v = pre.preprocess.remote(x)
        return ray.get(merge.merge.remote(*[m.score.remote(seed, v) for seed, m in enumerate(models)]))

    node = ensemble_node()
    variants = [("pipeline_ir, default passes", True)] + ([("pipeline_ir, optimize=False", False)] if sizes.ensemble_unoptimized else [])
    for label, optimize in variants:
        with pipeline.compile(node, optimize=optimize).deploy() as p:
            assert p.call(3) == by_hand(3)
            samples[label] = latencies_ms(p.call, sizes.ensemble_calls, sizes.warmup)
    samples["plain Ray actors, by hand"] = latencies_ms(by_hand, sizes.ensemble_calls, sizes.warmup)
    rows: dict[str, float] = {}
    for label, ms in samples.items():
        rows[f"ensemble: {label}, p50"], rows[f"ensemble: {label}, p99"] = p50_p99(ms)
    return rows


def _role(plain: list[Any], k: int) -> Any:
    """The plain actor playing role `k` (0-5): its own actor in the full run."""
    return plain[k % len(plain)]


def batching(sizes: Sizes) -> dict[str, float]:
    """Items/s of the Scorer step, batched and not, under load."""
    if "max_batch_size" not in inspect.signature(pipeline.step).parameters:
        raise Unavailable("pipeline.step() has no max_batch_size option in this version")
    rows: dict[str, float] = {}
    variants = {
        f"batched (max_batch_size={MAX_BATCH}, batch_wait_timeout_s={BATCH_WAIT_S})": (
            {"max_batch_size": MAX_BATCH, "batch_wait_timeout_s": BATCH_WAIT_S}, sizes.batch_items
        ),
        "unbatched": ({}, sizes.unbatched_items),
    }
    for label, (options, items) in variants.items():
        try:
            p = _actors(Scorer, **options)()(pipeline.INPUT).deploy()
        except NotImplementedError as e:  # recorded in the IR, not run yet: raised before any actor starts
            raise Unavailable(f"{type(e).__name__}: {e}") from None
        with p:
            assert p.call(2) == Scorer()(2)
            windowed(p.call_async, sizes.warmup, sizes.batch_in_flight)
            rows[f"batching: {label}"] = items / windowed(p.call_async, items, sizes.batch_in_flight)
            if options:
                # Scorer takes one item or a list: make sure it got lists.
                mean = p.stats()["Scorer"].get("mean_batch_size")
                if mean is None:
                    raise Unavailable("the batched step ran one item per call (no mean_batch_size in Pipeline.stats()): this version does not batch yet")
                rows[f"batch size: {label}, mean over the calls"] = float(mean)
    return rows


def flood(sizes: Sizes) -> dict[str, float]:
    """Driver memory (MiB) under `sizes.flood` call_async at once."""
    rows: dict[str, float] = {}
    node = _actors(Length)()(pipeline.INPUT)

    async def gather_all(p: pipeline.Pipeline) -> None:
        results = await asyncio.gather(*(p.call_async(FLOOD_PAYLOAD) for _ in range(sizes.flood)))
        assert results == [len(FLOOD_PAYLOAD)] * sizes.flood

    variants = {
        f"max_in_flight={sizes.flood_bound}": {"max_in_flight": sizes.flood_bound, "overload_timeout_s": 60.0},
        "no bound": {},
    }
    for label, options in variants.items():
        with node.deploy(**options) as p:
            p.call(b"warm")
            with rss_peak_delta() as rss:
                asyncio.run(gather_all(p))
            if "mib" in rss:
                rows[f"flood: {label}, driver peak RSS growth"] = rss["mib"]
            tracemalloc.start()
            try:
                asyncio.run(gather_all(p))
                rows[f"flood: {label}, tracemalloc peak"] = tracemalloc.get_traced_memory()[1] / 2**20
            finally:
                tracemalloc.stop()
    return rows


SECTIONS = {
    "idle": "idle CPU, fraction of one core",
    "throughput": "calls/s",
    "ensemble": "ms per call, fan-out-4 ensemble",
    "batching": "items/s",
    "batch size": "items per call of the batched step (Pipeline.stats())",
    "flood": "MiB",
}


def run(smoke: bool = False) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    sizes = SMOKE if smoke else FULL
    seconds: dict[str, float] = {}
    rows: dict[str, float] = {}
    skipped: dict[str, str] = {}
    actor: Any = ray.remote(Plain)
    plain: list[Any] = [actor.remote() for _ in range(sizes.plain_actors)]
    if not sizes.ensemble_unoptimized:
        skipped["ensemble: pipeline_ir, optimize=False"] = "smoke run: six more actors to start"
    if not sizes.idle_channels:
        skipped["idle: 3-step chain, channels=True"] = "smoke run: a compiled graph to set up and tear down (bench_anchors and bench_passes smoke-run channels=True)"
    if smoke:
        notes = f"Smoke run: figures meaningless; {sizes.plain_actors} plain actors play the anchors' 6 roles, {sizes.replicas} replica(s)."
    else:
        notes = ""

    try:
        ray.get([a.pid.remote() for a in plain])
        sections: list[tuple[str, Callable[[], dict[str, float]]]] = [
            ("idle", lambda: idle(ray, plain[0], sizes)),
            ("throughput", lambda: throughput(ray, plain, sizes)),
            ("ensemble", lambda: ensemble(ray, plain, sizes)),
            ("batching", lambda: batching(sizes)),
            ("flood", lambda: flood(sizes)),
        ]
        for name, section in sections:
            start = time.perf_counter()
            try:
                rows.update(section())
            except Unavailable as e:
                skipped[f"{name}: every row"] = str(e)
            seconds[name] = round(time.perf_counter() - start, 1)
    finally:
        for a in plain:
            ray.kill(a)

    ratios = _ratios(rows)
    return {
        "name": "serving",
        "title": "Serving: idle CPU, throughput at 500 in flight, a fan-out-4 ensemble, dynamic batching, driver memory under a flood",
        "unit": "(unit in each label)",
        "rows": [{"label": label + f" [{_unit(label)}]", "value": value} for label, value in rows.items()],
        "ratios": ratios,
        "skipped": skipped,
        "sections": SECTIONS,
        "section_seconds": seconds,
        "notes": (
            f"one run, one Ray instance, side by side; idle over {sizes.idle_s} s per window (a plain actor alone, "
            f"then each pipeline deployed), from /proc/PID/stat; throughput: {sizes.throughput_calls} calls with at most "
            f"{sizes.in_flight} in flight (asyncio semaphore, call_async or awaited ObjectRefs); ensemble: "
            f"{sizes.ensemble_calls} sequential calls after {sizes.warmup} warm-up calls; batching: "
            f"{sizes.batch_items} (batched) / {sizes.unbatched_items} (unbatched) items with {sizes.batch_in_flight} in flight, "
            f"fixed cost {FIXED_COST_S * 1e3:.0f} ms per call; flood: {sizes.flood} call_async of {len(FLOOD_PAYLOAD)} B "
            "gathered at once, RSS pass then tracemalloc pass. " + notes
        ).strip(),
    }


def _unit(label: str) -> str:
    return SECTIONS[label.split(":", 1)[0]]


def _ratios(rows: dict[str, float]) -> dict[str, float]:
    ratios: dict[str, float] = {}

    def put(key: str, num: str, den: str) -> None:
        if rows.get(num) and rows.get(den):
            ratios[key] = rows[num] / rows[den]

    ours = "throughput: pipeline_ir, default passes (one actor per replica)"
    put("throughput: ours / plain Ray, 3 stage actors per replica", ours, "throughput: plain Ray, 3 stage actors per replica, refs chained")
    put("throughput: ours / plain Ray, one actor per replica", ours, "throughput: plain Ray, one actor per replica running the 3 stages")
    for q in ("p50", "p99"):
        hand = f"ensemble: plain Ray actors, by hand, {q}"
        put(f"ensemble {q}: plain Ray by hand / ours (default passes)", hand, f"ensemble: pipeline_ir, default passes, {q}")
        put(f"ensemble {q}: plain Ray by hand / ours (optimize=False)", hand, f"ensemble: pipeline_ir, optimize=False, {q}")
    batched = [k for k in rows if k.startswith("batching: batched")]
    if batched:
        put("batching: batched / unbatched items/s", batched[0], "batching: unbatched")
    bound = [k for k in rows if k.startswith("flood: max_in_flight") and k.endswith("RSS growth")]
    if bound:
        put("flood: peak RSS growth, no bound / bounded", "flood: no bound, driver peak RSS growth", bound[0])
    tm = [k for k in rows if k.startswith("flood: max_in_flight") and k.endswith("tracemalloc peak")]
    if tm:
        put("flood: tracemalloc peak, no bound / bounded", "flood: no bound, tracemalloc peak", tm[0])
    return ratios


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel of horizontal bars per section (each has its own unit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[str, float]]] = {}
    for row in result["rows"]:
        section, label = row["label"].split(": ", 1)
        groups.setdefault(section, []).append((textwrap.fill(label.rsplit(" [", 1)[0], 44), float(row["value"])))
    heights = [1 + 0.4 * len(g) for g in groups.values()] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, sum(heights) + 1), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (section, items) in zip(axes[:, 0], groups.items()):
        labels, values = zip(*items)
        bars = ax.barh(range(len(values)), values, color="#4477aa")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{section}: {result['sections'].get(section, '')}", fontsize=8)
        ax.margins(x=0.15)  # room for the figures written after the bars
        for bar, value in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.4g}", va="center", fontsize=7)
    skipped = "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())
    fig.suptitle(result["title"] + (f"\nnot run: {skipped}" if skipped else ""), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # the top 3% for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
