"""Which nodes run only when a switch picks them: the block structure that
every backend lowers, so that a switch runs only its chosen branch.

The region of a switch is the set of nodes needed only by its arms: its
branches (when read by nothing else, the switch's key included), and
nodes all of whose readings come from its region. A node of the region
runs inside each arm that needs it, and only there: a node shared by arms
1 and 2 is emitted in both arms (arms exclude each other, so it still runs
at most once per call) and not at all when arm 0 is chosen. A node belongs
to the innermost switch whose region holds it (regions nest); all other
nodes run unconditionally, in topological order. This is derived from the
graph alone (never stored), so passes need not keep it up to date, and all
backends agree on what runs.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import AnyNode, Call, Fused, Input, Mode, Switch, node_inputs


@dataclass(frozen=True)
class Branches:
    """A switch and, for each case (then the default), the nodes to run
    before taking that arm's value, in order."""

    switch: Switch
    arms: tuple[Block, ...]
    default: Block | None


Item = AnyNode | Branches
Block = tuple[Item, ...]


def _regions(nodes: tuple[AnyNode, ...], outputs: tuple[int, ...]) -> dict[int, dict[int, set[int]]]:
    """For each switch id, its region: node id -> the arms that need it.

    Arm index `len(cases)` is the default. A reading as the switch's key,
    by an output or by a node outside the region keeps a node out of it.
    Only the inputs of region members are ever examined, so the cost is
    the size of the regions (times the depth of nesting), not one walk of
    the graph per switch.
    """
    pos = {n.id: i for i, n in enumerate(nodes)}
    # Each reading of a node, as (reader id, arm index or None for "any").
    readings: dict[int, list[tuple[int, int | None]]] = {n.id: [] for n in nodes}
    for n in nodes:
        if isinstance(n, Switch):
            readings[n.key].append((n.id, None))
            for arm, c in enumerate(n.cases):
                readings[c.branch].append((n.id, arm))
            if n.default is not None:
                readings[n.default].append((n.id, len(n.cases)))
        else:
            for i in node_inputs(n):
                readings[i].append((n.id, None))
    for o in outputs:
        readings[o].append((-1, None))

    regions: dict[int, dict[int, set[int]]] = {}
    for sw in (n for n in nodes if isinstance(n, Switch)):
        need: dict[int, set[int]] = {}
        # Candidates latest first (a max-heap of positions): every reader of
        # a node comes after it, so its readers are decided before it is.
        heap = [-pos[i] for i in set(node_inputs(sw))]
        heapq.heapify(heap)
        queued = set(heap)
        while heap:
            n = nodes[-heapq.heappop(heap)]
            if isinstance(n, Input):
                continue
            arms: set[int] = set()
            for reader, which in readings[n.id]:
                if reader == sw.id and which is not None:
                    arms.add(which)
                elif reader in need:
                    arms |= need[reader]
                else:
                    break
            else:
                need[n.id] = arms
                for i in node_inputs(n):
                    if -pos[i] not in queued:
                        queued.add(-pos[i])
                        heapq.heappush(heap, -pos[i])
        regions[sw.id] = need
    return regions


def schedule(nodes: tuple[AnyNode, ...], outputs: tuple[int, ...]) -> Block:
    """The block structure of `nodes` (topologically ordered) for `outputs`."""
    regions = _regions(nodes, outputs)
    # Regions nest, so the innermost switch holding a node has the smallest.
    owner: dict[int, int] = {}
    for sw_id, need in sorted(regions.items(), key=lambda kv: -len(kv[1])):
        for i in need:
            owner[i] = sw_id
    # The nodes of each block in order, sorted out in one walk: the top
    # level under None, an arm under (switch id, arm index).
    members: dict[tuple[int, int] | None, list[AnyNode]] = {None: []}
    for n in nodes:
        inside = owner.get(n.id)
        if inside is None:
            members[None].append(n)
        else:
            for arm in sorted(regions[inside][n.id]):
                members.setdefault((inside, arm), []).append(n)

    def block(arm_key: tuple[int, int] | None) -> Block:
        items: list[Item] = []
        for n in members.get(arm_key, ()):
            if isinstance(n, Switch):
                arms = tuple(block((n.id, a)) for a in range(len(n.cases)))
                default = block((n.id, len(n.cases))) if n.default is not None else None
                items.append(Branches(n, arms, default))
            else:
                items.append(n)
        return tuple(items)

    return block(None)


def remote_values(graph: Graph, remote_modes: frozenset[Mode] = frozenset({"tasks", "actors"})) -> set[int]:
    """Ids of the nodes whose value, in the caller, is a handle to a result
    held by Ray (an ObjectRef) rather than the value itself.

    Calls and fused groups of a remote mode give one; projections run in
    the caller and give values; a switch gives one only when every arm
    does (else the caller fetches the remote arms). Backends lower by this
    rule (codegen.py) and passes reason with it (use_channels.py).
    """
    remote: set[int] = set()
    for n in graph.all_nodes():
        match n:
            case Call(step=key) if graph.step(key).placement.mode in remote_modes:
                remote.add(n.id)
            case Fused(placement=p) if p.mode in remote_modes:
                remote.add(n.id)
            case Switch(cases=cases, default=default):
                arms = [c.branch for c in cases] + ([default] if default is not None else [])
                if all(a in remote for a in arms):
                    remote.add(n.id)
            case _:
                pass
    return remote
