"""Serving: deadlines, cancellation, backpressure, map that accounts for
every item, live stats. Each behaviour is checked against the real thing:
a step that sleeps or never returns, a flood of calls, shutdown with work
in flight. Bounds on elapsed time here only catch hangs (generous, never a
performance claim)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import pipeline_ir as pipeline
from pipeline_ir.admission import Admission

pytestmark = pytest.mark.timeout(240)


def slow_then_mark(arg: tuple[float, str]) -> str:
    """Sleeps, then writes a marker file: the file appears only if the step
    ran to the end (was not cancelled)."""
    seconds, marker = arg
    time.sleep(seconds)
    Path(marker).write_text("ran")
    return marker


def identity(x: Any) -> Any:
    return x


def fails_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd: {x}")
    return x


@pytest.fixture
def marker_dir() -> Any:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@pytest.mark.parametrize("mode", ["tasks", "actors"])
def test_deadline_names_the_step_and_cancels_the_rest(ray_session: Any, mode: str, marker_dir: Path) -> None:
    slow = pipeline.step(slow_then_mark, execution_mode=mode)
    after = pipeline.step(identity, execution_mode="tasks", name="after")
    node = after(slow(pipeline.INPUT))
    marker = str(marker_dir / "m")
    with pipeline.compile(node, optimize=False).deploy(abandon_grace_s=0.5) as p:
        start = time.monotonic()
        with pytest.raises(pipeline.PipelineTimeoutError) as info:
            p.call((3.0, marker), timeout=0.5)
        assert time.monotonic() - start < 2.5
        assert isinstance(info.value, TimeoutError)
        assert info.value.step_name == "slow_then_mark"
        assert "slow_then_mark" in str(info.value) and "cancelled" in str(info.value)
        # The pipeline stays usable, and the next call is not stuck behind
        # the abandoned one.
        good = str(marker_dir / "good")
        assert p.call((0.0, good), timeout=30) == good
        assert p.stats()["slow_then_mark"]["errors"] == 1
        time.sleep(3.5)
        if mode == "tasks":
            assert not Path(marker).exists(), "the abandoned task ran to the end"


def test_abandoned_async_call_is_cancelled(ray_session: Any, marker_dir: Path) -> None:
    slow = pipeline.step(slow_then_mark, execution_mode="tasks")
    marker = str(marker_dir / "m")
    with slow(pipeline.INPUT).deploy() as p:

        async def main() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(p.call_async((3.0, marker)), 0.5)

        asyncio.run(main())
        time.sleep(3.5)
        assert not Path(marker).exists(), "a call abandoned by asyncio kept its task running"


def test_shutdown_ends_running_work(ray_session: Any, marker_dir: Path) -> None:
    slow = pipeline.step(slow_then_mark, execution_mode="tasks")
    marker = str(marker_dir / "m")
    p = slow(pipeline.INPUT).deploy()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            p.call((3.0, marker))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    p.shutdown()
    t.join(timeout=30)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], pipeline.PipelineError)
    time.sleep(3.0)
    assert not Path(marker).exists()
    with pytest.raises(pipeline.PipelineError, match="shut down"):
        p.call((0.0, marker))


def test_overload_rejects_past_the_bound_and_waits_when_told(ray_session: Any, marker_dir: Path) -> None:
    slow = pipeline.step(slow_then_mark, execution_mode="tasks")
    node = slow(pipeline.INPUT)
    with node.deploy(max_in_flight=1) as p:
        t = threading.Thread(target=p.call, args=((1.5, str(marker_dir / "a")),))
        t.start()
        time.sleep(0.5)
        with pytest.raises(pipeline.PipelineOverloadedError, match="max_in_flight=1"):
            p.call((0.0, str(marker_dir / "b")))

        async def rejected() -> None:
            with pytest.raises(pipeline.PipelineOverloadedError):
                await p.call_async((0.0, str(marker_dir / "c")))

        asyncio.run(rejected())
        t.join()
        assert not (marker_dir / "b").exists() and not (marker_dir / "c").exists()
    with node.deploy(max_in_flight=1, overload_timeout_s=30) as p:
        t = threading.Thread(target=p.call, args=((1.0, str(marker_dir / "d")),))
        t.start()
        time.sleep(0.3)
        assert p.call((0.0, str(marker_dir / "e"))) == str(marker_dir / "e")  # waited for the slot
        t.join()


def test_bad_serving_options_fail_before_anything_starts() -> None:
    node = pipeline.step(identity)(pipeline.INPUT)
    with pytest.raises(ValueError, match="max_in_flight"):
        node.deploy(max_in_flight=0)
    with pytest.raises(ValueError, match="overload_timeout_s"):
        node.deploy(overload_timeout_s=-1)
    with node.deploy() as p:
        with pytest.raises(ValueError, match="timeout"):
            p.call(1, timeout=0)
        with pytest.raises(ValueError, match="timeout"):
            list(p.map([1], timeout=-2))


@pytest.mark.parametrize("mode", ["local", "tasks"])
def test_map_accounts_for_every_item_in_order(request: pytest.FixtureRequest, mode: str) -> None:
    if mode != "local":
        request.getfixturevalue("ray_session")
    node = pipeline.step(fails_on_odd, execution_mode=mode)(pipeline.INPUT)
    with node.deploy() as p:
        got = list(p.map(range(10), max_in_flight=4, return_exceptions=True))
        assert [g for g in got[::2]] == [0, 2, 4, 6, 8]
        for e in got[1::2]:
            assert isinstance(e, pipeline.StepError) and isinstance(e.__cause__, ValueError)
        with pytest.raises(pipeline.StepError):
            list(p.map(range(10), max_in_flight=4))
        assert p.stats()["fails_on_odd"]["errors"] >= 5


def test_map_never_exceeds_the_pipeline_bound(ray_session: Any) -> None:
    node = pipeline.step(identity, execution_mode="tasks")(pipeline.INPUT)
    with node.deploy(max_in_flight=3) as p:
        seen: list[int] = []
        admission = p._admission
        original = admission.enter_async

        async def spy(wait: bool = False) -> None:
            await original(wait)
            seen.append(admission.in_flight)

        admission.enter_async = spy  # type: ignore[method-assign]
        assert list(p.map(range(40), max_in_flight=16)) == list(range(40))
        assert max(seen) <= 3


def test_flood_keeps_driver_memory_bounded(ray_session: Any) -> None:
    node = pipeline.step(identity, execution_mode="actors", num_replicas=2)(pipeline.INPUT)
    with node.deploy(max_in_flight=64, overload_timeout_s=60) as p:

        async def flood(n: int) -> list[object]:
            return list(await asyncio.gather(*(p.call_async(i) for i in range(n))))

        assert asyncio.run(flood(200)) == list(range(200))  # warm up
        tracemalloc.start()
        try:
            results = asyncio.run(flood(10_000))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert results == list(range(10_000))
        # 10,000 waiting coroutines cost a few KB each; without the bound,
        # 10,000 Ray calls in flight took ~380 MB.
        assert peak < 150 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"
        deadline = time.monotonic() + 10
        while p.stats()["identity"]["calls"] < 10_200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.stats()["identity"]["calls"] == 10_200


def test_stats_and_annotated_dump_on_local_and_ray(ray_session: Any) -> None:
    inc = pipeline.step(lambda x: x + 1, name="inc")
    remote = pipeline.step(fails_on_odd, execution_mode="tasks")
    with remote(inc(pipeline.INPUT)).deploy() as p:
        for i in range(20):
            try:
                p.call(i)
            except pipeline.StepError:
                pass
        # Remote figures arrive on Ray's callback thread, a moment after
        # the call returned: wait (bounded) for the last ones.
        deadline = time.monotonic() + 10
        while p.stats()["fails_on_odd"]["calls"] < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = p.stats()
        assert stats["inc"]["calls"] == 20 and stats["inc"]["errors"] == 0
        assert stats["fails_on_odd"]["calls"] == 20 and stats["fails_on_odd"]["errors"] == 10
        assert stats["fails_on_odd"]["in_flight"] == 0
        assert stats["fails_on_odd"]["p50_s"] is not None and stats["inc"]["p99_s"] is not None
        text = p.dump()
        assert "calls=20 errors=10" in text and "calls=20 errors=0" in text


def test_admission_is_shared_by_threads_and_loops() -> None:
    adm = Admission(2, timeout=5.0)
    adm.enter()
    adm.enter()
    got: list[str] = []

    def waiter() -> None:
        adm.enter()
        got.append("thread")

    async def task() -> None:
        await adm.enter_async()
        got.append("task")

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    loop_thread = threading.Thread(target=lambda: asyncio.run(task()))
    loop_thread.start()
    time.sleep(0.1)
    adm.exit()
    t.join(5)
    adm.exit()
    loop_thread.join(5)
    assert got == ["thread", "task"]  # first come, first served
    assert adm.in_flight == 2
    quick = Admission(1, timeout=0.0)
    quick.enter()
    with pytest.raises(pipeline.PipelineOverloadedError):
        quick.enter()
    quick.exit()
    quick.enter()
    assert os.getpid()  # the bound recovered after a rejection
