"""place: the whole deployment fitted to the cluster at deploy, or a
PlacementError before anything starts. GPU steps keep their GPUs when a
node has them; else an error naming the steps, or with gpu_fallback a CPU
run written in explain(). Actor replicas are packed onto the nodes' free
resources (Ray's defaults modelled), and every TASKS unit must still have
room for one task. Every decision is a record line. The cluster is plain
data here; the Ray tests at the end use the session Ray (conftest: 8 CPUs,
1 logical GPU)."""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest

import pipeline_ir as pipeline
from pass_helpers import apply, traced
from pipeline_ir.passes import Cluster, ClusterNode, Resources, colocate_actors, fuse_tasks, place, run_passes


@pipeline.step(execution_mode="tasks")
def prep(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="actors", num_gpus=1)
class Model:
    def __call__(self, x: int) -> int:
        return 2 * x


@pipeline.step(execution_mode="actors", num_gpus=1, num_replicas=2)
class Wide:
    def __call__(self, x: int) -> int:
        return 3 * x


@pipeline.step(execution_mode="tasks", num_gpus=0.5)
def infer(x: int) -> int:
    return x - 1


@pipeline.step(execution_mode="tasks", num_gpus=0.5)
def refine(x: int) -> int:
    return x * 5


@pipeline.step(num_gpus=1)
def on_caller(x: int) -> int:
    return x


@pipeline.step(execution_mode="actors", num_replicas=8, num_cpus=1)
class Eight:
    def __call__(self, x: int) -> int:
        return x


@pipeline.step(execution_mode="actors", num_replicas=4)
class Plain:
    def __call__(self, x: int) -> int:
        return x


def _node(name: str, cpu: float, gpu: float = 0.0, free_cpu: float | None = None, free_gpu: float | None = None) -> ClusterNode:
    total = Resources(cpu=cpu, gpu=gpu)
    free = Resources(cpu=cpu if free_cpu is None else free_cpu, gpu=gpu if free_gpu is None else free_gpu)
    return ClusterNode(id=name.ljust(56, "0"), total=total, available=free, address=name)


def _placing(cluster: Cluster, **kwargs: Any) -> functools.partial[Any]:
    return functools.partial(place, cluster=cluster, **kwargs)


# -- GPUs --


def test_unknown_cluster_changes_nothing_and_enough_gpus_keep_the_graph() -> None:
    compiled = traced(Model()(prep(pipeline.INPUT)))
    assert apply(place, compiled.graph).graph is compiled.graph
    result = apply(_placing(Cluster.single(4, gpus=1)), compiled.graph)
    assert result.graph is compiled.graph
    assert result.rewrites == (
        "cluster: 1 node, CPU=4, GPU=1 in all (CPU=4, GPU=1 free); checked against what is free now",
        "step 'prep' (%1): tasks of CPU=1, GPU=0 fit on 1 node beside the replicas",
        "step 'Model' (%2): 1 replica x CPU=1, GPU=1 -> node0",
    )
    placed = compiled.place(Cluster.single(4, gpus=1))
    assert placed.graph is compiled.graph and placed.explain().startswith("place:\n  - cluster: 1 node")


def test_no_gpu_is_an_error_naming_each_step() -> None:
    compiled = traced(Wide()(Model()(prep(pipeline.INPUT))))
    with pytest.raises(pipeline.PlacementError) as err:
        place(compiled.graph, cluster=Cluster.single(8))
    assert str(err.value) == (
        "no node of the Ray cluster has more than 0 GPUs (1 node, CPU=8, GPU=0 in all (CPU=8, GPU=0 free)), but "
        "step 'Model' (%2) asks for 1 GPU per replica; step 'Wide' (%3) asks for 1 GPU per replica: add GPUs to the "
        "cluster, lower num_gpus, or compile(..., gpu_fallback=True) to run them on CPU"
    )
    assert err.value.step_name == "step 'Model' (%2)" and not err.value.busy


def test_gpus_are_counted_per_node() -> None:
    two_gpus = traced(Model()(pipeline.INPUT)).graph
    # Two GPUs in all, one per node: a unit asking for 2 fits nowhere.
    wants_two = traced(pipeline.step(execution_mode="tasks", num_gpus=2, name="big")(lambda x: x)(pipeline.INPUT)).graph
    cluster = Cluster(nodes=(_node("a", 4, gpu=1), _node("b", 4, gpu=1)))
    assert place(two_gpus, cluster=cluster).graph is two_gpus
    with pytest.raises(pipeline.PlacementError, match=r"no node of the Ray cluster has more than 1 GPU \(2 nodes, CPU=8, GPU=2 in all"):
        place(wants_two, cluster=cluster)


