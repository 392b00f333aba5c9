"""compile(): trace -> verify -> passes -> CompiledPipeline. Starts nothing."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Unpack

from pipeline_ir.builder import PipelineNode
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Mode
from pipeline_ir.ir.verify import check_types, verify
from pipeline_ir.options import DeployKwargs, DeployOptions
from pipeline_ir.passes import Pass, PassRecord, default_passes, explain, force_backend, place_gpu, run_passes, use_channels
from pipeline_ir.step import ExecutionMode
from pipeline_ir.trace import Bindings, trace

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

    def place(self, cluster_gpus: float) -> CompiledPipeline:
        """This pipeline fitted to a Ray cluster with `cluster_gpus` GPUs:
        deploy() calls it once Ray is up. Runs the place_gpu pass, which
        raises PlacementError naming the GPU steps the cluster cannot hold,
        or with `compile(..., gpu_fallback=True)` runs them on CPU (the
        record then shows in explain()). Returns self when nothing changes."""
        placing = functools.partial(place_gpu, cluster_gpus=cluster_gpus, fallback=self.gpu_fallback)
        graph, records = run_passes(self.graph, [placing], verify_each=True)
        if graph is self.graph:
            return self
        return dataclasses.replace(self, graph=graph, records=self.records + records)

    def deploy(self, **options: Unpack[DeployKwargs]) -> Pipeline:
        """Start what the graph needs (Ray only if a step is remote) and
        return the running Pipeline. The options (see DeployOptions in
        pipeline_ir/options.py: max_in_flight, overload_timeout_s,
        deploy_timeout_s, health checks, retries) bound calls in flight and
        set the timeouts of serving; docs/operations.md says how to size
        them. A bad option is a ValueError, raised before anything starts."""
        from pipeline_ir.pipeline import Pipeline

        return Pipeline(self, DeployOptions(**options))


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
    raise ValueError(f"{where}: unknown backend {backend!r}; use 'local', 'tasks' or 'actors'")


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
    gpu_fallback: at deploy, run GPU steps the Ray cluster has no GPU for
        on CPU (written in explain()) instead of raising PlacementError.
    channels: after the other passes, run `use_channels`: single-replica
        actor units between the caller's values are called over Ray
        Compiled Graph channels (experimental in Ray; off by default).

    Raises PipelineTypeError when annotated types cannot match.
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
