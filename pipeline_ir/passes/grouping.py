"""Forming fused groups: the mechanism the fusion passes share.

A fusion pass says which call nodes may share a group (`group_class`: equal
classes may fuse, None never) and how the group runs (`placement`, the
group's Placement). A pass whose classes are more than equal-or-not (a
small CPU step may join a GPU step's actor: colocate_actors.py) also gives
`join`: the class of a group grown by one node, or None when they stay
apart. This module finds the groups and rewrites the graph. A group grows
backwards from a node into a producer when the producer is the end of a
group whose class joins the node's and the node is its only reader, so
every member but the last is read only inside the group: groups are
convex (no path leaves and re-enters) and have one output. Projections of
a group's last node, and constants read only inside a group, join it too.
A group needs two calls or more to be formed.

Because every member but the last is read only inside its group, a group
never spans a switch: all of its members run in the same arm as its last
node (see ir/schedule.py), so fusing never makes a branch run when it was
not chosen. Switch nodes themselves never join a group.

Rules every fusion pass shares, applied here:

- a batched step (`max_batch_size`) never joins a group: its callable
  takes a list of inputs and returns a list, so it cannot be inlined into
  straight-line code over single values. It stays its own unit, and the
  pass says so when it would otherwise have been fused;
- a group is idempotent only if all of its members are: retrying the
  group runs every member again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import msgspec

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import AnyNode, Call, Constant, Fused, Placement, Project, StepSpec, node_inputs, remap_inputs
from pipeline_ir.ir.printer import placement_text
from pipeline_ir.passes.manager import PassResult


GroupClass = Callable[[StepSpec], Hashable | None]
# (class of a producer's group, class of the node reading it) -> the class
# of the group grown by that node, or None: they stay apart.
Join = Callable[[Hashable, Hashable], Hashable | None]


def same(group: Hashable, node: Hashable) -> Hashable | None:
    """The plain rule: equal classes fuse."""
    return group if group == node else None


def unbatched(group_class: GroupClass) -> GroupClass:
    """`group_class`, with batched steps kept out of every group."""

    def klass(step: StepSpec) -> Hashable | None:
        return None if step.placement.batching is not None else group_class(step)

    return klass


def gpu_class(step: StepSpec) -> float:
    """The GPU share a step asks for, 0 for none: steps fuse only with
    steps that ask for the same share, so a CPU step never holds a GPU and
    two GPU models never have to share one they each asked for whole."""
    return step.placement.num_gpus or 0.0


def combined_cpus(steps: list[StepSpec]) -> float | None:
    """The CPUs one unit running `steps` one after another needs: the most
    any of them asks for (None, Ray's default of one, counts as 1), or None
    when none asks explicitly. Never more than some member alone needed,
    so a fused unit fits wherever its largest member fit."""
    cpus = [s.placement.num_cpus for s in steps]
    if all(c is None for c in cpus):
        return None
    return max(1.0 if c is None else c for c in cpus)


def combined_gpus(steps: list[StepSpec]) -> float | None:
    """The GPU share of a unit of steps grouped by `gpu_class`: the share
    of its GPU members (all equal), None if it has none. A CPU member
    (share 0, folded into a GPU step's actor) asks for none of its own."""
    share = max(gpu_class(s) for s in steps)
    return share or None


def find_groups(graph: Graph, group_class: GroupClass, join: Join = same) -> list[list[int]]:
    """Groups of node ids (in topological order) of two calls or more, in
    the order of their last nodes. O(n log n): members are sorted once,
    at the end. A node reading several groups takes them in the order of
    its inputs, each whose class joins what it has taken so far."""
    readers = graph.readers()
    position = graph.index().position
    by_id = {n.id: n for n in graph.nodes}
    # Last node of each group -> the group. Only a group's last node can be
    # absorbed by a later node (every other member is read inside it).
    tail: dict[int, _Group] = {}

    # Node id -> the one node reading it, for nodes read by one node only
    # (maybe several times): computed once, as a fan-out has many readers.
    sole_reader = {i: rs[0] for i, rs in readers.items() if rs and rs.count(rs[0]) == len(rs)}

    def absorbable(producer: int, reader: int) -> _Group | None:
        g = tail.get(producer)
        return g if g is not None and sole_reader.get(producer) == reader else None

    for n in graph.nodes:
        k: Hashable | None = None
        absorbed: list[_Group] = []
        if isinstance(n, Call) and (k := group_class(graph.step(n.step))) is not None:
            for i in dict.fromkeys(node_inputs(n)):
                if (g := absorbable(i, n.id)) is not None and (grown := join(g.klass, k)) is not None:
                    k = grown
                    absorbed.append(tail.pop(i))
        elif isinstance(n, Project) and (source := absorbable(n.source, n.id)) is not None:
            # A projection of a group's last node: it keeps the group's class.
            k = source.klass
            absorbed.append(tail.pop(n.source))
        if k is None:
            continue
        # The largest absorbed group takes in the others: each id is copied
        # O(log n) times in all, where copying every group would be O(n).
        absorbed.sort(key=lambda g: -len(g.members))
        group = absorbed[0] if absorbed else _Group(k, [])
        for other in absorbed[1:]:
            group.members.extend(other.members)
        group.klass = k
        group.members.append(n.id)
        tail[n.id] = group
    groups = [g.members for g in tail.values() if sum(isinstance(by_id[i], Call) for i in g.members) >= 2]
    # A constant read only inside one group joins it.
    group_of = {m: gi for gi, ids in enumerate(groups) for m in ids}
    for c in graph.nodes:
        if isinstance(c, Constant) and readers[c.id]:
            owners = {group_of.get(r) for r in readers[c.id]}
            if len(owners) == 1 and (gi := owners.pop()) is not None:
                groups[gi].append(c.id)
    return [sorted(ids, key=position.__getitem__) for ids in groups]


@dataclass
class _Group:
    """A group being formed: its class and its member ids (unordered)."""

    klass: Hashable
    members: list[int]


def fuse(graph: Graph, groups: list[list[int]], placement: Callable[[list[StepSpec]], Placement]) -> tuple[Graph, list[Fused]]:
    """Replace each group by one Fused node placed where its last member was."""
    if not groups:
        return graph, []
    by_id = {n.id: n for n in graph.nodes}
    next_id = max(n.id for n in graph.all_nodes()) + 1
    sink_to_fused: dict[int, Fused] = {}
    dropped: set[int] = set()
    for ids in groups:
        body = tuple(by_id[i] for i in ids)
        inside = set(ids)
        inputs = tuple(dict.fromkeys(i for b in body for i in node_inputs(b) if i not in inside))
        steps = [graph.step(b.step) for b in body if isinstance(b, Call)]
        # Retrying the group runs every member again.
        where = msgspec.structs.replace(placement(steps), idempotent=all(s.placement.idempotent for s in steps))
        fused = Fused(
            id=next_id,
            type=body[-1].type,
            placement=where,
            inputs=inputs,
            body=tuple(b for b in body if isinstance(b, (Call, Constant, Project))),
            output=ids[-1],
        )
        next_id += 1
        sink_to_fused[ids[-1]] = fused
        dropped.update(ids)
    mapping = {sink: f.id for sink, f in sink_to_fused.items()}
    nodes: list[AnyNode] = []
    for n in graph.nodes:
        if n.id in sink_to_fused:
            # A group may read another group's last node: it reads that
            # group's Fused node now (its own members are never sinks of
            # other groups, so only outside references change).
            nodes.append(remap_inputs(sink_to_fused[n.id], mapping))
        elif n.id not in dropped:
            nodes.append(remap_inputs(n, mapping))
    outputs = tuple(mapping.get(o, o) for o in graph.outputs)
    new_graph = msgspec.structs.replace(graph, nodes=tuple(nodes), outputs=outputs)
    return new_graph, list(sink_to_fused.values())


def unit_placement(fused: Fused) -> str:
    """`local`, `tasks cpu=2`, `actors x2 gpu=1`: where a fused unit runs."""
    return placement_text(fused.placement) or fused.placement.mode


def describe(graph: Graph, fused: Fused) -> str:
    """`add_one %1, double %2` for a rewrite record."""
    return ", ".join(f"{graph.step(b.step).name} %{b.id}" for b in fused.body if isinstance(b, Call))


def fuse_pass(
    graph: Graph,
    group_class: GroupClass,
    placement: Callable[[list[StepSpec]], Placement],
    why: str,
    verb: str = "fused",
) -> PassResult:
    """A whole fusion pass: find groups, fuse them, record each rewrite
    and each batched step kept out of a group it would have joined."""
    groups = find_groups(graph, unbatched(group_class))
    new_graph, fused = fuse(graph, groups, placement)
    rewrites = tuple(f"{verb} {describe(graph, f)} into %{f.id} ({unit_placement(f)}): {why}" for f in fused)
    return PassResult(new_graph, rewrites + batched_notes(graph, group_class))


def batched_notes(graph: Graph, group_class: GroupClass, join: Join = same) -> tuple[str, ...]:
    """One line per batched call that `group_class` would have fused with
    a neighbour, saying why it stays its own unit."""
    notes = []
    for ids in find_groups(graph, group_class, join):
        for i in ids:
            node = graph.node(i)
            if not isinstance(node, Call):
                continue
            batching = graph.step(node.step).placement.batching
            if batching is not None:
                notes.append(
                    f"kept {graph.step(node.step).name} %{i} as its own unit: it is batched "
                    f"(max_batch_size={batching.max_batch_size}), its callable takes and returns a list, "
                    "so it cannot run inline with steps that take one value"
                )
    return tuple(notes)