def test_fallback_runs_them_on_cpu_and_says_so() -> None:
    compiled = pipeline.compile(Model()(prep(pipeline.INPUT)), gpu_fallback=True, optimize=False, backend=None)
    placed = compiled.place(Cluster.single(2))
    assert placed.graph.dump() == (
        "pipeline Model(%0: Any) -> int:\n"
        "  %1: int = prep(%0)                            # tasks\n"
        "  %2: int = Model()(%1)                         # actors\n"
        "  return %2"
    )
    assert placed.explain() == (
        "place:\n"
        "  - step 'Model' (%2): gpu=1 -> CPU: no node has 1 GPU (at most 0) and gpu_fallback=True\n"
        "  - cluster: 1 node, CPU=2, GPU=0 in all (CPU=2, GPU=0 free); checked against what is free now\n"
        "  - step 'prep' (%1): tasks of CPU=1, GPU=0 fit on 1 node beside the replicas\n"
        "  - step 'Model' (%2): 1 replica x CPU=0 (1 to start), GPU=0 -> node0"
    )
    assert placed.source_graph is compiled.source_graph and compiled.graph.step("Model").placement.num_gpus == 1


def test_fallback_of_a_fused_group_takes_its_members_along() -> None:
    compiled = traced(refine(infer(prep(pipeline.INPUT))))
    fused, _ = run_passes(compiled.graph, [fuse_tasks])
    result = apply(_placing(Cluster.single(2), fallback=True), fused)
    assert result.graph.dump() == (
        "pipeline refine(%0: Any) -> int:\n"
        "  %1: int = prep(%0)                            # tasks\n"
        "  %4: int = fused tasks {                       # tasks, 2 nodes\n"
        "    %2: int = infer(%1)                         # tasks\n"
        "    %3: int = refine(%2)                        # tasks\n"
        "  } -> %3\n"
        "  return %4"
    )
    assert result.rewrites[0] == "fused group %4 (infer+refine): gpu=0.5 -> CPU: no node has 0.5 GPUs (at most 0) and gpu_fallback=True"
    # Half a GPU fits one GPU.
    assert place(fused, cluster=Cluster.single(2, gpus=1)).graph is fused


@pipeline.step(execution_mode="actors")
def tokenize(x: int) -> int:
    return x + 2


def test_a_folded_gpu_group_falls_back_to_cpu_whole() -> None:
    # colocate_actors folds the small CPU step into Model's GPU actor; the
    # group asks for the GPU, so it falls back (or fails) as one unit.
    folded, _ = run_passes(traced(Model()(tokenize(pipeline.INPUT))).graph, [colocate_actors])
    assert "fused actors" in folded.dump() and "gpu=1, 2 nodes" in folded.dump()
    assert place(folded, cluster=Cluster.single(2, gpus=1)).rewrites[1] == "fused group %3 (tokenize+Model): 1 replica x CPU=1, GPU=1 -> node0"
    with pytest.raises(pipeline.PlacementError, match=r"fused group %3 \(tokenize\+Model\) asks for 1 GPU per replica"):
        place(folded, cluster=Cluster.single(2))
    result = apply(_placing(Cluster.single(2), fallback=True), folded)
    assert result.graph.dump() == (
        "pipeline Model(%0: Any) -> int:\n"
        "  %3: int = fused actors {                      # actors, 2 nodes\n"
        "    %1: int = tokenize(%0)                      # actors\n"
        "    %2: int = Model()(%1)                       # actors\n"
        "  } -> %2\n"
        "  return %3"
    )
    assert result.rewrites == (
        "fused group %3 (tokenize+Model): gpu=1 -> CPU: no node has 1 GPU (at most 0) and gpu_fallback=True",
        "cluster: 1 node, CPU=2, GPU=0 in all (CPU=2, GPU=0 free); checked against what is free now",
        "fused group %3 (tokenize+Model): 1 replica x CPU=0 (1 to start), GPU=0 -> node0",
    )


def test_local_gpu_steps_reserve_nothing_and_are_left_alone() -> None:
    compiled = traced(on_caller(pipeline.INPUT))
    result = place(compiled.graph, cluster=Cluster.single(1))
    assert result.graph is compiled.graph and result.rewrites == ()


