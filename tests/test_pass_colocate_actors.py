"""colocate_actors: what it colocates (chains with equal replica counts,
repeated calls of one step inside a group) and what it must not (replica
mismatch, GPU boundary, fuse=False, steps shared between groups or with
calls outside, switches, other modes). Golden dumps before and after."""

from __future__ import annotations

import pipeline_ir as pipeline
from pass_helpers import apply, same_results, traced
from pipeline_ir.ir.nodes import Call, Fused
from pipeline_ir.passes import colocate_actors


@pipeline.step(execution_mode="actors", num_replicas=2)
class Embed:
    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, x: int) -> int:
        return x * self.dim


@pipeline.step(execution_mode="actors", num_replicas=2, num_cpus=2)
class Rank:
    def __call__(self, x: int) -> int:
        return x + 1


@pipeline.step(execution_mode="actors", num_replicas=2)
def norm(x: int) -> int:
    return x - 1


@pipeline.step(execution_mode="actors")
class Single:
    def __call__(self, x: int) -> int:
        return x + 10


@pipeline.step(execution_mode="actors", num_replicas=2, num_gpus=1)
class Gpu:
    def __call__(self, x: int) -> int:
        return x * 7


@pipeline.step(execution_mode="actors", num_replicas=2, fuse=False)
class Pinned:
    def __call__(self, x: int) -> int:
        return x - 4


@pipeline.step(execution_mode="actors", num_replicas=2)
class Shared:
    def __call__(self, x: int) -> int:
        return x + 2


@pipeline.step(execution_mode="tasks")
def task(x: int) -> int:
    return x * 3


@pipeline.step
def parity(x: int) -> int:
    return x % 2


INPUTS = [0, 1, 2, 5]
KEPT = "its calls would land in different units, and the replicas of one step (and their state) stay one pool"


def assert_pools_whole(graph: pipeline.Graph) -> None:
    """Every step called inside an actors group is called nowhere else."""
    for f in (n for n in graph.nodes if isinstance(n, Fused) and n.placement.mode == "actors"):
        inside = {b.step for b in f.body if isinstance(b, Call)}
        outside = {n.step for n in graph.nodes if isinstance(n, Call)}
        outside |= {b.step for g in graph.nodes if isinstance(g, Fused) and g is not f for b in g.body if isinstance(b, Call)}
        assert not inside & outside, f"steps {inside & outside} of %{f.id} also run elsewhere"


def test_chain_with_equal_replicas_shares_one_actor_per_replica() -> None:
    compiled = traced(norm(Rank()(Embed(4)(pipeline.INPUT))))
    assert compiled.graph.dump() == (
        "pipeline norm(%0: Any) -> int:\n"
        "  %1: int = Embed(4)(%0)                        # actors x2\n"
        "  %2: int = Rank()(%1)                          # actors x2 cpu=2\n"
        "  %3: int = norm(%2)                            # actors x2\n"
        "  return %3"
    )
    result = apply(colocate_actors, compiled.graph)
    assert result.graph.dump() == (
        "pipeline norm(%0: Any) -> int:\n"
        "  %4: int = fused actors {                      # actors x2 cpu=2, 3 nodes\n"
        "    %1: int = Embed(4)(%0)                      # actors x2\n"
        "    %2: int = Rank()(%1)                        # actors x2 cpu=2\n"
        "    %3: int = norm(%2)                          # actors x2\n"
        "  } -> %3\n"
        "  return %4"
    )
    assert result.rewrites == (
        "colocated Embed %1, Rank %2, norm %3 into %4 (actors x2 cpu=2): "
        "adjacent ACTORS steps with equal replica counts share one actor process per replica",
    )
    same_results(compiled, result.graph, INPUTS)


def test_replica_count_mismatch_gpu_boundary_and_fuse_false_stay_apart() -> None:
    for node in (
        Single()(Rank()(pipeline.INPUT)),  # x2 then x1
        Gpu()(Rank()(pipeline.INPUT)),  # cpu then gpu
        Rank()(Pinned()(Embed(2)(pipeline.INPUT))),  # fuse=False in the middle
        Rank()(task(Embed(2)(pipeline.INPUT))),  # a task in the middle
    ):
        compiled = traced(node)
        result = apply(colocate_actors, compiled.graph)
        assert result.graph is compiled.graph, result.graph.dump()
        assert result.rewrites == ()


