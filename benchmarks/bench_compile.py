"""How compile time grows with the graph: chains and fan-outs of LOCAL steps.

A chain is `s_n(...s_2(s_1(INPUT)))`, a fan-out is `src(INPUT)` read by n
steps that are all outputs (`compile((s_1(src), ..., s_n(src)))`); every
step is its own decorated function (its own StepSpec), so lookups by step
key see n steps. For n in SIZES we time

- `compile(node)` with the default passes, and with `optimize=False`;
- `compiled.graph.dump()` of the optimized graph;
- `compiled.deploy()` (code generation; LOCAL, so no Ray) and shutdown,
  for the chain.

Each figure is the best of several interleaved rounds (a round times every
size once, repeating a small one until it has run about REPEAT_S), since
other work on a shared machine only ever adds time. Goal (issue 9):
compile(1000) / compile(10) <= 100 for both shapes, i.e. no worse than
linear; the chart is log-log, where linear growth is a slope of 1.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pipeline_ir as pipeline
from pipeline_ir.builder import PipelineNode

SIZES = (10, 100, 1000, 2000)
ROUNDS = 5
REPEAT_S = 0.05  # a round repeats a fast measurement until it took this long
SMOKE_SIZES = (10, 20, 40)  # run(smoke=True): checks that it runs, one round


def add_one(x: int) -> int:
    return x + 1


def chain(n: int) -> PipelineNode:
    node: PipelineNode = pipeline.INPUT
    for i in range(n):
        node = pipeline.step(name=f"s{i}")(add_one)(node)
    return node


def fan_out(n: int) -> tuple[PipelineNode, ...]:
    src = pipeline.step(name="src")(add_one)(pipeline.INPUT)
    return tuple(pipeline.step(name=f"s{i}")(add_one)(src) for i in range(n))


def _deploy(compiled: pipeline.CompiledPipeline) -> None:
    with compiled.deploy():
        pass


def _measure(fn: Callable[[], object]) -> float:
    """Seconds per call of `fn`: one call, or the mean of enough calls to
    take about REPEAT_S when one is shorter."""
    gc.collect()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    reps = int(REPEAT_S / max(once, 1e-9))
    if reps <= 1:
        return once
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def cases(sizes: tuple[int, ...] = SIZES) -> dict[str, dict[int, Callable[[], object]]]:
    """Series name -> size -> the thing to time (graphs built beforehand)."""
    out: dict[str, dict[int, Callable[[], object]]] = {}
    for shape, build in (("chain", chain), ("fan-out", fan_out)):
        for n in sizes:
            node = build(n)
            compiled = pipeline.compile(node)
            out.setdefault(f"{shape}: compile", {})[n] = lambda node=node: pipeline.compile(node)
            out.setdefault(f"{shape}: compile optimize=False", {})[n] = lambda node=node: pipeline.compile(node, optimize=False)
            out.setdefault(f"{shape}: graph.dump()", {})[n] = compiled.graph.dump
            if shape == "chain":
                out.setdefault(f"{shape}: deploy() + shutdown", {})[n] = lambda c=compiled: _deploy(c)
    return out


def run(smoke: bool = False) -> dict[str, Any]:
    sizes, rounds = (SMOKE_SIZES, 1) if smoke else (SIZES, ROUNDS)
    # The ratios compare the smallest size with the two largest (full run:
    # n=1000 / n=10 and n=2000 / n=1000).
    small, big, biggest = sizes[0], sizes[-2], sizes[-1]
    series = cases(sizes)
    times: dict[str, dict[int, float]] = {name: {n: float("inf") for n in by_n} for name, by_n in series.items()}
    for _ in range(rounds):
        # Interleaved: a slow spell on the machine hits every size alike.
        for name, by_size in series.items():
            for n, fn in by_size.items():
                times[name][n] = min(times[name][n], _measure(fn))
    rows = [{"label": f"{name}, n={n}", "value": t * 1e3} for name, by_n in times.items() for n, t in by_n.items()]
    ratios: dict[str, float] = {}
    for name, by_n in times.items():
        ratios[f"{name}: n={big} / n={small}"] = by_n[big] / by_n[small]
    for name, by_n in times.items():
        ratios[f"{name}: n={biggest} / n={big}"] = by_n[biggest] / by_n[big]
    return {
        "name": "compile",
        "title": "Compile time against graph size: chains and fan-outs of LOCAL steps, one step each",
        "unit": "ms",
        "rows": rows,
        "ratios": ratios,
        "curves": {name: [[n, t * 1e3] for n, t in by_n.items()] for name, by_n in times.items()},
        "notes": (
            f"best of {rounds} interleaved rounds (fast cases repeated for about {REPEAT_S * 1e3:.0f} ms and averaged); "
            "goal compile n=1000 / n=10 <= 100 (linear or better); n=2000 / n=1000 is 2 when linear"
        ),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Log-log lines, one per series, with a slope-1 guide (linear growth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, points in result["curves"].items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", linestyle="--" if "fan-out" in name else "-", label=name)
    first = min(p[1] for points in result["curves"].values() for p in points[:1])
    sizes = [n for n, _ in next(iter(result["curves"].values()))]
    ns = [sizes[0], sizes[-1]]
    ax.plot(ns, [first, first * ns[1] / ns[0]], color="#bbbbbb", linewidth=4, alpha=0.5, label="linear (slope 1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes (steps)")
    ax.set_ylabel(result["unit"])
    span = f"n={sizes[-2]} / n={sizes[0]}"
    compile_ratios = ", ".join(f"{k.split(':')[0]} {v:.0f}x" for k, v in result["ratios"].items() if k.endswith(f": compile: {span}"))
    ax.set_title(f"{result['title']}\ncompile {span}: {compile_ratios} (goal at n=1000 / n=10: <= 100)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
