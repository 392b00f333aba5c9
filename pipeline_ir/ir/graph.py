"""`Graph`: the whole pipeline as immutable data, and its text, Graphviz
and JSON forms.

A Graph holds nodes in topological order (nodes.py is the reference of op
kinds), the steps they call, and which nodes are the outputs. Its fields
and lookups live in graph_data.py, printing in printer.py, checking in
verify.py; this file puts them together as the public class, so that it
imports them and none of them imports it.
"""

from __future__ import annotations

import msgspec

from pipeline_ir.ir.graph_data import CALLER, GraphData, GraphIndex
from pipeline_ir.ir.printer import dump, to_dot
from pipeline_ir.ir.verify import verify

__all__ = ["CALLER", "Graph", "GraphIndex"]


# The lookups (`node`, `step`, `all_nodes`, `readers`, `index`) and
# `to_json` are GraphData's; the docstring below is the JSON schema's too.
class Graph(GraphData, frozen=True, kw_only=True, dict=True):
    """A pipeline in the IR.

    `nodes` are in topological order, the input node first. `steps` maps
    each step key used by a `call` node to its spec (a tuple, sorted by
    first use, so that JSON stays canonical). `outputs` are the node ids
    whose values a call returns: one value when `multi_output` is false,
    else a tuple.

    Example (see nodes.py for every op kind)::

        >>> print(compile(double(add_one(INPUT))).graph.dump())
        pipeline double(%0: Any) -> int:
          %1: int = add_one(%0)
          %2: int = double(%1)
          return %2
    """

    @staticmethod
    def from_json(data: bytes | str) -> Graph:
        """Decode a graph from `to_json()` output.

        Decoding is strict and builds only IR structs: it never imports a
        module or unpickles anything. Structure is checked with `verify()`.
        """
        graph = msgspec.json.decode(data, type=Graph)
        verify(graph)
        return graph

    def dump(self) -> str:
        """The graph as text, one node a line (grammar: docs/ir.md)."""
        return dump(self)

    def to_dot(self) -> str:
        """The graph as Graphviz source."""
        return to_dot(self)

    def __str__(self) -> str:
        return self.dump()
