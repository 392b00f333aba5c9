"""Mixed graphs and graph shapes on every backend; colocation labels."""

from __future__ import annotations

import os
from typing import Any

import msgspec
import numpy as np
import pytest

import pipeline_ir as pipeline

pytestmark = pytest.mark.usefixtures("ray_session")


@pipeline.step
def add_one(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="tasks")
def double(x: int) -> int:
    return x * 2


@pipeline.step(execution_mode="actors", num_replicas=2)
class Adder:
    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self, x: int) -> int:
        return x + self.value


@pipeline.step
def where(x: object) -> int:
    return os.getpid()


def test_contract_example_mixes_all_three_modes() -> None:
    node = Adder(10)(double(add_one(pipeline.INPUT)))
    with node.deploy() as p:
        assert p.call(1) == 14
        assert p.call(2) == 16
    # LOCAL steps run in the caller, between remote ones.
    with pipeline.compile((where(double(pipeline.INPUT)), double(where(pipeline.INPUT)))).deploy() as p:
        here, doubled = p.call(3)  # type: ignore[misc]
    assert here == os.getpid() and doubled == 2 * os.getpid()


# -- one graph with every shape, compared across backends --


@pipeline.step
def split(x: dict[str, Any]) -> tuple[int, np.ndarray[Any, Any]]:
    return x["n"], np.asarray(x["v"], dtype=np.float64)


@pipeline.step
def weigh(v: np.ndarray[Any, Any], w: np.ndarray[Any, Any], *, bias: float = 0.0) -> float:
    return float(v @ w) + bias


@pipeline.step
def combine(*parts: object, scale: int = 1) -> list[object]:
    return [p * scale for p in parts]  # type: ignore[operator]


@pipeline.step(name="Offset")
class Offset:
    def __init__(self, by: int) -> None:
        self.by = by

    def __call__(self, x: int) -> int:
        return x + self.by


def _shapes() -> tuple[pipeline.PipelineNode, ...]:
    parts = split(pipeline.INPUT)
    n, v = parts[0], parts[1]  # projections
    weights = np.array([0.5, 2.0, 1.0])  # an External constant
    score = weigh(v, weights, bias=1.5)  # kwargs
    shifted = Offset(7)(n)
    fan_in = combine(score, shifted, add_one(shifted), scale=pipeline.INPUT["k"])  # fan-out of shifted, INPUT mixed in
    return fan_in, shifted, pipeline.INPUT["n"]  # several outputs


@pytest.mark.parametrize("backend", ["tasks", "actors"])
def test_every_graph_shape_gives_the_local_result(backend: str) -> None:
    x = {"n": 3, "v": [1.0, 2.0, 3.0], "k": 2}
    with pipeline.compile(_shapes(), backend="local").deploy() as local:
        expected = local.call(x)
    assert expected == ([18.0, 20, 22], 10, 3)
    for optimize in (False, True):
        with pipeline.compile(_shapes(), backend=backend, optimize=optimize).deploy() as p:
            assert p.call(x) == expected, (backend, optimize, p.code)


# -- colocation labels (set by passes; here by hand) --


@pipeline.step(execution_mode="actors", num_replicas=2)
def placed(x: object) -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


@pipeline.step(execution_mode="tasks")
def placed_task(x: object) -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def test_colocate_labels_put_actors_and_tasks_on_one_node() -> None:
    compiled = pipeline.compile((placed(pipeline.INPUT), placed_task(pipeline.INPUT)), optimize=False)
    steps = tuple(msgspec.structs.replace(s, placement=msgspec.structs.replace(s.placement, colocate="g")) for s in compiled.graph.steps)
    graph = msgspec.structs.replace(compiled.graph, steps=steps)
    compiled = pipeline.CompiledPipeline(graph, compiled.source_graph, compiled.bindings, compiled.records)
    with compiled.deploy() as p:
        actors = p._program.closers[0].__self__  # type: ignore[attr-defined]
        node = actors.colocation.node("g")
        assert {s.node for s in actors.pools["placed"].slots} == {node}
        assert p.call(None) == (node, node)
