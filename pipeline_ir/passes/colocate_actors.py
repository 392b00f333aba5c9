"""colocate_actors: adjacent ACTORS steps share one actor process per replica.

A group of actor steps becomes one Fused node of mode "actors": the backend
starts `num_replicas` actors, each hosting one instance of every step of
the group (each step keeps its own instance and state), and a call runs
the whole group inside one actor, so the hops between the steps are local
Python calls instead of object-store round trips.

Rules (grouping is shared with the other fusion passes, see grouping.py):

- only ACTORS steps with `fuse=True` join a group, and only steps with the
  same `num_replicas` and the same GPU share (`gpu_class`), with one
  exception, the fold:
- a small CPU step (no GPU, `num_cpus` None or at most 1) next to a GPU
  step joins that step's actor, which keeps the GPU step's share. Measured
  on an H100 (docs/benchmarks.md, "GPU"): a preprocess actor feeding a
  resnet18 actor took 13.3 ms p50 a call at batch 1 and 44.7 ms at batch
  16, one GPU actor doing both 9.8 and 28.3 ms. A CPU step asking for more
  than 1 CPU is heavy or scaled on purpose and keeps its own actors, so it
  never holds a GPU it did not ask for; `fuse=False` keeps any step apart.
  A CPU step joins one GPU actor: two GPU steps share an actor only when
  they are adjacent, as before, never because a CPU step between them (or
  reading both) folded into one. A CPU step read by several steps (an
  ensemble's shared preprocess) stays apart: a group has one output;
- the replicas ask for the most CPUs any member asks for (`combined_cpus`);
- one StepSpec is one replica pool with its state. A step joins a group
  only when every call of that step lies inside that one group; a step
  that is also called elsewhere keeps its own pool and stays out of all
  groups, so its calls keep seeing the same instances as before. (Calls
  inside one group see the replica's single instance, as before.)

Every fold is a rewrite line with the figures above, and every CPU step
kept out of a neighbouring GPU step's actor gets a line saying why.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from pipeline_ir.ir.graph import CALLER, Graph
from pipeline_ir.ir.nodes import Call, Fused, Placement, Project, StepSpec, node_inputs
from pipeline_ir.passes.grouping import (
    batched_notes,
    combined_cpus,
    combined_gpus,
    describe,
    find_groups,
    fuse,
    gpu_class,
    unbatched,
    unit_placement,
)
from pipeline_ir.passes.manager import PassResult

_WHY = "adjacent ACTORS steps with equal replica counts share one actor process per replica"
# The measurement behind the fold (benchmarks/results/gpu_bench.json, part c).
_FOLD_FIGURES = (
    "one actor hop less per call (H100, preprocess -> resnet18, p50 split vs folded: "
    "13.3 vs 9.8 ms at batch 1, 44.7 vs 28.3 ms at batch 16)"
)


@dataclass(frozen=True)
class ActorClass:
    """Whether ACTORS calls may share an actor, for a step or a group.

    `gpus`: the GPU share; 0 for CPU only (some member asks for more than
    1 CPU, so no GPU step may join); None while every member is a small
    CPU step, which may still join a GPU step. `gpu_last`: the last call
    asks for a GPU (two GPU steps join only when adjacent)."""

    replicas: int
    gpus: float | None
    gpu_last: bool


def small(step: StepSpec) -> bool:
    """A CPU step light enough to run in a GPU step's actor."""
    return step.placement.num_gpus is None and (step.placement.num_cpus is None or step.placement.num_cpus <= 1)


def _actor_class(step: StepSpec) -> ActorClass | None:
    if step.placement.mode != "actors" or not step.fuse:
        return None
    share = gpu_class(step)
    return ActorClass(step.placement.num_replicas, None if small(step) else share, share > 0)


def _join(group: Hashable, node: Hashable) -> Hashable | None:
    """The class of `group` grown by `node` (a step, or a node's class so
    far when it reads several groups), or None when they stay apart."""
    assert isinstance(group, ActorClass) and isinstance(node, ActorClass)
    if group.replicas != node.replicas:
        return None
    if group.gpus is None or group.gpus == node.gpus:
        gpus = node.gpus
    elif node.gpus is None:
        gpus = group.gpus
    else:
        return None
    # Both hold a GPU step: only two adjacent GPU steps share an actor.
    if (group.gpus or 0.0) > 0 and (node.gpus or 0.0) > 0 and not (group.gpu_last and node.gpu_last):
        return None
    return ActorClass(node.replicas, gpus, node.gpu_last)


def _one_actor(steps: list[StepSpec]) -> Placement:
    return Placement(
        mode="actors",
        num_replicas=steps[0].placement.num_replicas,
        num_cpus=combined_cpus(steps),
        num_gpus=combined_gpus(steps),
    )


def split_steps(graph: Graph, groups: list[list[int]]) -> set[str]:
    """Step keys with calls in a group and calls outside that group."""
    group_of = {node_id: g for g, ids in enumerate(groups) for node_id in ids}
    return {s.key for s in graph.steps if len({group_of.get(c.id, -1) for c in graph.callers(s.key)}) > 1}


def colocate_actors(graph: Graph) -> PassResult:
    """Colocate each convex group of ACTORS calls with one output and equal
    replica counts in one actor process per replica, small CPU steps
    folded into a neighbouring GPU step's actor."""
    kept_apart: set[str] = set()

    def klass(step: StepSpec) -> Hashable | None:
        return None if step.key in kept_apart else _actor_class(step)

    while True:
        # Keeping a shared step out can break a group in two, which can
        # split another step: repeat until no step is split (the set only
        # grows, so this ends).
        groups = find_groups(graph, unbatched(klass), _join)
        split = split_steps(graph, groups)
        if not split:
            break
        kept_apart |= split
    new_graph, fused = fuse(graph, groups, _one_actor)
    rewrites = tuple(f"colocated {describe(graph, f)} into %{f.id} ({unit_placement(f)}): {_why(graph, f)}" for f in fused)
    # Said even when nothing was colocated: it is why nothing was.
    notes = batched_notes(graph, klass, _join) + _fold_notes(graph, groups, kept_apart)
    notes += tuple(_kept_apart_note(graph, key) for key in sorted(kept_apart))
    return PassResult(new_graph, rewrites + notes)


