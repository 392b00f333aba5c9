"""`GraphData`: a pipeline's fields and the lookups every consumer needs.

This is the Graph without its printed and checked forms: printer.py and
verify.py read it, and graph.py builds the public `Graph` on top of it
(adding `dump`, `to_dot`, `from_json`), so imports run one way:
nodes.py <- graph_data.py <- printer.py, verify.py <- graph.py. Every
Graph is a GraphData; nothing else constructs a bare GraphData.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from pipeline_ir.ir.nodes import AnyNode, Call, Fused, Mode, Placement, StepSpec, node_inputs

CALLER = -1  # the reader of a graph output, in `GraphData.readers()`


@dataclass(frozen=True)
class GraphIndex:
    """Dict lookups over one graph, built in one walk over its nodes.

    `GraphData.index()` builds it on first use and keeps it with that graph
    object (never in its fields, JSON, equality, hash or pickles), so a
    lookup is O(1) and a pass over n nodes stays O(n). A rewritten graph is
    a new object with an index of its own.
    """

    all_nodes: tuple[AnyNode, ...]  # top-level nodes and fused bodies, in order
    nodes: Mapping[int, AnyNode]  # id -> node, fused bodies included
    steps: Mapping[str, StepSpec]  # key -> spec
    position: Mapping[int, int]  # top-level id -> its index in `nodes`
    unit: Mapping[int, int]  # id -> the top-level node it runs in (for a body node, its group)
    calls: Mapping[str, tuple[int, ...]]  # step key -> ids of its call nodes (bodies too), in order

    @staticmethod
    def of(graph: GraphData) -> GraphIndex:
        """The index of `graph`. Where an id or key repeats (verify()
        reports it), the first definition wins, as a scan would find it."""
        flat: list[AnyNode] = []
        unit: dict[int, int] = {}
        position: dict[int, int] = {}
        for i, n in enumerate(graph.nodes):
            if isinstance(n, Fused):
                flat.extend(n.body)
                for b in n.body:
                    unit.setdefault(b.id, n.id)
            flat.append(n)
            unit.setdefault(n.id, n.id)
            position.setdefault(n.id, i)
        nodes: dict[int, AnyNode] = {}
        calls: dict[str, list[int]] = {}
        for n in flat:
            nodes.setdefault(n.id, n)
            if isinstance(n, Call):
                calls.setdefault(n.step, []).append(n.id)
        steps: dict[str, StepSpec] = {}
        for s in graph.steps:
            steps.setdefault(s.key, s)
        return GraphIndex(
            all_nodes=tuple(flat),
            nodes=nodes,
            steps=steps,
            position=position,
            unit=unit,
            calls={k: tuple(v) for k, v in calls.items()},
        )


# `dict=True` gives each instance a `__dict__` that msgspec never encodes,
# compares, hashes, copies or pickles: where the index is cached.
class GraphData(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """The fields of a `Graph` (graph.py documents them) and its lookups."""

    name: str
    nodes: tuple[AnyNode, ...]
    steps: tuple[StepSpec, ...]
    outputs: tuple[int, ...]
    multi_output: bool = False

    # -- lookups (O(1) through the index: the fields stay plain data) --

    def index(self) -> GraphIndex:
        """The lookups of this graph, built once per graph object."""
        return self._index

    @functools.cached_property
    def _index(self) -> GraphIndex:
        return GraphIndex.of(self)

    def node(self, node_id: int) -> AnyNode:
        """The node with id `node_id` (also found inside fused groups)."""
        try:
            return self._index.nodes[node_id]
        except KeyError:
            raise KeyError(f"graph {self.name!r} has no node %{node_id}") from None

    def step(self, key: str) -> StepSpec:
        """The spec of step `key`."""
        try:
            return self._index.steps[key]
        except KeyError:
            raise KeyError(f"graph {self.name!r} has no step {key!r}") from None

    def all_nodes(self) -> tuple[AnyNode, ...]:
        """Top-level nodes and the nodes inside fused groups, in order."""
        return self._index.all_nodes

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

    def to_json(self) -> bytes:
        """The graph as JSON (schema: docs/ir.md). Round-trips exactly."""
        return msgspec.json.encode(self)

    # -- units and placement (a unit: a top-level call or fused group) --

    def callers(self, key: str) -> tuple[Call, ...]:
        """The call nodes of step `key`, inside fused groups too, in order."""
        nodes = self._index.nodes
        return tuple(n for n in (nodes[i] for i in self._index.calls.get(key, ())) if isinstance(n, Call))

    def unit_of(self, node_id: int) -> Call | Fused | None:
        """The top-level call or fused group node `node_id` runs in: itself,
        or the group holding it; None for a node the caller runs outside
        any unit (the input, a top-level constant, projection or switch)."""
        try:
            unit = self._index.nodes[self._index.unit[node_id]]
        except KeyError:
            raise KeyError(f"graph {self.name!r} has no node %{node_id}") from None
        return unit if isinstance(unit, (Call, Fused)) else None

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