def test_over_reserved_gpus_are_an_error_even_with_fallback() -> None:
    compiled = traced(Wide()(pipeline.INPUT))
    with pytest.raises(pipeline.PlacementError, match=r"step 'Wide' \(%1\) needs CPU=1, GPU=1 per replica, CPU=2, GPU=2 for its 2 replicas, but only 1 of them fit"):
        place(compiled.graph, cluster=Cluster.single(8, gpus=1), fallback=True)
    # Actors hold their GPUs: a GPU task needs one more.
    compiled = traced(infer(Model()(pipeline.INPUT)))
    with pytest.raises(pipeline.PlacementError, match=r"step 'infer' \(%2\): one task needs CPU=1, GPU=0.5, but no node .* beside the actor replicas"):
        place(compiled.graph, cluster=Cluster.single(8, gpus=1))
    assert place(compiled.graph, cluster=Cluster.single(8, gpus=2)).graph is compiled.graph


# -- room for the whole deployment --


def test_more_replicas_than_cpus_fail_at_once_naming_the_step_and_the_cluster() -> None:
    compiled = traced(Eight()(pipeline.INPUT))
    with pytest.raises(pipeline.PlacementError) as err:
        place(compiled.graph, cluster=Cluster.single(4))
    assert str(err.value) == (
        "step 'Eight' (%1) needs CPU=1, GPU=0 per replica, CPU=8, GPU=0 for its 8 replicas, but only 4 of them fit "
        "in the Ray cluster's free resources (1 node, CPU=4, GPU=0 in all (CPU=4, GPU=0 free); the most left on one "
        "node: CPU=0, GPU=0 on node0); the whole deployment's replicas hold CPU=8, GPU=0. Ray would start 4 and leave "
        "the rest waiting forever: lower num_replicas, num_cpus or num_gpus, or add nodes to the cluster; on an "
        "autoscaling cluster, deploy(check_resources='off') leaves it to the autoscaler"
    )
    assert not err.value.busy


def test_replicas_pack_over_nodes() -> None:
    compiled = traced(Model()(Eight()(pipeline.INPUT)))
    cluster = Cluster(nodes=(_node("gpu", 2, gpu=1), _node("a", 4), _node("b", 3)))
    result = place(compiled.graph, cluster=cluster)
    assert result.rewrites[1:] == (
        "step 'Eight' (%1): 8 replicas x CPU=1, GPU=0 -> a x4, b x3, gpu",
        "step 'Model' (%2): 1 replica x CPU=1, GPU=1 -> gpu",
    )


def test_default_actors_need_a_cpu_to_start_and_hold_none() -> None:
    graph = traced(Plain()(pipeline.INPUT)).graph
    assert place(graph, cluster=Cluster.single(1)).rewrites[1] == "step 'Plain' (%1): 4 replicas x CPU=0 (1 to start), GPU=0 -> node0 x4"
    with pytest.raises(pipeline.PlacementError, match=r"needs CPU=0 \(1 to start\), GPU=0 per replica"):
        place(graph, cluster=Cluster(nodes=(_node("full", 4, free_cpu=0.5),)))


def test_a_task_needs_room_beside_the_replicas() -> None:
    graph = traced(prep(Eight()(pipeline.INPUT))).graph
    with pytest.raises(pipeline.PlacementError) as err:
        place(graph, cluster=Cluster.single(8))
    assert str(err.value).startswith(
        "step 'prep' (%2): one task needs CPU=1, GPU=0, but no node of the Ray cluster has that much free beside the "
        "actor replicas (1 node, CPU=8, GPU=0 in all (CPU=8, GPU=0 free); the most left on one node: CPU=0, GPU=0 on "
        "node0). Its calls would wait forever: lower num_replicas"
    )


def test_short_of_what_is_free_only_is_busy_and_total_waits_for_it() -> None:
    graph = traced(Eight()(pipeline.INPUT)).graph
    cluster = Cluster(nodes=(_node("n1", 16, free_cpu=4),))
    with pytest.raises(pipeline.PlacementError, match="other work holds the rest now: stop it, or deploy.check_resources='total'.") as err:
        place(graph, cluster=cluster)
    assert err.value.busy
    assert place(graph, cluster=cluster, check="total").rewrites[0] == (
        "cluster: 1 node, CPU=16, GPU=0 in all (CPU=4, GPU=0 free); checked against the nodes' totals (deploy(check_resources='total'))"
    )


