"""Serving on ACTORS pools, against real failures: dynamic batching, a
replica SIGKILLed or SIGSTOPped under load, hot swap under load.

Bounds on elapsed time only catch hangs; figures are the benchmarks'."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import pytest

import pipeline_ir as pipeline

pytestmark = pytest.mark.timeout(240)


class Scale:
    """A batched model: one call per batch, `k` times each item."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, xs: list[int]) -> list[int]:
        time.sleep(0.005)  # the fixed cost per call that batching shares
        return [x * self.k for x in xs]


class Broken:
    """Breaks the batching contract: one result too few."""

    def __call__(self, xs: list[int]) -> list[int]:
        return xs[1:]


def fails_on_negative(xs: list[int]) -> list[int]:
    if any(x < 0 for x in xs):
        raise ValueError("negative item")
    return xs


def slow_identity(x: int) -> int:
    time.sleep(0.002)
    return x


def identity(x: int) -> int:
    return x


class Version:
    def __init__(self, v: int) -> None:
        self.v = v

    def __call__(self, x: int) -> tuple[int, int]:
        time.sleep(0.002)
        return (self.v, x)


def pool_of(p: pipeline.Pipeline, key: str) -> Any:
    return p._program.launchers["actors"].pools[key]  # type: ignore[attr-defined]


def flood(p: pipeline.Pipeline, n: int) -> list[object]:
    async def main() -> list[object]:
        return list(await asyncio.gather(*(p.call_async(i) for i in range(n))))

    return asyncio.run(main())


def test_dynamic_batching_groups_concurrent_calls(ray_session: Any) -> None:
    step = pipeline.step(Scale, execution_mode="actors", max_batch_size=8, batch_wait_timeout_s=0.02)
    node = step(3)(pipeline.INPUT)
    assert "batch<=8/20ms" in pipeline.compile(node).graph.dump()
    with node.deploy() as p:
        assert flood(p, 64) == [3 * i for i in range(64)]
        assert p.call(5) == 15  # a lone call waits at most the batch timeout
        figures = p.stats()["Scale"]
        assert figures["calls"] == 65 and figures["errors"] == 0
        assert figures["mean_batch_size"] is not None and figures["mean_batch_size"] > 1.5
        assert "batch=" in p.dump()
        assert list(p.map(range(20), max_in_flight=8)) == [3 * i for i in range(20)]


def test_batched_step_runs_one_item_at_a_time_off_actors() -> None:
    step = pipeline.step(Scale, execution_mode="actors", max_batch_size=8)
    with pipeline.compile(step(2)(pipeline.INPUT), backend="local").deploy() as p:
        assert [p.call(i) for i in range(3)] == [0, 2, 4]


def test_batch_errors_name_the_step(ray_session: Any) -> None:
    broken = pipeline.step(Broken, execution_mode="actors", max_batch_size=4)
    with broken()(pipeline.INPUT).deploy() as p:
        with pytest.raises(pipeline.StepError, match="Broken.*must return a list with one result per item") as info:
            p.call(1)
        assert info.value.step_name == "Broken"
    raising = pipeline.step(fails_on_negative, execution_mode="actors", max_batch_size=4)
    with raising(pipeline.INPUT).deploy() as p:
        with pytest.raises(pipeline.StepError, match="fails_on_negative") as err:
            p.call(-1)
        assert isinstance(err.value.__cause__, ValueError)
        assert p.call(2) == 2  # the pipeline stays usable


def test_idempotent_calls_survive_a_killed_replica(ray_session: Any) -> None:
    step = pipeline.step(slow_identity, execution_mode="actors", num_replicas=2, idempotent=True)
    with step(pipeline.INPUT).deploy() as p:
        victim = pool_of(p, "slow_identity").slots[0].pid
        killer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
        killer.start()
        results = list(p.map(range(1000), max_in_flight=16, return_exceptions=True))
        killer.join()
        lost = [r for r in results if isinstance(r, BaseException)]
        assert lost == [], f"{len(lost)} of 1000 lost: {lost[:2]}"
        assert results == list(range(1000))
        assert all(s.pid != victim for s in pool_of(p, "slow_identity").live_slots())


def test_a_killed_upstream_replica_is_named_in_every_error(ray_session: Any) -> None:
    up = pipeline.step(slow_identity, execution_mode="actors", num_replicas=2)
    down = pipeline.step(identity, execution_mode="actors", fuse=False)
    with down(up(pipeline.INPUT)).deploy() as p:
        victim = pool_of(p, "slow_identity").slots[0].pid
        killer = threading.Timer(0.3, os.kill, (victim, signal.SIGKILL))
        killer.start()
        results = list(p.map(range(400), max_in_flight=16, return_exceptions=True))
        killer.join()
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors, "the kill landed after the calls: nothing was tested"
        for e in errors:
            assert isinstance(e, pipeline.StepError) and e.step_name == "slow_identity", e
            assert "replica" in str(e)
        assert p.call(7) == 7


def test_a_stopped_replica_is_found_and_replaced(ray_session: Any) -> None:
    step = pipeline.step(slow_identity, execution_mode="actors", num_replicas=2)
    with step(pipeline.INPUT).deploy(health_check_period_s=0.5, health_check_timeout_s=2.0) as p:
        victim = pool_of(p, "slow_identity").slots[0].pid
        stopper = threading.Timer(0.3, os.kill, (victim, signal.SIGSTOP))
        stopper.start()
        try:
            start = time.monotonic()
            results = list(p.map(range(600), max_in_flight=16, return_exceptions=True))
            assert time.monotonic() - start < 60
            errors = [r for r in results if isinstance(r, BaseException)]
            for e in errors:
                assert isinstance(e, pipeline.StepError) and "health check" in str(e), e
            assert sum(1 for i, r in enumerate(results) if r == i) == 600 - len(errors)
            assert all(s.pid != victim for s in pool_of(p, "slow_identity").live_slots())
            assert p.call(3, timeout=30) == 3
        finally:
            stopper.join()
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_hot_swap_drops_no_call(ray_session: Any) -> None:
    step = pipeline.step(Version, execution_mode="actors", num_replicas=2)
    with step(1)(pipeline.INPUT).deploy() as p:
        old = {s.pid for s in pool_of(p, "Version").slots}
        swapper = threading.Timer(0.3, p.update, (step, 2))
        swapper.start()
        results = list(p.map(range(600), max_in_flight=16, return_exceptions=True))
        swapper.join()
        assert not [r for r in results if isinstance(r, BaseException)]
        assert [x for _, x in results] == list(range(600))  # type: ignore[misc]
        assert p.call(1) == (2, 1)
        assert not old & {s.pid for s in pool_of(p, "Version").slots}
        p.update("Version", 3)
        assert p.call(1) == (3, 1)


class Wrap:
    def __init__(self, v: int) -> None:
        self.v = v

    def __call__(self, x: object) -> tuple[int, object]:
        return (self.v, x)


def test_update_says_what_it_can_replace(ray_session: Any) -> None:
    local = pipeline.step(Version)
    remote = pipeline.step(Wrap, execution_mode="actors", name="Remote")
    with remote(1)(local(0)(pipeline.INPUT)).deploy() as p:
        with pytest.raises(ValueError, match="no class step 'Nope'"):
            p.update("Nope", 1)
        with pytest.raises(ValueError, match="update\\(\\) replaces actor replicas"):
            p.update("Version", 1)
        with pytest.raises(pipeline.StepError, match="constructor"):
            p.update("Remote", "not", "an int")  # __init__ takes one argument: the old replicas keep serving
        assert p.call(5) == (1, (0, 5))
