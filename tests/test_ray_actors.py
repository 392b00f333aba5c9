"""The ACTORS backend: replica pools, routing, lifecycle, errors, async."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pipeline_ir as pipeline
from process_helpers import alive, wait_gone

pytestmark = pytest.mark.usefixtures("ray_session")


# -- the seed page's examples, on ACTORS --


@pipeline.step(execution_mode="actors", num_replicas=2)
def echo(inp):  # type: ignore[no-untyped-def]
    return inp


@pipeline.step(execution_mode="actors")
def add_one(inp):  # type: ignore[no-untyped-def]
    return inp + 1


@pipeline.step(execution_mode="actors")
def double(inp):  # type: ignore[no-untyped-def]
    return inp**2


@pipeline.step(execution_mode="actors", num_replicas=2)
class Adder:
    def __init__(self, value):  # type: ignore[no-untyped-def]
        self.value = value

    def __call__(self, inp):  # type: ignore[no-untyped-def]
        return self.value + inp


def test_seed_examples_on_actors() -> None:
    my_pipeline = echo(pipeline.INPUT).deploy()
    assert my_pipeline.call(42) == 42
    my_pipeline.shutdown()
    with double(add_one(pipeline.INPUT)).deploy() as p:
        assert p.call(1) == 4
    with Adder(2)(pipeline.INPUT).deploy() as p:
        assert p.call(2) == 4
        assert p.call(3) == 5


# -- one pool of three replicas: spreading, routing, shutdown --


@pipeline.step(execution_mode="actors", num_replicas=3)
class Worker:
    """Reports its pid; sleeps when asked, to hold its replica busy."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.calls = 0

    def __call__(self, x: Any) -> tuple[str, int, int]:
        self.calls += 1
        if isinstance(x, float):
            time.sleep(x)
        return self.tag, os.getpid(), self.calls


def test_replicas_spread_route_least_loaded_and_end_with_shutdown() -> None:
    p = Worker("w")(pipeline.INPUT).deploy()
    with p:
        # Sequential calls: every replica is idle each time, and the
        # round-robin tie-break still spreads them over all three.
        pids = [p.call(i)[1] for i in range(6)]  # type: ignore[index]
        assert len(set(pids)) == 3 and os.getpid() not in pids
        # Least-loaded: while one replica is busy with a slow call, quick
        # calls all go to the two idle ones (random routing would queue a
        # third of them behind the slow call).
        slow = p._program.run  # the sync entry point, run in a thread
        busy: list[Any] = []
        t = threading.Thread(target=lambda: busy.append(slow(1.5)))
        t.start()
        time.sleep(0.3)
        quick = [p.call(i)[1] for i in range(8)]  # type: ignore[index]
        t.join()
        busy_pid = busy[0][1]
        assert busy_pid not in quick and len(set(quick)) == 2
    # shutdown() (the `with` exit) ends every replica process.
    assert not [pid for pid in set(pids) if alive(pid)]
    with pytest.raises(pipeline.PipelineError, match="shut down"):
        p.call(1)


def test_garbage_collection_of_a_pipeline_ends_its_actors() -> None:
    p = Worker("gc")(pipeline.INPUT).deploy()
    pids = {p.call(i)[1] for i in range(6)}  # type: ignore[index]
    assert len(pids) == 3
    del p
    gc.collect()
    assert wait_gone(pids) == []


# -- errors --


@pipeline.step(execution_mode="actors")
def check_positive(x: int) -> int:
    if x <= 0:
        raise ValueError(f"not positive: {x}")
    return x


@pipeline.step(execution_mode="actors")
class Broken:
    def __init__(self, why: str) -> None:
        raise RuntimeError(why)

    def __call__(self, x: object) -> object:
        return x


def test_step_error_matches_local_and_pipeline_keeps_working() -> None:
    node = check_positive(add_one(pipeline.INPUT))
    with pipeline.compile(node, backend="local").deploy() as local:
        with pytest.raises(pipeline.StepError) as expected:
            local.call(-3)
    with pipeline.compile(node, optimize=False).deploy() as p:
        with pytest.raises(pipeline.StepError) as got:
            p.call(-3)
        assert p.call(1) == 2
    err = got.value
    assert str(err) == str(expected.value) == "step 'check_positive' (node %2) raised ValueError: not positive: -2"
    assert (err.step_name, err.node_id) == (expected.value.step_name, 2)
    assert type(err.__cause__) is ValueError


def test_constructor_error_fails_deploy_and_leaves_no_actor() -> None:
    before = _live_replicas()
    with pytest.raises(pipeline.StepError, match=r"step 'Broken' \(node %\d+\) failed in its constructor: RuntimeError: no weights") as info:
        Broken("no weights")(echo(pipeline.INPUT)).deploy()
    assert type(info.value.__cause__) is RuntimeError
    # echo's two replicas were started too; close() has waited for their exit.
    left = _live_replicas() - before
    assert not [pid for _, pid in left if alive(pid)]


def _live_replicas() -> set[tuple[str, int]]:
    """(actor id, pid) of this job's replicas Ray still lists as alive."""
    import ray
    from ray._private.state import actors

    job = ray.get_runtime_context().get_job_id()
    table = actors(actor_state_name="ALIVE").values()
    return {(a["ActorID"], a["Pid"]) for a in table if a["JobID"] == job and a["ActorClassName"] == "Replica"}


@pipeline.step(execution_mode="actors")
def whoami(x: object) -> int:
    return os.getpid()


