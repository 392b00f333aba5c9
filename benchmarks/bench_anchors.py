"""pipeline_ir against the anchors: what the same 3-stage chain costs per
call when written directly against Ray.

Every row runs the same chain, three stages that return their input, once
with a tiny payload (an int) and once with a 10 MB numpy array:

- plain Ray tasks: `ray.get(c.remote(b.remote(a.remote(x))))`, refs chained;
- plain Ray actors: one actor per stage, refs chained the same way;
- ray.dag: InputNode + `.bind()` on the three actors' methods, `execute()`;
- Ray Compiled Graph: that DAG after `experimental_compile()`. Measured in
  a child process with its own Ray: on this kind of machine its teardown
  can hang and its process can crash at exit, and neither may take the rest
  of the run down (its failure is then recorded in the notes);
- pipeline_ir on the tasks and on the actors backend, compiled with
  `optimize=False` and with the default passes.

Per row: a few warm-up calls, then the median over REPEATS of the mean time
of a batch of sequential calls.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import pipeline_ir as pipeline

REPEATS = 5
BATCH = {"tiny": 40, "10MB": 8}
WARMUP = 3
CHILD_TIMEOUT_S = 150
# run(smoke=True): the tiny payload only, one short batch, one actor playing
# the three plain stages, no optimize=False actor chain (three more actors),
# no channels=True chain (a compiled graph to set up; bench_passes smoke-runs
# one) and no compiled graph's child (a second Ray instance).
SMOKE_LEFT_OUT = {
    "pipeline_ir actors, optimize=False": "smoke run: three more actors to start",
    "pipeline_ir actors, channels=True": "smoke run: a compiled graph to set up (bench_passes smoke-runs channels=True)",
}
SMOKE_PAYLOADS = ("tiny",)
SMOKE_REPEATS, SMOKE_WARMUP = 1, 1
SMOKE_BATCH = 2
ROW_ORDER = [
    "ray tasks",
    "ray actors",
    "ray.dag (actors)",
    "ray compiled graph",
    "pipeline_ir tasks, optimize=False",
    "pipeline_ir tasks",
    "pipeline_ir actors, optimize=False",
    "pipeline_ir actors",
    "pipeline_ir actors, channels=True",
]


def payloads() -> dict[str, object]:
    return {"tiny": 1, "10MB": np.ones(10 * 2**20 // 8, dtype=np.float64)}


@dataclass(frozen=True)
class Counts:
    """How many calls one row takes: `warmup`, then `repeats` batches of `batch`."""

    batch: int
    repeats: int = REPEATS
    warmup: int = WARMUP
    smoke: bool = False  # fewer actors too (see SMOKE_PAYLOADS)


def counts(payload: str, smoke: bool) -> Counts:
    return Counts(SMOKE_BATCH, SMOKE_REPEATS, SMOKE_WARMUP, smoke=True) if smoke else Counts(BATCH[payload])


def per_call_ms(call: Callable[[object], object], x: object, n: Counts) -> float:
    """Median over `n.repeats` of the mean latency of `n.batch` sequential calls."""
    for _ in range(n.warmup):
        call(x)
    samples = []
    for _ in range(n.repeats):
        start = time.perf_counter()
        for _ in range(n.batch):
            call(x)
        samples.append((time.perf_counter() - start) / n.batch * 1e3)
    return statistics.median(samples)


# -- the chain, as pipeline_ir steps (the backend is chosen at compile) --


@pipeline.step
def stage_a(x: object) -> object:
    return x


@pipeline.step
def stage_b(x: object) -> object:
    return x


@pipeline.step
def stage_c(x: object) -> object:
    return x


def _ray() -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    return ray


def _stage_actor(ray: Any) -> Any:
    @ray.remote
    class Stage:
        def forward(self, x: object) -> object:
            return x

    return Stage


def ray_anchors(ray: Any, x: object, n: Counts) -> dict[str, float]:
    """Plain Ray tasks, plain actors, and ray.dag over the same actors."""
    from ray.dag import InputNode

    @ray.remote  # type: ignore[untyped-decorator]  # ray ships no type information
    def stage(x: object) -> object:
        return x

    distinct = [_stage_actor(ray).remote() for _ in range(1 if n.smoke else 3)]
    actors = distinct * (3 // len(distinct))
    with InputNode() as inp:
        dag = actors[2].forward.bind(actors[1].forward.bind(actors[0].forward.bind(inp)))

    def run_dag(v: object) -> object:
        with warnings.catch_warnings():  # deprecated in Ray 2.60, still the interpreted-DAG API
            warnings.simplefilter("ignore")
            return ray.get(dag.execute(v))

    try:
        return {
            "ray tasks": per_call_ms(lambda v: ray.get(stage.remote(stage.remote(stage.remote(v)))), x, n),
            "ray actors": per_call_ms(
                lambda v: ray.get(actors[2].forward.remote(actors[1].forward.remote(actors[0].forward.remote(v)))), x, n
            ),
            "ray.dag (actors)": per_call_ms(run_dag, x, n),
        }
    finally:
        for a in distinct:
            ray.kill(a)


def pipeline_rows(x: object, n: Counts) -> tuple[dict[str, float], dict[str, str]]:
    """pipeline_ir's tasks and actors backends, without passes, with the
    default passes, and (actors) with Compiled Graph channels too."""
    chain = stage_c(stage_b(stage_a(pipeline.INPUT)))
    rows: dict[str, float] = {}
    explained: dict[str, str] = {}
    variants = [("tasks", False, False), ("tasks", True, False), ("actors", False, False), ("actors", True, False), ("actors", True, True)]
    if n.smoke:
        variants = [v for v in variants if v[0] == "tasks" or v == ("actors", True, False)]
    for backend, optimize, channels in variants:
        label = f"pipeline_ir {backend}" + ("" if optimize else ", optimize=False") + (", channels=True" if channels else "")
        compiled = pipeline.compile(chain, backend=backend, optimize=optimize, channels=channels)
        explained[label] = compiled.explain()
        with compiled.deploy() as p:
            rows[label] = per_call_ms(p.call, x, n)
    return rows, explained


def compiled_graph_child() -> None:
    """In the child process: time the compiled graph, print JSON, exit."""
    ray = _ray()
    from ray.dag import DAGContext, InputNode

    DAGContext.get_current().teardown_timeout = 5
    actors = [_stage_actor(ray).remote() for _ in range(3)]
    with InputNode() as inp:
        dag = actors[2].forward.bind(actors[1].forward.bind(actors[0].forward.bind(inp)))
    compiled = dag.experimental_compile()
    rows = {}
    for name, x in payloads().items():
        rows[f"{name}: ray compiled graph"] = per_call_ms(lambda v: ray.get(compiled.execute(v)), x, counts(name, smoke=False))
    print("@@" + json.dumps(rows), flush=True)
    compiled.teardown(kill_actors=True)
    ray.shutdown()


def compiled_graph_rows() -> tuple[dict[str, float], str]:
    """Run `compiled_graph_child` in a subprocess; rows, or why there are none."""
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_anchors", "--compiled-graph-child"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        for line in out.splitlines():
            if line.startswith("@@"):
                return json.loads(line[2:]), f"the compiled graph was timed, but its teardown hung past {CHILD_TIMEOUT_S} s (child killed)"
        return {}, f"the compiled graph did not finish within {CHILD_TIMEOUT_S} s"
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            note = "" if proc.returncode == 0 else f"the compiled graph's process exited with status {proc.returncode} after it was timed"
            return json.loads(line[2:]), note
    error = [ln for ln in proc.stderr.splitlines() if "Error" in ln][-3:]
    return {}, f"compiled graph failed (exit {proc.returncode}): {' | '.join(error) or proc.stderr[-300:]}"


def run(smoke: bool = False) -> dict[str, Any]:
    ray = _ray()
    rows: dict[str, float] = {}
    skipped: dict[str, str] = {}
    notes: list[str] = []
    explained: dict[str, str] = {}
    chosen = {name: x for name, x in payloads().items() if not smoke or name in SMOKE_PAYLOADS}
    for name, x in chosen.items():
        for label, value in ray_anchors(ray, x, counts(name, smoke)).items():
            rows[f"{name}: {label}"] = value
        try:
            ours, explained = pipeline_rows(x, counts(name, smoke))
        except Exception as e:  # the backend or a pass is not ready: say so
            if smoke:
                raise  # a smoke run is there to catch exactly this
            for backend in ("tasks", "actors"):
                for suffix in (", optimize=False", "", ", channels=True"):
                    skipped[f"{name}: pipeline_ir {backend}{suffix}"] = f"{type(e).__name__}: {e}"
        else:
            rows.update({f"{name}: {label}": value for label, value in ours.items()})
        if smoke:
            skipped.update({f"{name}: {label}": reason for label, reason in SMOKE_LEFT_OUT.items()})
    if smoke:
        cg_rows, cg_note = {}, "smoke run: the compiled graph's child would start a second Ray instance"
    else:
        cg_rows, cg_note = compiled_graph_rows()
    rows.update(cg_rows)
    if cg_note:
        notes.append(cg_note)
    for name in chosen:
        if f"{name}: ray compiled graph" not in rows:
            skipped[f"{name}: ray compiled graph"] = cg_note
    order = [f"{name}: {label}" for name in chosen for label in ROW_ORDER]
    ordered = sorted(rows.items(), key=lambda kv: order.index(kv[0]))

    ratios: dict[str, float] = {}
    for name in chosen:
        for backend, anchor in (("tasks", "ray tasks"), ("actors", "ray actors")):
            opt, unopt = rows.get(f"{name}: pipeline_ir {backend}"), rows.get(f"{name}: pipeline_ir {backend}, optimize=False")
            if opt and unopt:
                ratios[f"{name}: {backend} speed-up from passes"] = unopt / opt
            channel = rows.get(f"{name}: pipeline_ir {backend}, channels=True")
            if channel and unopt:
                ratios[f"{name}: {backend} speed-up from passes + channels"] = unopt / channel
            if opt and f"{name}: {anchor}" in rows:
                ratios[f"{name}: {anchor} / pipeline_ir {backend}"] = rows[f"{name}: {anchor}"] / opt
    for backend in ("tasks", "actors"):
        rewrites = [ln.strip()[2:] for ln in explained.get(f"pipeline_ir {backend}", "").splitlines() if ln.strip().startswith("- ") and "compile(backend=" not in ln]
        if rewrites:
            notes.append(f"passes on the {backend} chain: " + " / ".join(rewrites))
    notes.append("the compiled graph runs in a child process with its own Ray; its compile and teardown are not timed")
    notes.append("DAGNode.execute() is deprecated in Ray 2.60 (warning silenced)")
    if smoke:
        notes.append(f"smoke run: {SMOKE_BATCH} calls per row")
    else:
        notes.append(f"median of {REPEATS} batches of {BATCH['tiny']} (tiny) or {BATCH['10MB']} (10MB) sequential calls")
    return {
        "name": "anchors",
        "title": "3-stage chain, latency per call: Ray tasks / actors / ray.dag / compiled graph vs pipeline_ir",
        "unit": "ms per call",
        "rows": [{"label": label, "value": value} for label, value in ordered],
        "ratios": ratios,
        "notes": "; ".join(notes),
        "skipped": skipped,
    }


if __name__ == "__main__" and "--compiled-graph-child" in sys.argv:
    compiled_graph_child()
