"""compile(): trace -> verify -> passes -> CompiledPipeline. Starts nothing.

`CompiledPipeline.deploy()` fits the graph to the Ray cluster (the place
pass) and builds the running Pipeline; pipeline.py does not import this
module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Unpack

from pipeline_ir.bindings import Bindings
from pipeline_ir.builder import PipelineNode
from pipeline_ir.errors import PipelineValueError, PlacementError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Mode
from pipeline_ir.ir.verify import check_types, verify
from pipeline_ir.options import DeployKwargs, DeployOptions
from pipeline_ir.passes import Pass, PassRecord, default_passes, explain, force_backend, place, run_passes, use_channels
from pipeline_ir.passes.place import Check
from pipeline_ir.passes.place_cluster import Cluster
from pipeline_ir.step import ExecutionMode
from pipeline_ir.trace import trace

if TYPE_CHECKING:
    from pipeline_ir.pipeline import Pipeline

_BACKENDS: dict[str, Mode] = {"local": "local", "tasks": "tasks", "actors": "actors"}


@dataclass(frozen=True)
class CompiledPipeline:
    """A traced, checked and optimized pipeline, ready to deploy.

    `graph` is the optimized IR, `source_graph` the IR as traced; `bindings`
    holds the callables and constants the graph names.
    """

    graph: Graph
    source_graph: Graph
    bindings: Bindings
    records: tuple[PassRecord, ...]
    gpu_fallback: bool = False

    def explain(self) -> str:
        """Each pass that ran, and what it rewrote and why."""
        return explain(self.records)

    def place(self, cluster: Cluster, check: Check = "available") -> CompiledPipeline:
        """This pipeline fitted to a Ray cluster (a `Cluster` snapshot):
        deploy() calls it once Ray is up, when a step is remote. Runs the
        `place` pass, which raises PlacementError, before anything starts,
        when the deployment cannot fit (naming the step, what it needs and
        what the cluster has), and with `compile(..., gpu_fallback=True)`
        runs GPU steps no node can hold on CPU. Its records, one line per
        decision, are appended to explain()."""
        placing = functools.partial(place, cluster=cluster, fallback=self.gpu_fallback, check=check)
        graph, records = run_passes(self.graph, [placing], verify_each=True)
        return dataclasses.replace(self, graph=graph, records=self.records + records)

    def deploy(self, **options: Unpack[DeployKwargs]) -> Pipeline:
        """Start what the graph needs (Ray only if a step is remote) and
        return the running Pipeline.

        The options (DeployOptions in pipeline_ir/options.py: max_in_flight,
        overload_timeout_s, deploy_timeout_s, check_resources, health
        checks, retries) bound calls in flight and set the timeouts of
        serving; docs/operations.md says how to size them. A bad option is
        a ValueError, raised before anything starts. With a remote step,
        Ray is joined first and the graph is fitted to the cluster
        (`place`), which may raise PlacementError before any step starts;
        `Pipeline.compiled` is then the placed pipeline. Replicas not built
        within `deploy_timeout_s` raise PipelineTimeoutError, and every
        actor started is stopped.
        """
        from pipeline_ir.backends.lower import needs_ray
        from pipeline_ir.pipeline import Pipeline

        checked = DeployOptions(**options)
        placed = self._fitted(checked) if needs_ray(self.graph) else self
        return Pipeline(placed, checked)

    def _fitted(self, options: DeployOptions) -> CompiledPipeline:
        """`place` on a fresh snapshot of the cluster. When only what is
        free falls short (`PlacementError.busy`), the snapshot is re-read
        for a moment: Ray reports resources freed by a pipeline that was
        just shut down a little later (about 0.1 s)."""
        from pipeline_ir.backends.lower import cluster_snapshot

        settle = time.monotonic() + min(_SETTLE_S, options.deploy_timeout_s)
        while True:
            try:
                return self.place(cluster_snapshot(), options.check_resources)
            except PlacementError as e:
                if not e.busy or time.monotonic() >= settle:
                    raise
            time.sleep(0.1)


# How long deploy() re-reads a cluster whose free resources fall short.
_SETTLE_S = 3.0


BACKEND_ENV = "PIPELINE_IR_BACKEND"


def _parse_backend(backend: object) -> Mode | None:
    if backend is None:
        # Lets an unchanged script run on another backend:
        # PIPELINE_IR_BACKEND=actors python my_pipeline.py
        backend = os.environ.get(BACKEND_ENV) or None
        if backend is None:
            return None
        where = f"environment variable {BACKEND_ENV}"
    else:
        where = "compile(backend=...)"
    if isinstance(backend, ExecutionMode):
        backend = backend.value
    if isinstance(backend, str) and backend.lower() in _BACKENDS:
        return _BACKENDS[backend.lower()]
    raise PipelineValueError(f"{where}: unknown backend {backend!r}; use 'local', 'tasks' or 'actors'")


def compile(
    outputs: PipelineNode | tuple[PipelineNode, ...] | list[PipelineNode],
    *,
    backend: Mode | ExecutionMode | None = None,
    optimize: bool = True,
    passes: Sequence[Pass] | None = None,
    name: str | None = None,
    debug: bool = False,
    gpu_fallback: bool = False,
    channels: bool = False,
) -> CompiledPipeline:
    """Trace the pipeline ending in `outputs`, check it, and optimize it.

    outputs: a node, or a tuple/list of nodes (call() then returns a tuple).
    backend: run every step on this backend ("local", "tasks", "actors"),
        overriding each step's own execution_mode. When None, the
        environment variable PIPELINE_IR_BACKEND, if set, is used.
    optimize: False runs no optimization pass.
    passes: the optimization passes to run instead of `default_passes()`.
    name: the pipeline's name in dumps (default: its last step's name).
    debug: verify and type-check the graph after every pass.
    gpu_fallback: at deploy, run GPU steps no node of the Ray cluster has
        the GPUs for on CPU (written in explain()) instead of raising
        PlacementError.
    channels: after the other passes, run `use_channels`: single-replica
        actor units between the caller's values are called over Ray
        Compiled Graph channels (experimental in Ray; off by default).

    Raises PipelineTypeError when annotated types cannot match, and
    PipelineValueError for an unknown backend.
    """
    forced = _parse_backend(backend)
    source, bindings = trace(outputs, name=name)
    verify(source)
    check_types(source)
    chosen: list[Pass] = []
    if forced is not None:
        chosen.append(functools.partial(force_backend, backend=forced))
    if optimize:
        chosen.extend(default_passes() if passes is None else passes)
    if channels:
        chosen.append(use_channels)
    graph, records = run_passes(source, chosen, verify_each=debug)
    return CompiledPipeline(graph=graph, source_graph=source, bindings=bindings, records=records, gpu_fallback=gpu_fallback)
