"""colocate_actors: adjacent ACTORS steps share one actor process per replica.

A group of actor steps becomes one Fused node of mode "actors": the backend
starts `num_replicas` actors, each hosting one instance of every step of
the group (each step keeps its own instance and state), and a call runs
the whole group inside one actor, so the hops between the steps are local
Python calls instead of object-store round trips.

Rules (grouping is shared with the other fusion passes, see grouping.py):

- only ACTORS steps with `fuse=True` join a group, and only steps with the
  same `num_replicas` and the same GPU share (`gpu_class`);
- the replicas ask for the most CPUs any member asks for (`combined_cpus`);
- one StepSpec is one replica pool with its state. A step joins a group
  only when every call of that step lies inside that one group; a step
  that is also called elsewhere keeps its own pool and stays out of all
  groups, so its calls keep seeing the same instances as before. (Calls
  inside one group see the replica's single instance, as before.)
"""

from __future__ import annotations

from collections.abc import Hashable

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Placement, StepSpec
from pipeline_ir.passes.grouping import combined_cpus, combined_gpus, find_groups, fuse_pass, gpu_class, unbatched
from pipeline_ir.passes.manager import PassResult

_WHY = "adjacent ACTORS steps with equal replica counts share one actor process per replica"


def _actor_class(step: StepSpec) -> Hashable | None:
    if step.placement.mode != "actors" or not step.fuse:
        return None
    return ("actors", step.placement.num_replicas, gpu_class(step))


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
    replica counts in one actor process per replica."""
    kept_apart: set[str] = set()

    def klass(step: StepSpec) -> Hashable | None:
        return None if step.key in kept_apart else _actor_class(step)

    while True:
        # Keeping a shared step out can break a group in two, which can
        # split another step: repeat until no step is split (the set only
        # grows, so this ends).
        split = split_steps(graph, find_groups(graph, unbatched(klass)))
        if not split:
            break
        kept_apart |= split
    result = fuse_pass(graph, klass, _one_actor, _WHY, verb="colocated")
    # Said even when nothing was colocated: it is why nothing was.
    notes = tuple(_kept_apart_note(graph, key) for key in sorted(kept_apart))
    return PassResult(result.graph, result.rewrites + notes)


def _kept_apart_note(graph: Graph, key: str) -> str:
    index = graph.index()
    calls = ", ".join(f"%{i}" for i in index.calls.get(key, ()) if index.unit[i] == i)  # top-level calls
    return (
        f"kept {graph.step(key).name} ({calls}) in its own replica pool: its calls would land in "
        "different units, and the replicas of one step (and their state) stay one pool"
    )
