"""The typed IR: op kinds (nodes.py), where units run (placement.py),
types (types.py), the Graph (graph.py), its text/Graphviz forms
(printer.py), invariants (verify.py) and the switch block structure
backends lower (schedule.py)."""

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import (
    AnyNode,
    Batching,
    Call,
    Case,
    Constant,
    External,
    Fused,
    Inline,
    Input,
    Param,
    Placement,
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
    "Batching",
    "Call",
    "Case",
    "Constant",
    "External",
    "Fused",
    "Graph",
    "Inline",
    "Input",
    "Param",
    "Placement",
    "Project",
    "StepSpec",
    "Switch",
    "TypeRef",
    "node_inputs",
    "remap_inputs",
]
