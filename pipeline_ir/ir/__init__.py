"""The typed IR: op kinds (nodes.py), types (types.py), the Graph
(graph.py), its text/Graphviz forms (printer.py), invariants (verify.py)
and the switch block structure backends lower (schedule.py)."""

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import (
    AnyNode,
    Call,
    Case,
    Constant,
    External,
    Fused,
    Inline,
    Input,
    Param,
    Project,
    StepSpec,
    Switch,
    node_inputs,
    remap_inputs,
)
from pipeline_ir.ir.types import ANY, TypeRef

__all__ = [
    "ANY",
    "AnyNode",
    "Call",
    "Case",
    "Constant",
    "External",
    "Fused",
    "Graph",
    "Inline",
    "Input",
    "Param",
    "Project",
    "StepSpec",
    "Switch",
    "TypeRef",
    "node_inputs",
    "remap_inputs",
]
