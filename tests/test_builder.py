"""builder.py: switch's default (None is no default, on every backend)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import pipeline_ir as pipeline
from pipeline_ir.builder import has_default


@pipeline.step
def add_one(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="tasks")
def double(x: int) -> int:
    return x * 2


def with_none(branch: pipeline.PipelineNode) -> pipeline.PipelineNode:
    return pipeline.switch(pipeline.INPUT["k"], {"a": branch}, default=None)


def omitted(branch: pipeline.PipelineNode) -> pipeline.PipelineNode:
    return pipeline.switch(pipeline.INPUT["k"], {"a": branch})


def _assert_no_default(node: pipeline.PipelineNode) -> None:
    assert not has_default(node)  # type: ignore[arg-type]
    assert " default " not in pipeline.compile(node, optimize=False).graph.dump()
    with node.deploy() as p:
        assert p.call({"k": "a", "x": 1}) == 2
        with pytest.raises(pipeline.StepError, match=r"has no branch for key 'b' and no default") as info:
            p.call({"k": "b", "x": 1})
        assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("make", [with_none, omitted])
def test_switch_default_none_means_no_default_on_local(make: Callable[[pipeline.PipelineNode], pipeline.PipelineNode]) -> None:
    _assert_no_default(make(add_one(pipeline.INPUT["x"])))


@pytest.mark.parametrize("make", [with_none, omitted])
def test_switch_default_none_means_no_default_on_tasks(
    ray_session: Any, make: Callable[[pipeline.PipelineNode], pipeline.PipelineNode]
) -> None:
    _assert_no_default(make(double(pipeline.INPUT["x"])))


def test_switch_default_none_and_omitted_trace_alike() -> None:
    branch = add_one(pipeline.INPUT["x"])
    assert pipeline.compile(with_none(branch)).graph == pipeline.compile(omitted(branch)).graph


def test_switch_with_no_branch_needs_a_default_that_is_not_none() -> None:
    with pytest.raises(pipeline.PipelineValueError, match="at least one branch or a default"):
        pipeline.switch(pipeline.INPUT, {}, default=None)
    with pipeline.switch(pipeline.INPUT, {}, default=0).deploy() as p:
        assert p.call("anything") == 0
