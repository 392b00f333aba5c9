"""Which nodes run only when a switch picks them: the block structure that
every backend lowers, so that a switch runs only its chosen branch.

A node belongs to the arm of a switch when every use of it lies inside that
arm (it is the arm's branch, or feeds only nodes of the arm). Such nodes run
inside the arm; all others run unconditionally, in topological order. This
is derived from the graph alone (never stored), so passes need not keep it
up to date, and all backends agree on what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline_ir.ir.nodes import AnyNode, Input, Switch, node_inputs


@dataclass(frozen=True)
class Branches:
    """A switch and, for each case (then the default), the nodes to run
    before taking that arm's value, in order."""

    switch: Switch
    arms: tuple[Block, ...]
    default: Block | None


Item = AnyNode | Branches
Block = tuple[Item, ...]


def _arm_members(nodes: tuple[AnyNode, ...], outputs: tuple[int, ...]) -> dict[tuple[int, int], set[int]]:
    """For each (switch id, arm index), the ids of nodes that only that arm uses.

    Arm index `len(cases)` is the default. Uses are counted per reading, so a
    node that is a branch of two arms, or also the key, belongs to none.
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

    members: dict[tuple[int, int], set[int]] = {}
    by_id = {n.id: n for n in nodes}
    for sw in (n for n in nodes if isinstance(n, Switch)):
        arms = [c.branch for c in sw.cases] + ([sw.default] if sw.default is not None else [])
        for arm, branch in enumerate(arms):
            if readings[branch] != [(sw.id, arm)] or isinstance(by_id[branch], Input):
                members[(sw.id, arm)] = set()
                continue
            body = {branch}
            # Walk ancestors from latest to earliest: a node joins when all
            # of its readers already belong to the arm.
            for n in reversed(nodes[: pos[branch]]):
                if isinstance(n, Input) or not readings[n.id]:
                    continue
                if all(reader in body for reader, _ in readings[n.id]):
                    body.add(n.id)
            members[(sw.id, arm)] = body
    return members


def schedule(nodes: tuple[AnyNode, ...], outputs: tuple[int, ...]) -> Block:
    """The block structure of `nodes` (topologically ordered) for `outputs`."""
    members = _arm_members(nodes, outputs)
    # A node belongs to the innermost (smallest) arm holding it; arms nest.
    owner: dict[int, tuple[int, int]] = {}
    for arm_key, ids in sorted(members.items(), key=lambda kv: -len(kv[1])):
        for i in ids:
            owner[i] = arm_key

    def block(arm_key: tuple[int, int] | None) -> Block:
        items: list[Item] = []
        for n in nodes:
            if owner.get(n.id) != arm_key:
                continue
            if isinstance(n, Switch):
                arms = tuple(block((n.id, a)) for a in range(len(n.cases)))
                default = block((n.id, len(n.cases))) if n.default is not None else None
                items.append(Branches(n, arms, default))
            else:
                items.append(n)
        return tuple(items)

    return block(None)