def test_check_off_raises_nothing_but_still_falls_back() -> None:
    graph = traced(Model()(Eight()(pipeline.INPUT))).graph
    result = place(graph, cluster=Cluster.single(1), check="off", fallback=True)
    assert result.rewrites == (
        "step 'Model' (%2): gpu=1 -> CPU: no node has 1 GPU (at most 0) and gpu_fallback=True",
        "cluster: 1 node, CPU=1, GPU=0 in all (CPU=1, GPU=0 free); resources not checked (deploy(check_resources='off')): "
        "Ray or its autoscaler must find room for 9 replicas, or deploy() fails after deploy_timeout_s",
    )
    assert place(graph, cluster=Cluster.single(1), check="off").graph is graph


def test_check_resources_is_a_checked_deploy_option() -> None:
    with pytest.raises(pipeline.PipelineValueError, match="check_resources must be 'available', 'total' or 'off', got 'some'"):
        prep(pipeline.INPUT).deploy(check_resources="some")  # type: ignore[typeddict-item]


# -- against the session's Ray --


@pipeline.step(execution_mode="tasks", num_gpus=4)
def big_model(x: int) -> int:
    return x * 7


@pipeline.step(execution_mode="actors", num_replicas=16, num_cpus=1)
class Sixteen:
    def __call__(self, x: int) -> int:
        return x


def test_deploy_places_gpu_steps_on_the_clusters_gpus(ray_session: Any) -> None:
    with pipeline.compile(Model()(prep(pipeline.INPUT))).deploy() as p:
        assert p.call(1) == 4
        assert "gpu=1" in p.graph.dump()
        assert "step 'Model' (%2): 1 replica x CPU=1, GPU=1 -> " in p.compiled.explain()


def test_deploy_raises_placement_error_naming_the_step(ray_session: Any) -> None:
    with pytest.raises(pipeline.PlacementError, match=r"step 'big_model' \(%1\) asks for 4 GPUs per task.*gpu_fallback=True"):
        big_model(pipeline.INPUT).deploy()


def test_deploy_with_fallback_runs_on_cpu_and_explains(ray_session: Any) -> None:
    compiled = pipeline.compile(big_model(pipeline.INPUT), gpu_fallback=True)
    with compiled.deploy() as p:
        assert p.call(2) == 14
        assert "gpu=" not in p.graph.dump()
        assert "place:" in p.compiled.explain() and "big_model" in p.compiled.explain()
    assert "gpu=4" in compiled.graph.dump()  # the compiled pipeline itself is unchanged


def test_a_deploy_that_cannot_fit_fails_at_once_and_the_next_one_runs(ray_session: Any) -> None:
    with pytest.raises(pipeline.PlacementError, match=r"step 'Sixteen' \(%1\) needs CPU=1, GPU=0 per replica, CPU=16, GPU=0 for its 16 replicas, but only \d+ of them fit"):
        Sixteen()(pipeline.INPUT).deploy()
    with pipeline.compile(Plain()(prep(pipeline.INPUT))).deploy() as p:
        assert p.call(1) == 2


@pipeline.step(execution_mode="actors")
def stamp(x: int) -> tuple[int, int, int]:
    """x + 1, the process it ran in, and how many GPUs that process holds."""
    import ray

    return x + 1, os.getpid(), len(ray.get_gpu_ids())


@pipeline.step(execution_mode="actors", num_gpus=1)
class Doubler:
    def __call__(self, t: tuple[int, int, int]) -> tuple[int, int, int, int]:
        return 2 * t[0], t[1], os.getpid(), t[2]


def test_deploy_runs_a_folded_cpu_step_in_the_gpu_steps_actor(ray_session: Any) -> None:
    node = Doubler()(stamp(pipeline.INPUT))
    with pipeline.compile(node).deploy() as p:
        assert "fused actors" in p.graph.dump() and "# actors gpu=1, 2 nodes" in p.graph.dump()
        value, stamp_pid, doubler_pid, gpus_seen = p.call(3)
    # One replica pool serves both: the CPU step ran in the GPU actor's
    # process, and saw its (logical) GPU.
    assert (value, gpus_seen) == (8, 1) and stamp_pid == doubler_pid != os.getpid()
    # Split (no passes): the same answer from two actors; the CPU one holds no GPU.
    with pipeline.compile(node, optimize=False).deploy() as p:
        value, stamp_pid, doubler_pid, gpus_seen = p.call(3)
    assert (value, gpus_seen) == (8, 0) and stamp_pid != doubler_pid
