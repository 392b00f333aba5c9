"""What every pass test checks besides its golden dumps: the pass is pure
(its input is unchanged), leaves a verified, type-checked graph that
round-trips through JSON, changes nothing when run again, and keeps the
pipeline's results (checked by running both graphs on the local backend)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pipeline_ir as pipeline
from pipeline_ir.compile import CompiledPipeline
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.verify import check_types, verify
from pipeline_ir.passes import Pass, PassResult, force_backend, run_passes
from pipeline_ir.trace import trace


def traced(outputs: pipeline.PipelineNode | tuple[pipeline.PipelineNode, ...], name: str | None = None) -> CompiledPipeline:
    """The pipeline as traced, on the steps' own modes (whatever
    PIPELINE_IR_BACKEND says), with no pass run."""
    graph, bindings = trace(outputs, name=name)
    verify(graph)
    check_types(graph)
    return CompiledPipeline(graph=graph, source_graph=graph, bindings=bindings, records=())


def apply(p: Pass, graph: Graph) -> PassResult:
    """Run `p` on `graph` with every check a pass must pass."""
    before = graph.to_json()
    result = p(graph)
    assert graph.to_json() == before, "the pass changed its input"
    if result.graph is not graph:
        assert result.graph != graph, "a pass that changes nothing must return the same object"
    verify(result.graph)
    check_types(result.graph)
    assert Graph.from_json(result.graph.to_json()) == result.graph
    again = p(result.graph)
    assert again.graph is result.graph, f"running the pass twice changed the graph:\n{again.graph.dump()}"
    return result


def run_locally(compiled: CompiledPipeline, graph: Graph, inputs: Sequence[object]) -> list[object]:
    """Results of `graph` (with `compiled`'s bindings) on each input, every
    step forced onto the local backend; an exception's cause type stands
    for a failed call."""
    local, _ = run_passes(graph, [functools.partial(force_backend, backend="local")], verify_each=True)
    program = CompiledPipeline(graph=local, source_graph=compiled.source_graph, bindings=compiled.bindings, records=())
    out: list[object] = []
    with program.deploy() as p:
        for x in inputs:
            try:
                out.append(p.call(x))
            except pipeline.StepError as e:
                out.append(type(e.__cause__))
    return out


def same_results(compiled: CompiledPipeline, after: Graph, inputs: Sequence[object]) -> None:
    """The traced graph and `after` give equal results on `inputs`."""
    assert run_locally(compiled, compiled.graph, inputs) == run_locally(compiled, after, inputs)
