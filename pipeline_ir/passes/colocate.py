"""colocate: tensors handed between remote units stay on one node.

After fusion, an edge that carries a torch tensor or numpy array between
two remote units (TASKS or ACTORS calls, or fused groups) that stayed
separate still crosses processes. This pass gives both ends a shared
`colocate` label (on the StepSpec of a call, on the Fused node of a
group); the Ray backend schedules units with one label on the same Ray
node, so the tensor moves through that node's shared-memory object store
rather than over the network. Labels are preferences, not requirements:
a unit that does not fit on the node runs elsewhere.

Rules:

- an edge is a tensor edge when the value's type, or failing that the
  parameter's type, is `torch.Tensor` or `numpy.ndarray` (a subclass, or
  a union with one of them); untyped edges are not labelled;
- a label joins whole units: a step's calls share one StepSpec (one pool),
  so all of them carry its label, and labels spread along chains of tensor
  edges (union-find);
- edges from or to LOCAL nodes are not labelled: the caller's process is
  not a Ray unit to schedule;
- a tensor read through a projection passes through the caller (the
  projection runs there), so it is reported and not labelled.

Each tensor edge between separate remote units gets one line in the
records saying why it stayed a cross-process hop (fusion did not merge
its ends) and what was done about it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from pipeline_ir.ir.graph import CALLER, Graph
from pipeline_ir.ir.nodes import AnyNode, Call, Fused, Mode, Project, StepSpec
from pipeline_ir.ir.printer import node_label
from pipeline_ir.ir.types import ANY, TypeRef, render
from pipeline_ir.ir.verify import bind_arguments
from pipeline_ir.passes.colocate_actors import small
from pipeline_ir.passes.grouping import gpu_class
from pipeline_ir.passes.manager import PassResult

TENSOR_TYPES = frozenset({"torch.Tensor", "numpy.ndarray"})

Unit = tuple[str, str]  # ("step", key) or ("fused", id): what a label is set on


def is_tensor(t: TypeRef) -> bool:
    """Whether a value of type `t` may be a torch tensor or numpy array."""
    if t.name == "typing.Union":
        return any(is_tensor(a) for a in t.args)
    return t.name in TENSOR_TYPES or any(b in TENSOR_TYPES for b in t.bases)


@dataclass(frozen=True)
class _Remote:
    """What the pass needs to know of one remote node."""

    unit: Unit
    mode: Mode
    replicas: int
    gpus: float
    steps: tuple[StepSpec, ...]

    @functools.cached_property
    def nofuse(self) -> frozenset[str]:
        """Names of its steps with fuse=False (computed once per unit)."""
        return frozenset(s.name for s in self.steps if not s.fuse)


def _remote(graph: Graph, node: AnyNode) -> _Remote | None:
    match node:
        case Call(step=key):
            s = graph.step(key)
            if not s.placement.remote:
                return None
            return _Remote(("step", key), s.placement.mode, s.placement.num_replicas, gpu_class(s), (s,))
        case Fused(placement=p) if p.remote:
            steps = tuple(graph.step(b.step) for b in node.body if isinstance(b, Call))
            return _Remote(("fused", str(node.id)), p.mode, p.num_replicas, p.num_gpus or 0.0, steps)
        case _:
            return None


class _Memo:
    """What the edges ask about a node, computed once per node in a run of
    the pass: a fused group of B steps read by k units would otherwise cost
    O(k * B), and a node read by k units O(k^2)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.by_id = {n.id: n for n in graph.nodes}
        self.readers = graph.readers()
        self._remote: dict[int, _Remote | None] = {}
        self._label: dict[int, str] = {}
        self._several: dict[int, str | None] = {}

    def remote(self, node_id: int) -> _Remote | None:
        if node_id not in self._remote:
            self._remote[node_id] = _remote(self.graph, self.by_id[node_id])
        return self._remote[node_id]

    def label(self, node_id: int) -> str:
        if node_id not in self._label:
            self._label[node_id] = node_label(self.graph, node_id)
        return self._label[node_id]

    def several_readers(self, node_id: int) -> str | None:
        """`(%2, %3 and the caller)` when `node_id` has several distinct
        readers (at most _SHOWN listed, then how many more), else None."""
        if node_id not in self._several:
            distinct = set(self.readers[node_id])
            text = None
            if len(distinct) > 1:
                others = sorted(distinct - {CALLER})
                used = ", ".join(f"%{r}" for r in others[:_SHOWN])
                if len(others) > _SHOWN:
                    used += f" and {len(others) - _SHOWN} more"
                text = used + (" and the caller" if CALLER in distinct else "")
            self._several[node_id] = text
        return self._several[node_id]


_SHOWN = 8  # readers listed by name in a record; a wide fan-out says how many more


def _edges(graph: Graph, node: Call | Fused) -> list[tuple[int, TypeRef]]:
    """(source id, type) of each value `node` reads, typed by the value or
    else by the parameter it is passed to."""
    if isinstance(node, Fused):
        return [(i, graph.node(i).type) for i in node.inputs]
    sources = node.args + tuple(v for _, v in node.kwargs)
    declared = {i: p.type for i, _, p in bind_arguments(graph.step(node.step), len(node.args), tuple(k for k, _ in node.kwargs))}
    out = []
    for index, source in enumerate(sources):
        t = graph.node(source).type
        out.append((source, t if t != ANY else declared.get(index, ANY)))
    return out


