"""colocate_actors: what it colocates (chains with equal replica counts,
repeated calls of one step inside a group, small CPU steps folded into a
GPU step's actor) and what it must not (replica mismatch, GPU boundary,
fuse=False, steps shared between groups or with calls outside, switches,
other modes; a heavy, batched or differently replicated CPU step next to
a GPU step; two GPU actors merged through a CPU step). Golden dumps before
and after."""

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
        Gpu()(Rank()(pipeline.INPUT)),  # a CPU step asking for 2 CPUs, then gpu (see the fold tests)
        Rank()(Pinned()(Embed(2)(pipeline.INPUT))),  # fuse=False in the middle
        Rank()(task(Embed(2)(pipeline.INPUT))),  # a task in the middle
    ):
        compiled = traced(node)
        result = apply(colocate_actors, compiled.graph)
        assert result.graph is compiled.graph, result.graph.dump()
        assert all(r.startswith("kept Rank %1 out of the GPU actor of Gpu %2") for r in result.rewrites)


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


# -- the fold: a small CPU step runs in a GPU step's actor --


@pipeline.step(execution_mode="actors", num_replicas=2)
def preprocess(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="actors", num_replicas=2, num_gpus=1)
class Classifier:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, x: int) -> int:
        return x * self.k


@pipeline.step(execution_mode="actors", num_replicas=2)
def postprocess(x: int) -> str:
    return f"label {x}"


@pipeline.step(execution_mode="actors", num_replicas=2)
def vote(a: int, b: int) -> int:
    return max(a, b)


@pipeline.step(execution_mode="actors", num_replicas=2, num_cpus=1)
def one_cpu(x: int) -> int:
    return x - 2


@pipeline.step(execution_mode="actors", num_replicas=2, num_cpus=2)
def heavy(x: int) -> int:
    return x + 5


@pipeline.step(execution_mode="actors")
def single(x: int) -> int:
    return x + 6


@pipeline.step(execution_mode="actors", num_replicas=2, fuse=False)
def pinned(x: int) -> int:
    return x + 7


@pipeline.step(execution_mode="actors", num_replicas=2, max_batch_size=4)
def batched(xs: list[int]) -> list[int]:
    return [x + 8 for x in xs]


@pipeline.step(execution_mode="actors", num_replicas=2, num_gpus=1, fuse=False)
class PinnedModel:
    def __call__(self, x: int) -> int:
        return x * 9


FOLD = (
    "adjacent ACTORS steps with equal replica counts share one actor process per replica; folded the small CPU "
    "step{s} {names} (num_cpus <= 1) into the GPU step's actor: one actor hop less per call (H100, preprocess -> "
    "resnet18, p50 split vs folded: 13.3 vs 9.8 ms at batch 1, 44.7 vs 28.3 ms at batch 16); fuse=False on a CPU "
    "step keeps it apart"
)
ENSEMBLE = "its value is also read by {other}, and a group has one output (an ensemble's shared step keeps its own actor)"
NO_MERGE = "a CPU step joins one GPU step's actor, and never merges two GPU steps' actors"


def test_small_cpu_preprocess_folds_into_the_gpu_classifiers_actor() -> None:
    compiled = traced(Classifier(3)(preprocess(pipeline.INPUT)))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph.dump() == (
        "pipeline Classifier(%0: Any) -> int:\n"
        "  %3: int = fused actors {                      # actors x2 gpu=1, 2 nodes\n"
        "    %1: int = preprocess(%0)                    # actors x2\n"
        "    %2: int = Classifier(3)(%1)                 # actors x2 gpu=1\n"
        "  } -> %2\n"
        "  return %3"
    )
    assert result.rewrites == (f"colocated preprocess %1, Classifier %2 into %3 (actors x2 gpu=1): {FOLD.format(s='', names='preprocess')}",)
    same_results(compiled, result.graph, INPUTS)


def test_postprocess_after_the_gpu_step_folds_too_and_cpus_stay_at_most_one() -> None:
    compiled = traced(postprocess(one_cpu(Classifier(3)(preprocess(pipeline.INPUT)))))
    result = apply(colocate_actors, compiled.graph)
    fused = result.graph.nodes[-1]
    assert isinstance(fused, Fused) and len(result.graph.nodes) == 2  # the input and one group
    # The GPU step's share; the most CPUs a member asks for (1 here), never more.
    assert (fused.placement.num_replicas, fused.placement.num_gpus, fused.placement.num_cpus) == (2, 1.0, 1.0)
    assert result.rewrites == (
        "colocated preprocess %1, Classifier %2, one_cpu %3, postprocess %4 into %5 (actors x2 cpu=1 gpu=1): "
        + FOLD.format(s="s", names="preprocess, one_cpu, postprocess"),
    )
    same_results(compiled, result.graph, INPUTS)