def test_a_killed_replica_is_a_step_error_then_replaced() -> None:
    """Through Ray actor calls; tests/test_fast_path.py has the fast path's
    (which finds a dead idle replica before sending, and sends elsewhere)."""
    import ray

    with pipeline.compile(add_one(whoami(pipeline.INPUT)), optimize=False).deploy(fast_path=False) as p:
        first = p.call(None)
        pool = p._program.closers[0].__self__.pools["whoami"]  # type: ignore[attr-defined]
        pid = pool.slots[0].pid
        ray.kill(pool.slots[0].handle)
        # ray.kill only asks: wait until the process is gone, or the next
        # call may still reach the old replica.
        wait_gone([pid])
        start = time.monotonic()
        with pytest.raises(pipeline.StepError) as info:
            p.call(None)  # add_one reads the dead replica's value: still named whoami
        assert time.monotonic() - start < 10
        err = info.value
        assert (err.step_name, err.node_id) == ("whoami", 1)
        assert "replica 0" in str(err) and "died" in str(err) and "RayTaskError" not in repr(err.__cause__)
        assert p.call(None) not in (first, None)  # a new replica, another process


# -- fused groups: one process per replica hosts the whole body --


@pipeline.step(execution_mode="actors")
class Counter:
    def __init__(self, start: int) -> None:
        self.n = start

    def __call__(self, x: int) -> tuple[int, int]:
        self.n += 1
        return self.n + x, os.getpid()


@pipeline.step(execution_mode="actors")
def unpack(pair: tuple[int, int]) -> int:
    return pair[0]


def test_fused_actor_group_runs_in_one_process_per_replica() -> None:
    from pipeline_ir.ir import Placement
    from pipeline_ir.passes.grouping import fuse_pass

    a, b = Counter(0), Counter(100)
    node = b(unpack(a(pipeline.INPUT)))
    compiled = pipeline.compile(node, optimize=False)
    fused = fuse_pass(
        compiled.graph,
        lambda s: "actors" if s.placement.mode == "actors" else None,
        lambda steps: Placement(mode="actors", num_replicas=2),
        "test",
    )
    compiled = pipeline.CompiledPipeline(fused.graph, compiled.source_graph, compiled.bindings, compiled.records)
    assert [type(n).__name__ for n in compiled.graph.nodes] == ["Input", "Fused"]
    with compiled.deploy() as p:
        results = [p.call(0) for _ in range(4)]
    # Each replica keeps its own instance of each class step.
    assert sorted(r[0] for r in results) == [102, 102, 104, 104]  # type: ignore[index]
    assert len({r[1] for r in results}) == 2  # type: ignore[index]


# -- switch, async, map --


def _touch(directory: str, name: str) -> None:
    with open(os.path.join(directory, name), "a") as f:
        f.write("x")


@pipeline.step(execution_mode="actors")
def mode_of(x: dict[str, Any]) -> str:
    return str(x["mode"])


@pipeline.step(execution_mode="actors")
def fast(x: dict[str, Any]) -> str:
    _touch(x["dir"], "fast")
    return "fast"


@pipeline.step(execution_mode="tasks")
def accurate(x: dict[str, Any]) -> str:
    _touch(x["dir"], "accurate")
    return "accurate"


def test_switch_runs_only_the_chosen_branch(tmp_path: Path) -> None:
    node = pipeline.switch(mode_of(pipeline.INPUT), {"fast": fast(pipeline.INPUT), "accurate": accurate(pipeline.INPUT)})
    with pipeline.compile(node, optimize=False).deploy() as p:
        assert p.call({"mode": "fast", "dir": str(tmp_path)}) == "fast"
        assert sorted(os.listdir(tmp_path)) == ["fast"]
        assert p.call({"mode": "accurate", "dir": str(tmp_path)}) == "accurate"
        assert (tmp_path / "fast").read_text() == "x"  # not run a second time
        with pytest.raises(pipeline.StepError, match="no branch for key 'other'") as info:
            p.call({"mode": "other", "dir": str(tmp_path)})
        assert type(info.value.__cause__) is KeyError


@pipeline.step(execution_mode="actors", num_replicas=2)
def slow_square(x: int) -> int:
    time.sleep(0.02 * (x % 3))
    return x * x


def test_call_async_map_and_no_thread_per_call() -> None:
    with slow_square(pipeline.INPUT).deploy() as p:
        threads = threading.active_count()

        async def many() -> list[object]:
            return await asyncio.gather(*(p.call_async(i) for i in range(20)))

        assert asyncio.run(many()) == [i * i for i in range(20)]
        assert threading.active_count() <= threads + 1  # asyncio's default executor at most
        assert list(p.map(range(12), max_in_flight=4)) == [i * i for i in range(12)]
        assert list(p.map([5, 6], max_in_flight=1)) == [25, 36]

        async def failing() -> None:
            await p.call_async("x")

        with pytest.raises(pipeline.StepError, match=r"step 'slow_square' \(node %1\) raised TypeError"):
            asyncio.run(failing())


def test_in_flight_counts_drop_and_replicas_register_without_private_ray_api() -> None:
    """Routing counts drop through `ref.future()` callbacks (no thread per
    call), and each replica is registered under the actor id it reported."""
    from pipeline_ir.backends import ray_runtime

    with Worker("r")(pipeline.INPUT).deploy() as p:
        pool = p._program.closers[0].__self__.pools["Worker"]  # type: ignore[attr-defined]
        threads = threading.active_count()
        for i in range(30):
            p.call(i)
        assert threading.active_count() <= threads
        deadline = time.monotonic() + 10
        while any(s.in_flight for s in pool.slots) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [s.in_flight for s in pool.slots] == [0, 0, 0]
        ids = [s.actor_id for s in pool.slots]
        assert all(ids) and len(set(ids)) == 3
        assert [ray_runtime._replicas[i].index for i in ids] == [0, 1, 2]  # type: ignore[index]
    assert not set(ids) & set(ray_runtime._replicas)
