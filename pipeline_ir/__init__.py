"""pipeline_ir: compose models into pipelines, compile them to a typed IR,
optimize, and run them locally, in Ray tasks or in Ray actors.

    import pipeline_ir as pipeline

    @pipeline.step
    def add_one(x: int) -> int:
        return x + 1

    with add_one(pipeline.INPUT).deploy() as p:
        assert p.call(1) == 2

This module re-exports the public API and nothing else; importing it never
imports ray or torch.
"""

from pipeline_ir.builder import INPUT, PipelineNode, switch
from pipeline_ir.compile import CompiledPipeline, compile
from pipeline_ir.errors import (
    GraphError,
    PipelineError,
    PipelineOverloadedError,
    PipelineTimeoutError,
    PipelineTypeError,
    PlacementError,
    StepError,
)
from pipeline_ir.ir.graph import Graph
from pipeline_ir.pipeline import Pipeline
from pipeline_ir.step import ExecutionMode, step

__all__ = [
    "INPUT",
    "CompiledPipeline",
    "ExecutionMode",
    "Graph",
    "GraphError",
    "Pipeline",
    "PipelineError",
    "PipelineNode",
    "PipelineOverloadedError",
    "PipelineTimeoutError",
    "PipelineTypeError",
    "PlacementError",
    "StepError",
    "compile",
    "step",
    "switch",
]

__version__ = "0.1.0"