def test_cpu_steps_that_are_heavy_replicated_otherwise_batched_or_pinned_keep_their_own_actors() -> None:
    cases = {
        "heavy asks for num_cpus=2: a CPU step declaring more than 1 CPU is heavy or scaled on purpose and keeps its own actors": heavy,
        "their replica counts differ (single x1, Classifier x2)": single,
        "pinned has fuse=False": pinned,
    }
    for reason, cpu_step in cases.items():
        for node, note in (
            (Classifier(3)(cpu_step(pipeline.INPUT)), f"kept {cpu_step.name} %1 out of the GPU actor of Classifier %2: {reason}"),
            (cpu_step(Classifier(3)(pipeline.INPUT)), f"kept {cpu_step.name} %2 out of the GPU actor of Classifier %1: {reason}"),
        ):
            compiled = traced(node)
            result = apply(colocate_actors, compiled.graph)
            assert result.graph is compiled.graph and result.rewrites == (note,)
    compiled = traced(PinnedModel()(preprocess(pipeline.INPUT)))
    assert apply(colocate_actors, compiled.graph).rewrites == ("kept preprocess %1 out of the GPU actor of PinnedModel %2: PinnedModel has fuse=False",)
    compiled = traced(Classifier(3)(batched(pipeline.INPUT)))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph is compiled.graph
    assert result.rewrites == (
        "kept batched %1 as its own unit: it is batched (max_batch_size=4), its callable takes and returns a list, "
        "so it cannot run inline with steps that take one value",
    )


def test_an_ensembles_shared_preprocess_keeps_its_own_actor_and_a_vote_joins_one_model() -> None:
    x = preprocess(pipeline.INPUT)
    compiled = traced(vote(Classifier(2)(x), Classifier(3)(x)))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph.dump() == (
        "pipeline vote(%0: Any) -> int:\n"
        "  %1: int = preprocess(%0)                      # actors x2\n"
        "  %3: int = Classifier#2(3)(%1)                 # actors x2 gpu=1\n"
        "  %5: int = fused actors {                      # actors x2 gpu=1, 2 nodes\n"
        "    %2: int = Classifier(2)(%1)                 # actors x2 gpu=1\n"
        "    %4: int = vote(%2, %3)                      # actors x2\n"
        "  } -> %4\n"
        "  return %5"
    )
    # Each model keeps the GPU it asked for: two GPU units, as before.
    assert sum((result.graph.unit_placement(u).num_gpus or 0) * result.graph.unit_placement(u).num_replicas for u in result.graph.units()) == 4
    assert result.rewrites == (
        f"colocated Classifier %2, vote %4 into %5 (actors x2 gpu=1): {FOLD.format(s='', names='vote')}",
        "kept preprocess %1 out of the GPU actor of Classifier %2: " + ENSEMBLE.format(other="Classifier %3"),
        "kept preprocess %1 out of the GPU actor of Classifier %3: " + ENSEMBLE.format(other="Classifier %2"),
        f"kept vote %4 out of the GPU actor of Classifier %3: it runs in the actor of Classifier %2 already: {NO_MERGE}",
    )
    same_results(compiled, result.graph, INPUTS)


def test_a_cpu_step_between_two_gpu_steps_joins_one_and_never_merges_them() -> None:
    compiled = traced(Classifier(5)(preprocess(Classifier(3)(pipeline.INPUT))))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph.dump() == (
        "pipeline Classifier(%0: Any) -> int:\n"
        "  %4: int = fused actors {                      # actors x2 gpu=1, 2 nodes\n"
        "    %1: int = Classifier(3)(%0)                 # actors x2 gpu=1\n"
        "    %2: int = preprocess(%1)                    # actors x2\n"
        "  } -> %2\n"
        "  %3: int = Classifier#2(5)(%4)                 # actors x2 gpu=1\n"
        "  return %3"
    )
    assert result.rewrites[1:] == (f"kept preprocess %2 out of the GPU actor of Classifier %3: it runs in the actor of Classifier %1 already: {NO_MERGE}",)
    same_results(compiled, result.graph, INPUTS)


def test_a_cpu_step_returned_to_the_caller_too_or_called_elsewhere_is_not_folded() -> None:
    x = preprocess(pipeline.INPUT)
    compiled = traced((Classifier(3)(x), x))
    result = apply(colocate_actors, compiled.graph)
    assert result.graph is compiled.graph
    assert result.rewrites == ("kept preprocess %1 out of the GPU actor of Classifier %2: " + ENSEMBLE.format(other="the caller"),)
    compiled = traced((Classifier(3)(preprocess(pipeline.INPUT)), preprocess(norm(pipeline.INPUT))))
    result = apply(colocate_actors, compiled.graph)
    assert result.rewrites[-1] == f"kept preprocess (%1, %4) in its own replica pool: {KEPT}"
    assert_pools_whole(result.graph)
    same_results(compiled, result.graph, INPUTS)


def test_explain_gives_the_fold_and_its_figures() -> None:
    compiled = pipeline.compile(postprocess(Classifier(3)(preprocess(pipeline.INPUT))), backend=None)
    assert "colocate_actors:\n  - colocated preprocess %1, Classifier %2, postprocess %3 into %4 (actors x2 gpu=1): " in compiled.explain()
    assert "13.3 vs 9.8 ms at batch 1, 44.7 vs 28.3 ms at batch 16" in compiled.explain()
    # The opt-out: fuse=False on the CPU step, or no optimization at all.
    split = pipeline.compile(postprocess(Classifier(3)(preprocess(pipeline.INPUT))), backend=None, optimize=False)
    assert not any(isinstance(n, Fused) for n in split.graph.nodes)
