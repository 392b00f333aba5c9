"""fuse_local: adjacent LOCAL steps become one fused node.

The local backend emits a fused group as one block of straight-line code,
so a chain of local steps costs what calling the functions by hand costs,
and mixed graphs see one local unit between remote stages. Steps marked
`fuse=False` stay alone.
"""

from __future__ import annotations

from collections.abc import Hashable

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Placement, StepSpec
from pipeline_ir.passes.grouping import fuse_pass
from pipeline_ir.passes.manager import PassResult


def _local_class(step: StepSpec) -> Hashable | None:
    return "local" if step.placement.mode == "local" and step.fuse else None


def _local(steps: list[StepSpec]) -> Placement:
    return Placement(mode="local")


def fuse_local(graph: Graph) -> PassResult:
    """Fuse each convex group of LOCAL calls with one output."""
    return fuse_pass(graph, _local_class, _local, "adjacent LOCAL steps run as one block of generated code")