def _why(graph: Graph, fused: Fused) -> str:
    cpu = [graph.step(b.step).name for b in fused.body if isinstance(b, Call) and gpu_class(graph.step(b.step)) == 0]
    if not fused.placement.num_gpus or not cpu:
        return _WHY
    names = ", ".join(dict.fromkeys(cpu))
    return (
        f"{_WHY}; folded the small CPU step{'s' if len(set(cpu)) > 1 else ''} {names} (num_cpus <= 1) into the "
        f"GPU step's actor: {_FOLD_FIGURES}; fuse=False on a CPU step keeps it apart"
    )


def _fold_notes(graph: Graph, groups: list[list[int]], kept_apart: set[str]) -> tuple[str, ...]:
    """One line for each CPU actor call next to a GPU actor call (one
    reading the other) that did not join its actor, saying why. Steps kept
    apart for their pool and batched steps have their own lines."""
    group_of = {i: g for g, ids in enumerate(groups) for i in ids}
    readers = graph.readers()
    notes: list[str] = []
    for r in graph.nodes:
        if not isinstance(r, Call):
            continue
        for i in dict.fromkeys(node_inputs(r)):
            source = graph.node(i)
            p = graph.node(source.source) if isinstance(source, Project) else source
            if not isinstance(p, Call) or (i in group_of and group_of.get(r.id) == group_of[i]):
                continue
            pair = [graph.step(p.step), graph.step(r.step)]
            if any(s.placement.mode != "actors" or s.placement.batching is not None or s.key in kept_apart for s in pair):
                continue
            if sorted(gpu_class(s) > 0 for s in pair) != [False, True]:
                continue
            cpu, gpu = (p, r) if gpu_class(pair[0]) == 0 else (r, p)
            why = _apart_reason(graph, cpu, gpu, _other_readers(graph, readers, i, r.id), groups, group_of)
            notes.append(f"kept {graph.step(cpu.step).name} %{cpu.id} out of the GPU actor of {graph.step(gpu.step).name} %{gpu.id}: {why}")
    return tuple(dict.fromkeys(notes))  # one line for a pair read through two projections


def _other_readers(graph: Graph, readers: dict[int, list[int]], edge: int, reader: int) -> list[int]:
    """Who else reads node `edge` besides `reader` (CALLER for the
    caller), and for a projection who else reads its source."""
    others = [x for x in dict.fromkeys(readers[edge]) if x != reader]
    node = graph.node(edge)
    if isinstance(node, Project):
        others += [x for x in dict.fromkeys(readers[node.source]) if x != edge]
    return others


def _apart_reason(graph: Graph, cpu: Call, gpu: Call, others: list[int], groups: list[list[int]], group_of: dict[int, int]) -> str:
    """Why the CPU call `cpu` and the GPU call `gpu`, one reading the
    other (whose value `others` read too), ended in different units."""
    c, g = graph.step(cpu.step), graph.step(gpu.step)
    pinned = [s.name for s in (c, g) if not s.fuse]
    if pinned:
        return f"{' and '.join(pinned)} {'has' if len(pinned) == 1 else 'have'} fuse=False"
    if c.placement.num_replicas != g.placement.num_replicas:
        return f"their replica counts differ ({c.name} x{c.placement.num_replicas}, {g.name} x{g.placement.num_replicas})"
    if not small(c):
        return (
            f"{c.name} asks for num_cpus={c.placement.num_cpus:g}: a CPU step declaring more than 1 CPU is heavy "
            "or scaled on purpose and keeps its own actors"
        )
    if others:
        what = ", ".join("the caller" if x == CALLER else f"{_name(graph, x)} %{x}" for x in others)
        return f"its value is also read by {what}, and a group has one output (an ensemble's shared step keeps its own actor)"
    members = [graph.node(i) for i in groups[group_of[cpu.id]]] if cpu.id in group_of else []
    calls = [graph.step(m.step) for m in members if isinstance(m, Call)]
    holder = next((m for m in members if isinstance(m, Call) and gpu_class(graph.step(m.step)) > 0), None)
    if holder is not None:
        return (
            f"it runs in the actor of {_name(graph, holder.id)} %{holder.id} already: a CPU step joins one GPU "
            "step's actor, and never merges two GPU steps' actors"
        )
    heavy = next((s for s in calls if not small(s)), None)
    if heavy is not None:
        return f"it runs in one actor with {heavy.name} (num_cpus={heavy.placement.num_cpus:g}), which keeps its own actors"
    return f"{g.name}'s actor holds a GPU step of another share, or one it cannot merge with"


def _name(graph: Graph, node_id: int) -> str:
    node = graph.node(node_id)
    return graph.step(node.step).name if isinstance(node, Call) else type(node).__name__.lower()


def _kept_apart_note(graph: Graph, key: str) -> str:
    index = graph.index()
    calls = ", ".join(f"%{i}" for i in index.calls.get(key, ()) if index.unit[i] == i)  # top-level calls
    return (
        f"kept {graph.step(key).name} ({calls}) in its own replica pool: its calls would land in "
        "different units, and the replicas of one step (and their state) stay one pool"
    )
