"""Channel units on the actors backend (`compile(..., channels=True)`):
same results and errors as actor tasks, async calls, a dead replica, and
shutdown."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

import pipeline_ir as pipeline
from process_helpers import alive, wait_gone

pytestmark = pytest.mark.usefixtures("ray_session")


@pipeline.step
def prep(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="actors")
class Scale:
    def __init__(self, k: int) -> None:
        self.k = k
        self.calls = 0

    def __call__(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        self.calls += 1
        return x * self.k


@pipeline.step(execution_mode="actors")
def tag(x: int) -> tuple[int, int]:
    return x, os.getpid()


def test_channels_give_the_same_results_and_errors_as_actor_tasks() -> None:
    node = tag(Scale(3)(prep(pipeline.INPUT)))
    compiled = pipeline.compile(node, channels=True)
    with compiled.deploy() as p:
        assert "submit_channel" in p.code
        results = [p.call(i)[0] for i in range(5)]  # type: ignore[index]
        assert results == [(i + 1) * 3 for i in range(5)]
        with pytest.raises(pipeline.StepError, match=r"step 'Scale' \(node %2\) raised ValueError: negative: -1") as info:
            p.call(-2)
        assert isinstance(info.value.__cause__, ValueError)
        assert p.call(1)[0] == 6  # type: ignore[index]
        # call_async and map take awaitable actor tasks to the same replica.
        assert asyncio.run(p.call_async(2))[0] == 9  # type: ignore[index]
        assert [r[0] for r in p.map(range(3), max_in_flight=2)] == [3, 6, 9]  # type: ignore[index]
        pids = {p.call(0)[1] for _ in range(3)}  # type: ignore[index]
    assert len(pids) == 1
    assert not [pid for pid in pids if alive(pid)]


def test_a_dead_replica_behind_a_channel_is_replaced() -> None:
    compiled = pipeline.compile(tag(pipeline.INPUT), channels=True)
    with compiled.deploy() as p:
        first = p.call(1)[1]  # type: ignore[index]
        import ray

        os.kill(first, 9)
        wait_gone([first])
        # The channel's replica is gone: the call either fails with a
        # StepError naming the step, or (when the death was seen first)
        # goes to the new replica; it never hangs, and later calls work.
        try:
            got: Any = p.call(2)
        except pipeline.StepError as e:
            assert e.step_name == "tag"
        else:
            assert got[0] == 2 and got[1] != first
        second = p.call(3)[1]  # type: ignore[index]
        assert second != first and p.call(4)[0] == 4  # type: ignore[index]
        assert ray.is_initialized()
    assert not alive(second)


@pipeline.step(execution_mode="actors")
def slow(x: float) -> float:
    import time

    time.sleep(x)
    return x


def test_a_channel_call_without_deadline_waits_past_rays_channel_timeout() -> None:
    """A compiled graph gives up reading after RAY_CGRAPH_get_timeout (10 s)
    unless told otherwise; a call without a deadline must not: no deadline
    means none. With one, the deadline's PipelineTimeoutError names the step."""
    from ray.dag import DAGContext

    context = DAGContext.get_current()
    default, context.get_timeout = context.get_timeout, 1  # read when the graph is compiled, at deploy
    try:
        with pipeline.compile(slow(pipeline.INPUT), channels=True).deploy() as p:
            assert p.call(1.5) == 1.5
            with pytest.raises(pipeline.PipelineTimeoutError, match=r"after 0.5 s: step 'slow' \(node %1\) was still running"):
                p.call(1.5, timeout=0.5)
    finally:
        context.get_timeout = default
