"""The cost of running a LOCAL chain through pipeline_ir.

A 3-step chain of small functions, deployed (`p.call(x)`), against calling
the same three functions by hand. The local backend generates straight-line
Python for the chain (and fuse_local makes it one block), so what remains is
one method call and one try block per pipeline call. Goal: <= 2x.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import pipeline_ir as pipeline

CALLS = 100_000
REPEATS = 9
SMOKE = {"CALLS": 1000, "REPEATS": 1}  # run(smoke=True): checks that it runs


def add_one(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


def square(x: int) -> int:
    return x * x


def by_hand(x: int) -> int:
    return square(double(add_one(x)))


def _time_calls(fn: Callable[[int], object], calls: int) -> float:
    start = time.perf_counter_ns()
    for i in range(calls):
        fn(i)
    return (time.perf_counter_ns() - start) / calls


def _time_inline(calls: int) -> float:
    start = time.perf_counter_ns()
    for i in range(calls):
        square(double(add_one(i)))
    return (time.perf_counter_ns() - start) / calls


def measure(candidates: dict[str, Callable[[], float]], repeats: int = REPEATS) -> dict[str, float]:
    """Median ns per call of each candidate. Repeats are interleaved, so that
    a noisy neighbour on the machine slows every candidate alike."""
    samples: dict[str, list[float]] = {label: [] for label in candidates}
    for _ in range(repeats):
        for label, timed in candidates.items():
            samples[label].append(timed())
    return {label: statistics.median(values) for label, values in samples.items()}


def run(smoke: bool = False) -> dict[str, Any]:
    calls, repeats = (SMOKE["CALLS"], SMOKE["REPEATS"]) if smoke else (CALLS, REPEATS)
    steps = [pipeline.step(f) for f in (add_one, double, square)]
    node = steps[2](steps[1](steps[0](pipeline.INPUT)))
    with (
        pipeline.compile(node, backend="local").deploy() as optimized,
        pipeline.compile(node, backend="local", optimize=False).deploy() as plain,
    ):
        assert optimized.call(3) == plain.call(3) == by_hand(3)
        ns = measure(
            {
                "by hand: square(double(add_one(x)))": lambda: _time_calls(by_hand, calls),
                "by hand, written in the loop": lambda: _time_inline(calls),
                "pipeline_ir local, optimized": lambda: _time_calls(optimized.call, calls),
                "pipeline_ir local, optimize=False": lambda: _time_calls(plain.call, calls),
            },
            repeats,
        )
    hand, inline = ns["by hand: square(double(add_one(x)))"], ns["by hand, written in the loop"]
    opt, unopt = ns["pipeline_ir local, optimized"], ns["pipeline_ir local, optimize=False"]
    return {
        "name": "local_overhead",
        "title": "3-step LOCAL chain: pipeline_ir p.call(x) vs calling the functions by hand",
        "unit": "ns per call",
        "rows": [{"label": label, "value": value} for label, value in ns.items()],
        "ratios": {
            "optimized / by hand (goal <= 2)": opt / hand,
            "optimize=False / by hand": unopt / hand,
            "optimized / written in the loop": opt / inline,
        },
        "notes": f"median of {repeats} interleaved repeats of {calls} calls each, one process, perf_counter_ns. "
        "'by hand' is one Python function calling the three, as a pipeline call is one call; "
        "'written in the loop' has no call around them.",
    }
