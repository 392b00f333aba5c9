"""place_gpu: GPU steps keep their GPUs when the cluster has them; a
cluster without enough GPUs is a PlacementError naming the steps, or with
gpu_fallback a CPU run written in explain(). LOCAL steps are never
touched; over-reserved actors are an error even with the fallback. The
cluster's GPU count comes from Ray's logical resources (conftest starts
Ray with num_gpus=1)."""

from __future__ import annotations

import functools
from typing import Any

import pytest

import pipeline_ir as pipeline
from pass_helpers import apply, traced
from pipeline_ir.passes import check_gpus, fuse_tasks, place_gpu, run_passes


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


def test_unknown_cluster_or_enough_gpus_changes_nothing() -> None:
    compiled = traced(Model()(prep(pipeline.INPUT)))
    assert apply(place_gpu, compiled.graph).graph is compiled.graph
    assert apply(functools.partial(place_gpu, cluster_gpus=1), compiled.graph).graph is compiled.graph
    assert compiled.place(1) is compiled


def test_no_gpu_is_an_error_naming_each_step() -> None:
    compiled = traced(Wide()(Model()(prep(pipeline.INPUT))))
    with pytest.raises(pipeline.PlacementError) as err:
        place_gpu(compiled.graph, cluster_gpus=0)
    assert str(err.value) == (
        "the Ray cluster has 0 GPUs, but step 'Model' (%2) asks for 1 GPU per replica; "
        "step 'Wide' (%3) asks for 1 GPU per replica: add GPUs to the cluster, lower num_gpus, "
        "or compile(..., gpu_fallback=True) to run them on CPU"
    )


def test_fallback_runs_them_on_cpu_and_says_so() -> None:
    compiled = pipeline.compile(Model()(prep(pipeline.INPUT)), gpu_fallback=True, optimize=False, backend=None)
    placed = compiled.place(0)
    assert placed.graph.dump() == (
        "pipeline Model(%0: Any) -> int:\n"
        "  %1: int = prep(%0)                            # tasks\n"
        "  %2: int = Model()(%1)                         # actors\n"
        "  return %2"
    )
    assert placed.explain() == (
        "place_gpu:\n  - step 'Model' (%2): gpu=1 -> CPU: the cluster has 0 GPUs and gpu_fallback=True"
    )
    assert placed.source_graph is compiled.source_graph and compiled.graph.step("Model").placement.num_gpus == 1


def test_fallback_of_a_fused_group_takes_its_members_along() -> None:
    compiled = traced(refine(infer(prep(pipeline.INPUT))))
    fused, _ = run_passes(compiled.graph, [fuse_tasks])
    result = apply(functools.partial(place_gpu, cluster_gpus=0, fallback=True), fused)
    assert result.graph.dump() == (
        "pipeline refine(%0: Any) -> int:\n"
        "  %1: int = prep(%0)                            # tasks\n"
        "  %4: int = fused tasks {                       # tasks, 2 nodes\n"
        "    %2: int = infer(%1)                         # tasks\n"
        "    %3: int = refine(%2)                        # tasks\n"
        "  } -> %3\n"
        "  return %4"
    )
    assert result.rewrites == (
        "fused group %4 (infer+refine): gpu=0.5 -> CPU: the cluster has 0 GPUs and gpu_fallback=True",
    )
    # Half a GPU fits one GPU.
    assert place_gpu(fused, cluster_gpus=1).graph is fused


def test_local_gpu_steps_reserve_nothing_and_are_left_alone() -> None:
    compiled = traced(on_caller(pipeline.INPUT))
    assert place_gpu(compiled.graph, cluster_gpus=0).graph is compiled.graph


def test_over_reserved_actors_are_an_error_even_with_fallback() -> None:
    compiled = traced(Wide()(pipeline.INPUT))
    with pytest.raises(pipeline.PlacementError, match=r"actor replicas reserve 2 \(step 'Wide' \(%1\) x2 gpu=1\)"):
        place_gpu(compiled.graph, cluster_gpus=1, fallback=True)
    # Actors hold their GPUs: a GPU task needs one more.
    compiled = traced(infer(Model()(pipeline.INPUT)))
    with pytest.raises(pipeline.PlacementError, match="reserve 1 .* plus 0.5 for the largest GPU task"):
        check_gpus(compiled.graph, 1)
    assert check_gpus(compiled.graph, 2) == []


def test_against_a_ray_cluster_with_one_logical_gpu(ray_session: Any) -> None:
    gpus = ray_session.cluster_resources().get("GPU", 0)
    assert gpus == 1
    fits = pipeline.compile(Model()(prep(pipeline.INPUT)))
    assert fits.place(gpus) is fits
    too_many = pipeline.compile(Wide()(prep(pipeline.INPUT)), gpu_fallback=True)
    with pytest.raises(pipeline.PlacementError, match="step 'Wide'"):
        too_many.place(gpus)


@pipeline.step(execution_mode="tasks", num_gpus=4)
def big_model(x: int) -> int:
    return x * 7


def test_deploy_places_gpu_steps_on_the_clusters_gpus(ray_session: Any) -> None:
    with pipeline.compile(Model()(prep(pipeline.INPUT))).deploy() as p:
        assert p.call(1) == 4
        assert "gpu=1" in p.graph.dump()


def test_deploy_raises_placement_error_naming_the_step(ray_session: Any) -> None:
    with pytest.raises(pipeline.PlacementError, match=r"step 'big_model' \(%1\) asks for 4 GPUs per task.*gpu_fallback=True"):
        big_model(pipeline.INPUT).deploy()


def test_deploy_with_fallback_runs_on_cpu_and_explains(ray_session: Any) -> None:
    compiled = pipeline.compile(big_model(pipeline.INPUT), gpu_fallback=True)
    with compiled.deploy() as p:
        assert p.call(2) == 14
        assert "gpu=" not in p.graph.dump()
        assert "place_gpu:" in p.compiled.explain() and "big_model" in p.compiled.explain()
    assert "gpu=4" in compiled.graph.dump()  # the compiled pipeline itself is unchanged
