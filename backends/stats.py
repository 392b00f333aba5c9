"""Live per-step figures of a deployed pipeline (`Pipeline.stats()`).

Measured in the caller, where every call starts and ends, so one clock
serves every backend:

- a LOCAL step: the generated code reads the clock around its call;
- a remote unit (a TASKS or ACTORS step, or a fused group): from when it
  could start (submitted, and every remote input it reads was ready) to
  when Ray reported its result ready. That is the time the caller waits
  on it: transfer and queueing included, which is where serving time goes.

Each unit is keyed by its step key (the step's name unless two steps
share one, `model#2`), a remote fused group by its members' keys joined
with `+`. `errors` counts the calls that failed in the unit, as the
StepError or PipelineTimeoutError raised to the caller names it.
Latencies keep the last `WINDOW` samples; LOCAL steps are timed on one
call in `TIMED_EVERY` (a probe around a 100 ns function would double its
cost) and counted on every call. Batched steps add
`mean_batch_size`, reported by their replicas.

The figures are exported through Ray's metrics API (ray.util.metrics) when
the pipeline uses Ray, under the Prometheus names in docs/operations.md,
pushed by one flusher thread a process every `FLUSH_S` seconds so that a
call never pays for it.
"""

from __future__ import annotations

import collections
import copy
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Fused, node_inputs

WINDOW = 4096
TIMED_EVERY = 32
FLUSH_S = 5.0

clock = time.perf_counter


class UnitStats:
    """The counters of one unit. `calls` counts every call that ran, failed
    ones included (`errors` of them)."""

    __slots__ = ("key", "ok", "local", "local_fixed", "errors", "in_flight", "latencies", "batch_items", "batches", "exported")

    def __init__(self, key: str) -> None:
        self.key = key
        self.ok = 0  # remote calls that returned
        # LOCAL calls: counters that generated code bumps at C speed as a
        # straight run of code calling this unit begins (listed once per
        # call of the unit in the run), read without bumping them through
        # a copy; less the calls a failure stopped before they returned
        # (`unreturned`: a failed call counts as an error instead).
        self.local: list[itertools.count[int]] = []
        self.local_fixed = 0
        self.errors = 0
        self.in_flight = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.batch_items = 0
        self.batches = 0
        self.exported = (0, 0)  # calls, errors already pushed to Ray's metrics

    @property
    def calls(self) -> int:
        local = sum(next(copy.copy(counter)) for counter in self.local)
        return self.ok + local + self.local_fixed + self.errors

    def snapshot(self) -> dict[str, float | int | None]:
        lat = sorted(self.latencies)
        figures: dict[str, float | int | None] = {
            "calls": self.calls,
            "errors": self.errors,
            "p50_s": _quantile(lat, 0.50),
            "p99_s": _quantile(lat, 0.99),
            "in_flight": self.in_flight,
        }
        if self.batches:
            figures["mean_batch_size"] = self.batch_items / self.batches
        return figures


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def unit_key(graph: Graph, node: Call | Fused) -> str:
    """The name a unit's figures go under."""
    if isinstance(node, Call):
        return node.step
    return "+".join(b.step for b in node.body if isinstance(b, Call))


