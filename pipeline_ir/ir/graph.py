"""`Graph`: the whole pipeline as immutable data, and its JSON form.

A Graph holds nodes in topological order (nodes.py is the reference of op
kinds), the steps they call, and which nodes are the outputs. Printing lives
in printer.py, checking in verify.py; this file holds only the structure and
the lookups every consumer needs.
"""

from __future__ import annotations

import msgspec

from pipeline_ir.ir.nodes import AnyNode, Call, Fused, Mode, Placement, StepSpec, node_inputs


CALLER = -1  # the reader of a graph output, in `Graph.readers()`


class Graph(msgspec.Struct, frozen=True, kw_only=True):
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

    name: str
    nodes: tuple[AnyNode, ...]
    steps: tuple[StepSpec, ...]
    outputs: tuple[int, ...]
    multi_output: bool = False

    # -- lookups (computed on demand: the Graph itself stays plain data) --

    def node(self, node_id: int) -> AnyNode:
        """The node with id `node_id` (also found inside fused groups)."""
        for n in self.all_nodes():
            if n.id == node_id:
                return n
        raise KeyError(f"graph {self.name!r} has no node %{node_id}")

    def step(self, key: str) -> StepSpec:
        """The spec of step `key`."""
        for s in self.steps:
            if s.key == key:
                return s
        raise KeyError(f"graph {self.name!r} has no step {key!r}")

    def all_nodes(self) -> tuple[AnyNode, ...]:
        """Top-level nodes and the nodes inside fused groups, in order."""
        out: list[AnyNode] = []
        for n in self.nodes:
            if isinstance(n, Fused):
                out.extend(n.body)
            out.append(n)
        return tuple(out)

    def readers(self) -> dict[int, list[int]]:
        """For each top-level node id, the ids of top-level nodes reading it,
        one entry per reading (a node read twice appears twice); a graph
        output is also read by the caller, recorded as `CALLER`."""
        readers: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in node_inputs(n):
                readers[i].append(n.id)
        for o in self.outputs:
            readers[o].append(CALLER)
        return readers

    # -- serialized forms --

    def to_json(self) -> bytes:
        """The graph as JSON (schema: docs/ir.md). Round-trips exactly."""
        return msgspec.json.encode(self)

    @staticmethod
    def from_json(data: bytes | str) -> Graph:
        """Decode a graph from `to_json()` output.

        Decoding is strict and builds only IR structs: it never imports a
        module or unpickles anything. Structure is checked with `verify()`.
        """
        from pipeline_ir.ir.verify import verify

        graph = msgspec.json.decode(data, type=Graph)
        verify(graph)
        return graph

    def dump(self) -> str:
        """The graph as text, one node a line (grammar: docs/ir.md)."""
        from pipeline_ir.ir.printer import dump

        return dump(self)

    def to_dot(self) -> str:
        """The graph as Graphviz source."""
        from pipeline_ir.ir.printer import to_dot

        return to_dot(self)

    def __str__(self) -> str:
        return self.dump()

    # -- units and placement (a unit: a top-level call or fused group) --

    def callers(self, key: str) -> tuple[Call, ...]:
        """The call nodes of step `key`, inside fused groups too, in order."""
        return tuple(n for n in self.all_nodes() if isinstance(n, Call) and n.step == key)

    def unit_of(self, node_id: int) -> Call | Fused | None:
        """The top-level call or fused group node `node_id` runs in: itself,
        or the group holding it; None for a node the caller runs outside
        any unit (the input, a top-level constant, projection or switch)."""
        for n in self.nodes:
            if n.id == node_id:
                return n if isinstance(n, (Call, Fused)) else None
            if isinstance(n, Fused) and any(b.id == node_id for b in n.body):
                return n
        raise KeyError(f"graph {self.name!r} has no node %{node_id}")

    def placement_of(self, node_id: int) -> Placement:
        """Where node `node_id` runs: the placement of its unit (a call's
        step, or the fused group holding it); LOCAL outside any unit."""
        unit = self.unit_of(node_id)
        return _IN_CALLER if unit is None else self.unit_placement(unit)

    def unit_placement(self, unit: Call | Fused) -> Placement:
        """The placement of a top-level call (its step's) or fused group."""
        return unit.placement if isinstance(unit, Fused) else self.step(unit.step).placement

    def units(self) -> tuple[Call | Fused, ...]:
        """The top-level calls and fused groups, in order."""
        return tuple(n for n in self.nodes if isinstance(n, (Call, Fused)))

    def modes(self) -> set[Mode]:
        """The execution modes the graph's units run in."""
        return {self.unit_placement(u).mode for u in self.units()}


_IN_CALLER = Placement()
