"""deploy_timeout_s: replicas not built in time fail deploy() with a
PipelineTimeoutError naming the step and saying what it waits for (its
constructor, or resources), every actor started is killed, and no replica
process is left; the next deploy runs as usual."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import pipeline_ir as pipeline
from process_helpers import wait_gone


@pipeline.step(execution_mode="actors", num_replicas=2)
class Stuck:
    def __init__(self, pid_dir: str) -> None:
        Path(pid_dir, str(os.getpid())).touch()
        time.sleep(3600)

    def __call__(self, x: int) -> int:
        return x


@pipeline.step(execution_mode="tasks")
def inc(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="actors", num_gpus=1)
class OnGpu:
    def __call__(self, x: int) -> int:
        return x


def test_a_constructor_that_never_returns_fails_deploy_and_leaves_no_process(ray_session: Any, tmp_path: Path) -> None:
    with pytest.raises(pipeline.PipelineTimeoutError) as err:
        Stuck(str(tmp_path))(inc(pipeline.INPUT)).deploy(deploy_timeout_s=3)
    assert err.value.step_name == "Stuck" and isinstance(err.value, TimeoutError)
    message = str(err.value)
    assert message.startswith("deploy(): step 'Stuck' was not ready within deploy_timeout_s: replica")
    assert "still running" in message and "Every actor the deploy started was stopped" in message
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert pids and f"pid {pids[0]} on node" in message
    assert wait_gone(pids) == []
    with pipeline.compile(inc(pipeline.INPUT)).deploy() as p:
        assert p.call(1) == 2


def test_a_replica_waiting_for_resources_says_so(ray_session: Any) -> None:
    # The session's one GPU is held by work outside the pipeline; with
    # check_resources="total" the deploy waits for it, up to the timeout.
    holder = ray_session.remote(num_gpus=1, num_cpus=0)(type("Holder", (), {"ping": lambda self: 1})).remote()
    try:
        ray_session.get(holder.ping.remote())
        with pytest.raises(pipeline.PlacementError, match=r"other work holds the rest now") as busy:
            OnGpu()(pipeline.INPUT).deploy()
        assert busy.value.busy
        with pytest.raises(pipeline.PipelineTimeoutError) as err:
            OnGpu()(pipeline.INPUT).deploy(deploy_timeout_s=2, check_resources="total")
        assert str(err.value).startswith(
            "deploy(): step 'OnGpu' was not ready within deploy_timeout_s: replica 0 not started by Ray: "
            "it waits for resources (num_gpus=1 per replica) no node has free, or for a worker process."
        )
    finally:
        ray_session.kill(holder)
    with pipeline.compile(OnGpu()(pipeline.INPUT)).deploy() as p:
        assert p.call(3) == 3