class PipelineStats:
    """Every unit's counters, and the hooks the runtime calls."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.units: dict[str, UnitStats] = {}
        self.by_node: dict[int, UnitStats] = {}
        # For a remote node: its inputs, whose ready times bound its start.
        self.inputs: dict[int, tuple[int, ...]] = {}
        for node in graph.all_nodes():
            # A LOCAL fused group runs inline: its steps are the units.
            if isinstance(node, Call) or isinstance(node, Fused) and node.placement.mode != "local":
                key = unit_key(graph, node)
                unit = self.units.get(key)
                if unit is None:
                    unit = self.units[key] = UnitStats(key)
                self.by_node[node.id] = unit
                self.inputs[node.id] = node_inputs(node)
        # Batch sizes by unit key, polled from replicas (ray_actors.py).
        self.batch_sources: list[Callable[[], Mapping[str, tuple[int, int]]]] = []
        self.pipeline_name = graph.name  # the `pipeline` tag of exported metrics

    # -- hooks --

    def counter(self, node_ids: tuple[int, ...]) -> Iterator[int]:
        """Bumped by generated code as a straight run of code calling LOCAL
        nodes `node_ids` begins: one bump counts a call of each."""
        counter = itertools.count()
        for node_id in node_ids:
            self.by_node[node_id].local.append(counter)
        return counter

    def unreturned(self, node_ids: tuple[int, ...]) -> None:
        """LOCAL nodes counted as their run of code began that never
        returned: a failure stopped the run first (codegen.unreturned_at)."""
        for node_id in node_ids:
            self.by_node[node_id].local_fixed -= 1

    def recorder(self, node_id: int) -> Callable[[float], object]:
        """Takes a duration of LOCAL node `node_id` (timed calls only)."""
        return self.by_node[node_id].latencies.append

    def submitted(self, node_id: int) -> float:
        """A remote node was submitted: returns the submission time."""
        self.by_node[node_id].in_flight += 1
        return clock()

    def finished(self, node_id: int, submitted: float, ready: dict[int, float] | None, ok: bool) -> None:
        """A remote node's result is ready (Ray's callback thread). `ready`
        holds the ready times of the call's remote nodes so far."""
        now = clock()
        unit = self.by_node[node_id]
        unit.in_flight -= 1
        if ready is not None:
            ready[node_id] = now
        if not ok:
            return  # counted once, where the call's error is raised (failed)
        start = submitted
        if ready is not None:
            for i in self.inputs[node_id]:
                t = ready.get(i)
                if t is not None and t > start:
                    start = t
        unit.ok += 1
        unit.latencies.append(now - start)

    def failed(self, node_id: int | None) -> None:
        """A call failed in node `node_id` (its error reached the caller)."""
        unit = self.by_node.get(node_id) if node_id is not None else None
        if unit is not None:
            unit.errors += 1

    # -- reading --

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        for source in self.batch_sources:
            try:
                for key, (items, batches) in source().items():
                    if key in self.units:
                        self.units[key].batch_items, self.units[key].batches = items, batches
            except Exception:
                pass  # a replica being replaced: its figures come next time
        return {key: unit.snapshot() for key, unit in self.units.items()}

    def annotate(self, dump: str) -> str:
        """`dump` (the graph's text form) with each node's live figures."""
        figures = self.snapshot()
        lines = []
        for line in dump.splitlines():
            stripped = line.lstrip()
            if stripped.startswith("%") and ":" in stripped:
                head = stripped[1 : stripped.index(":")]
                unit = self.by_node.get(int(head)) if head.isdigit() else None
                if unit is not None:
                    line = f"{line}  [{_figures_text(figures[unit.key])}]"
            lines.append(line)
        return "\n".join(lines)


def _figures_text(f: Mapping[str, float | int | None]) -> str:
    parts = [f"calls={f['calls']}", f"errors={f['errors']}"]
    for name in ("p50_s", "p99_s"):
        value = f[name]
        if value is not None:
            parts.append(f"{name[:3]}={_ms(float(value))}")
    if f["in_flight"]:
        parts.append(f"in_flight={f['in_flight']}")
    if "mean_batch_size" in f and f["mean_batch_size"] is not None:
        parts.append(f"batch={float(f['mean_batch_size']):.1f}")
    return " ".join(parts)


def _ms(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g}us"
    return f"{seconds * 1e3:.3g}ms" if seconds < 1 else f"{seconds:.3g}s"


# -- export through Ray's metrics API --

_exported: weakref.WeakSet[PipelineStats] = weakref.WeakSet()
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()
_metrics: dict[str, Any] = {}


def export(stats: PipelineStats, pipeline: str) -> None:
    """Push `stats` to Ray's metrics every FLUSH_S seconds (Ray pipelines)."""
    global _flusher
    stats.pipeline_name = pipeline
    _exported.add(stats)
    with _flusher_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_forever, name="pipeline_ir-metrics", daemon=True)
            _flusher.start()


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_S)
        try:
            flush()
        except Exception:
            pass  # Ray shut down; the next pipeline's export starts again


def flush() -> None:
    """Push every exported pipeline's figures to Ray's metrics now."""
    from ray.util import metrics

    if not _metrics:
        keys = ("pipeline", "step")
        _metrics["calls"] = metrics.Counter("pipeline_ir_calls", "Calls of a pipeline step that returned", keys)
        _metrics["errors"] = metrics.Counter("pipeline_ir_errors", "Calls that failed in a pipeline step", keys)
        _metrics["in_flight"] = metrics.Gauge("pipeline_ir_in_flight", "Calls of a pipeline step in flight", keys)
        _metrics["p50"] = metrics.Gauge("pipeline_ir_latency_p50_seconds", "Median latency of a pipeline step", keys)
        _metrics["p99"] = metrics.Gauge("pipeline_ir_latency_p99_seconds", "99th percentile latency of a pipeline step", keys)
        _metrics["batch"] = metrics.Gauge("pipeline_ir_mean_batch_size", "Mean batch size of a batched pipeline step", keys)
    for stats in list(_exported):
        name = stats.pipeline_name
        for key, figures in stats.snapshot().items():
            unit = stats.units[key]
            tags = {"pipeline": name, "step": key}
            calls, errors = unit.calls, unit.errors
            if calls > unit.exported[0]:
                _metrics["calls"].inc(calls - unit.exported[0], tags)
            if errors > unit.exported[1]:
                _metrics["errors"].inc(errors - unit.exported[1], tags)
            unit.exported = (calls, errors)
            _metrics["in_flight"].set(unit.in_flight, tags)
            for metric, field in (("p50", "p50_s"), ("p99", "p99_s"), ("batch", "mean_batch_size")):
                value = figures.get(field)
                if value is not None:
                    _metrics[metric].set(float(value), tags)