def test_step_called_outside_the_group_keeps_its_own_pool() -> None:
    e = Embed(3)
    compiled = traced((Rank()(e(pipeline.INPUT)), e(norm(pipeline.INPUT))))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph is compiled.graph
    assert result.rewrites == (f"kept Embed (%1, %4) in its own replica pool: {KEPT}",)


def test_shared_step_stays_out_while_its_neighbours_colocate() -> None:
    e = Embed(3)
    compiled = traced((norm(Rank()(e(pipeline.INPUT))), e(pipeline.INPUT)))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph.dump() == (
        "pipeline Embed(%0: Any) -> (int, int):\n"
        "  %1: int = Embed(3)(%0)                        # actors x2\n"
        "  %5: int = fused actors {                      # actors x2 cpu=2, 2 nodes\n"
        "    %2: int = Rank()(%1)                        # actors x2 cpu=2\n"
        "    %3: int = norm(%2)                          # actors x2\n"
        "  } -> %3\n"
        "  %4: int = Embed(3)(%0)                        # actors x2\n"
        "  return %5, %4"
    )
    assert result.rewrites[1:] == (f"kept Embed (%1, %4) in its own replica pool: {KEPT}",)
    assert_pools_whole(result.graph)
    same_results(compiled, result.graph, INPUTS)


def test_every_call_of_a_step_inside_one_group_shares_its_instance() -> None:
    x, y = Embed(5), Rank()
    compiled = traced(y(x(norm(x(y(pipeline.INPUT))))))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph.dump() == (
        "pipeline Rank(%0: Any) -> int:\n"
        "  %6: int = fused actors {                      # actors x2 cpu=2, 5 nodes\n"
        "    %1: int = Rank()(%0)                        # actors x2 cpu=2\n"
        "    %2: int = Embed(5)(%1)                      # actors x2\n"
        "    %3: int = norm(%2)                          # actors x2\n"
        "    %4: int = Embed(5)(%3)                      # actors x2\n"
        "    %5: int = Rank()(%4)                        # actors x2 cpu=2\n"
        "  } -> %5\n"
        "  return %6"
    )
    assert_pools_whole(result.graph)
    same_results(compiled, result.graph, INPUTS)


def test_keeping_one_step_apart_can_split_others_until_none_is_split() -> None:
    # Shared runs outside, so it leaves the chain; that splits the chain in
    # two groups, each with a call of Embed and of Rank: both leave too.
    x, y, s = Embed(7), Rank(), Shared()
    compiled = traced((y(x(s(y(x(pipeline.INPUT))))), s(pipeline.INPUT)))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph is compiled.graph
    assert result.rewrites == (
        f"kept Embed (%1, %4) in its own replica pool: {KEPT}",
        f"kept Rank (%2, %5) in its own replica pool: {KEPT}",
        f"kept Shared (%3, %6) in its own replica pool: {KEPT}",
    )


def test_never_across_a_switch() -> None:
    key = parity(pipeline.INPUT)
    branch = Rank()(Embed(2)(pipeline.INPUT))
    compiled = traced(norm(pipeline.switch(key, {0: branch}, default=pipeline.INPUT)))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph.dump() == (
        "pipeline norm(%0: Any) -> int:\n"
        "  %1: int = parity(%0)\n"
        "  %6: int = fused actors {                      # actors x2 cpu=2, 2 nodes\n"
        "    %2: int = Embed(2)(%0)                      # actors x2\n"
        "    %3: int = Rank()(%2)                        # actors x2 cpu=2\n"
        "  } -> %3\n"
        "  %4: Any = switch %1 {0: %6} default %0\n"
        "  %5: int = norm(%4)                            # actors x2\n"
        "  return %5"
    )
    same_results(compiled, result.graph, INPUTS)


def test_gpu_steps_with_equal_share_colocate_on_the_gpu() -> None:
    g = Gpu()
    compiled = traced(g(Gpu()(pipeline.INPUT)))
    result = apply(colocate_actors, compiled.graph)
    fused = result.graph.nodes[-1]
    assert isinstance(fused, Fused) and (fused.placement.num_gpus, fused.placement.num_replicas, fused.placement.num_cpus) == (1.0, 2, None)