def _why_apart(memo: _Memo, a: _Remote, b: _Remote, source: int, consumer: int) -> str:
    """Why fusion left the producer `a` (node `source`) and the consumer `b`
    (node `consumer`) in separate processes: the first rule that kept them apart."""
    graph = memo.graph
    if a.mode != b.mode:
        return f"one end runs as {a.mode}, the other as {b.mode}"
    nofuse = sorted(a.nofuse | b.nofuse)
    if nofuse:
        return f"{', '.join(nofuse)} {'has' if len(nofuse) == 1 else 'have'} fuse=False"
    batched = sorted({s.name for s in a.steps + b.steps if s.placement.batching is not None})
    if batched:
        return f"{', '.join(batched)} {'is' if len(batched) == 1 else 'are'} batched, and a batched step is a unit of its own"
    if a.gpus != b.gpus and not _foldable(a, b):
        return f"GPU boundary (gpu={a.gpus:g} vs gpu={b.gpus:g})"
    if a.mode == "actors" and a.replicas != b.replicas:
        return f"replica counts differ (x{a.replicas} vs x{b.replicas})"
    used = memo.several_readers(source)
    if used is not None:
        return f"%{source} has several readers ({used}), and a fused group has one output"
    if a.mode == "actors":
        shared = sorted({s.name for s in a.steps + b.steps if _called_outside(graph, s.key, {source, consumer})})
        if shared:
            return f"{', '.join(shared)} also {'runs' if len(shared) == 1 else 'run'} elsewhere, and one step's replica pool is never split"
    if a.mode == "actors" and a.gpus == b.gpus > 0 and any(gpu_class(s) == 0 for s in a.steps + b.steps):
        return "a small CPU step joins one GPU step's actor, and colocate_actors never merges two GPU steps' actors through it"
    return "no fusion pass merged them (fuse_tasks / colocate_actors did not run)"


def _foldable(a: _Remote, b: _Remote) -> bool:
    """Whether a GPU boundary between ACTORS units is one colocate_actors
    may fold across: one end holds only small CPU steps."""
    cpu_end = a if a.gpus == 0 else b if b.gpus == 0 else None
    return a.mode == "actors" and cpu_end is not None and all(small(s) for s in cpu_end.steps)


def _called_outside(graph: Graph, key: str, units: set[int]) -> bool:
    """Whether a top-level node other than `units` calls step `key` (a
    call, or a fused group with such a call in its body). Stops at the
    first call outside them instead of collecting every call of the step."""
    index = graph.index()
    return any(index.unit[c] not in units for c in index.calls.get(key, ()))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Unit, Unit] = {}

    def find(self, u: Unit) -> Unit:
        self.parent.setdefault(u, u)
        while self.parent[u] != u:
            self.parent[u] = self.parent[self.parent[u]]
            u = self.parent[u]
        return u

    def union(self, a: Unit, b: Unit) -> None:
        self.parent[self.find(a)] = self.find(b)


def colocate(graph: Graph) -> PassResult:
    """Label the two ends of every tensor edge between separate remote units."""
    memo = _Memo(graph)
    by_id = memo.by_id
    groups = _UnionFind()
    labelled: list[tuple[Unit, str]] = []  # (consumer unit, record line), in order
    notes: list[str] = []
    for node in graph.nodes:
        b = memo.remote(node.id)
        if b is None or not isinstance(node, (Call, Fused)):
            continue
        for source, t in _edges(graph, node):
            if not is_tensor(t):
                continue
            origin, via = source, None
            while isinstance(projection := by_id[origin], Project):
                via = origin if via is None else via
                origin = projection.source
            a = memo.remote(origin)
            if a is None or a.unit == b.unit:
                continue
            edge = f"%{origin} -> %{node.id} ({render(t)}, {memo.label(origin)} -> {memo.label(node.id)})"
            if via is not None:
                notes.append(f"left {edge} remote: the value is projected by %{via} in the caller, so it goes through the caller")
                continue
            groups.union(a.unit, b.unit)
            labelled.append((b.unit, f"{edge} stays a cross-process hop: {_why_apart(memo, a, b, origin, node.id)}"))
    if not labelled:
        return PassResult(graph, tuple(notes))
    labels = _name_components(graph, groups)
    new_graph = _apply(graph, labels)
    lines = [f"{line}; colocate={labels[u]} puts both ends on one node" for u, line in labelled]
    return PassResult(new_graph, tuple(lines + notes))


def _name_components(graph: Graph, groups: _UnionFind) -> dict[Unit, str]:
    """`c1`, `c2`, ... in the order the components first appear in the graph."""
    names: dict[Unit, str] = {}
    labels: dict[Unit, str] = {}
    for node in graph.nodes:
        r = _remote(graph, node)
        if r is None or r.unit not in groups.parent:
            continue
        root = groups.find(r.unit)
        labels[r.unit] = names.setdefault(root, f"c{len(names) + 1}")
    return labels


_Placed = TypeVar("_Placed", StepSpec, Fused)


def _labelled(thing: _Placed, label: str | None) -> _Placed:
    """`thing` with its placement's colocate label set to `label` (None: unchanged)."""
    if label is None or thing.placement.colocate == label:
        return thing
    return msgspec.structs.replace(thing, placement=msgspec.structs.replace(thing.placement, colocate=label))


def _apply(graph: Graph, labels: dict[Unit, str]) -> Graph:
    steps = tuple(_labelled(s, labels.get(("step", s.key))) for s in graph.steps)
    nodes = tuple(_labelled(n, labels.get(("fused", str(n.id)))) if isinstance(n, Fused) else n for n in graph.nodes)
    if steps == graph.steps and nodes == graph.nodes:
        return graph
    return msgspec.structs.replace(graph, steps=steps, nodes=nodes)
