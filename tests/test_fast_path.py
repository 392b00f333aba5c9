"""The same-node fast path as users get it: actor calls of a deployed
pipeline go over it by default (deploy(fast_path=False) turns it off),
with the serving contract intact: replicas and routing, call_async and
map, deadlines, a killed replica, inputs that are Ray refs, a process
that is not the pipeline's caller, and no file left behind.

The failure tests of test_serving_actors.py (a replica SIGKILLed or
SIGSTOPped under load, hot swap) and the property tests run with the fast
path on too, as it is the default. Figures are in bench_fastpath.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipeline_ir as pipeline

pytestmark = pytest.mark.timeout(180)

FAST_THREAD = "pipeline_ir-fast-conn"  # fast_server.FastServer's connection threads


def thread_and_pid(x: object) -> tuple[str, int, object]:
    return threading.current_thread().name, os.getpid(), x


def pid_of(x: object) -> int:
    return os.getpid()


def slow(x: float) -> float:
    time.sleep(x)
    return x


def sleep_then_mark(arg: tuple[float, str]) -> str:
    seconds, marker = arg
    Path(marker + ".started").touch()
    time.sleep(seconds)
    Path(marker).touch()
    return marker


def identity(x: object) -> object:
    return x


def unpicklable(x: object) -> object:
    return threading.Lock()


def actor(fn: Any, **kw: Any) -> Any:
    return pipeline.step(fn, execution_mode="actors", **kw)


def pool_of(p: pipeline.Pipeline, key: str) -> Any:
    return p._program.launchers["actors"].pools[key]  # type: ignore[attr-defined]


def wait_for(path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_actor_calls_take_the_fast_path_by_default(ray_session: Any) -> None:
    node = actor(thread_and_pid)(pipeline.INPUT)
    with node.deploy() as p:
        thread, pid, x = p.call(5)  # type: ignore[misc]
        assert (thread, x) == (FAST_THREAD, 5)
        assert pid != os.getpid()
    with node.deploy(fast_path=False) as p:
        thread, _, x = p.call(5)  # type: ignore[misc]
        assert thread != FAST_THREAD and x == 5


def test_fast_path_with_replicas_async_and_map(ray_session: Any) -> None:
    node = actor(slow, num_replicas=3)(pipeline.INPUT)
    node = actor(thread_and_pid, num_replicas=3)(node)
    with node.deploy() as p:
        pids = {p.call(0.0)[1] for _ in range(6)}  # type: ignore[index]
        assert len(pids) == 3  # least-loaded routing, ties round-robin

        async def many() -> list[object]:
            return list(await asyncio.gather(*(p.call_async(0.01 * (i % 3)) for i in range(60))))

        results = asyncio.run(many())
        assert [r[2] for r in results] == [0.01 * (i % 3) for i in range(60)]  # type: ignore[index]
        assert {r[0] for r in results} == {FAST_THREAD}  # type: ignore[index]
        mapped = list(p.map([0.0] * 30, max_in_flight=6))
        assert all(r[0] == FAST_THREAD and r[2] == 0.0 for r in mapped)  # type: ignore[index]
        stats = p.stats()
        assert sum(int(s["calls"] or 0) for s in stats.values()) >= 96
        assert all(s["in_flight"] == 0 for s in stats.values())


def test_a_killed_idle_replica_is_replaced_before_the_next_call(ray_session: Any) -> None:
    # Its connection is found broken as the call is sent (the call never
    # reached it): the call goes to a new replica, no error.
    with actor(pid_of)(pipeline.INPUT).deploy() as p:
        first = p.call(None)
        os.kill(first, signal.SIGKILL)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{first}") and time.monotonic() < deadline:
            time.sleep(0.01)
        second = p.call(None, timeout=60)
        assert second not in (first, None)


def test_a_replica_killed_mid_call_is_named_and_replaced(ray_session: Any, tmp_path: Path) -> None:
    node = actor(sleep_then_mark)(pipeline.INPUT)
    with node.deploy() as p:
        victim = pool_of(p, "sleep_then_mark").slots[0].pid
        marker = str(tmp_path / "m")
        threading.Timer(0.0, lambda: (wait_for(marker + ".started"), os.kill(victim, signal.SIGKILL))).start()
        with pytest.raises(pipeline.StepError) as info:
            p.call((30.0, marker), timeout=60)
        err = info.value
        assert err.step_name == "sleep_then_mark"
        assert "replica 0" in str(err) and "died while running this call" in str(err)
        assert p.call((0.0, str(tmp_path / "n")), timeout=60) == str(tmp_path / "n")


def test_idempotent_call_is_resent_when_its_replica_dies(ray_session: Any, tmp_path: Path) -> None:
    node = actor(sleep_then_mark, num_replicas=2, idempotent=True)(pipeline.INPUT)
    with node.deploy() as p:
        marker = str(tmp_path / "m")

        def kill_the_one_running() -> None:
            wait_for(marker + ".started")
            for slot in pool_of(p, "sleep_then_mark").slots:
                if slot.in_flight:
                    os.kill(slot.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_the_one_running)
        killer.start()
        assert p.call((1.0, marker), timeout=60) == marker  # ran again on the other replica
        killer.join()
        assert os.path.exists(marker)


def test_deadline_on_the_fast_path(ray_session: Any, tmp_path: Path) -> None:
    node = actor(sleep_then_mark)(pipeline.INPUT)
    with node.deploy(abandon_grace_s=0.5, health_check_period_s=0.2) as p:
        marker = str(tmp_path / "late")
        start = time.monotonic()
        with pytest.raises(pipeline.PipelineTimeoutError) as info:
            p.call((20.0, marker), timeout=0.5)
        assert time.monotonic() - start < 10
        assert info.value.step_name == "sleep_then_mark"
        # The replica is busy with the abandoned call: a fresh one serves.
        assert p.call((0.0, str(tmp_path / "next")), timeout=60) == str(tmp_path / "next")

        async def late() -> object:
            return await p.call_async((20.0, str(tmp_path / "late2")), timeout=0.5)

        with pytest.raises(pipeline.PipelineTimeoutError):
            asyncio.run(late())
        assert p.call((0.0, str(tmp_path / "after")), timeout=60) == str(tmp_path / "after")
    assert not os.path.exists(marker)  # shutdown ended the abandoned work


def test_ray_refs_as_inputs_go_through_ray(ray_session: Any) -> None:
    # A task's ObjectRef is handed to the replica by Ray, not fetched here.
    task = pipeline.step(identity, execution_mode="tasks")
    node = actor(thread_and_pid)(task(pipeline.INPUT))
    with node.deploy() as p:
        thread, _, x = p.call(3)  # type: ignore[misc]
        assert x == 3 and thread != FAST_THREAD
    # ...and a fast-path result feeding a task is read here and sent on.
    node = task(actor(identity)(pipeline.INPUT))
    with node.deploy() as p:
        assert p.call({"a": [1, 2]}) == {"a": [1, 2]}

        async def one() -> object:
            return await p.call_async(7)

        assert asyncio.run(one()) == 7


def test_a_result_that_cannot_be_pickled_names_the_step(ray_session: Any) -> None:
    with actor(unpicklable)(pipeline.INPUT).deploy() as p:
        with pytest.raises(pipeline.StepError) as info:
            p.call(1)
        assert info.value.step_name == "unpicklable" and "pickle" in str(info.value)
        with pytest.raises(pipeline.StepError):
            p.call(2)  # the replica lives on


def test_only_the_pipelines_caller_is_served(ray_session: Any) -> None:
    with actor(identity)(pipeline.INPUT).deploy() as p:
        assert p.call(1) == 1
        address = pool_of(p, "identity").slots[0].fast.address
        probe = (
            "import sys\n"
            "from pipeline_ir.backends.fast_client import FastClient\n"
            "from pipeline_ir.backends.fast_transport import Address, Unreachable\n"
            f"client = FastClient(Address({address.path!r}, {address.pid}, {address.node!r}))\n"
            "try:\n"
            "    client.call((0, 1))\n"
            "except Unreachable as e:\n"
            "    print('refused:', e)\n"
            "    sys.exit(0)\n"
            "sys.exit(1)\n"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "refused" in run.stdout and "serves only the pipeline's caller" in run.stdout
        assert p.call(2) == 2


def test_no_socket_is_left_behind(ray_session: Any) -> None:
    pattern = os.path.join(tempfile.gettempdir(), "pipeline_ir-*")
    before = set(glob.glob(pattern))
    with actor(identity, num_replicas=2)(pipeline.INPUT).deploy() as p:
        assert p.call(1) == 1
        assert len(set(glob.glob(pattern)) - before) == 2
        os.kill(pool_of(p, "identity").slots[0].pid, signal.SIGKILL)  # its own files stay: the pool removes them
        time.sleep(0.2)
        for i in range(4):
            assert p.call(i, timeout=60) == i
        # A replica whose calls moved to Ray calls (as after an unreachable
        # socket) still has its files removed when it ends.
        moved = pool_of(p, "identity").slots[1]
        moved.fast, client = None, moved.fast
        client.close()
        assert p.call(9, timeout=60) == 9
    assert set(glob.glob(pattern)) - before == set()


def test_a_retry_can_change_paths(ray_session: Any) -> None:
    # One replica reached through Ray (as one on another node is), one over
    # the fast path: calls of the Ray one lost with it are resent, and land
    # on the fast one; from threads and from asyncio.
    node = actor(slow, num_replicas=2, idempotent=True)(pipeline.INPUT)
    with node.deploy() as p:
        pool = pool_of(p, "slow")
        assert p.call(0.0) == 0.0
        through_ray = pool.slots[1]
        through_ray.fast, client = None, through_ray.fast
        client.close()
        killer = threading.Timer(0.3, os.kill, (through_ray.pid, signal.SIGKILL))
        killer.start()
        results = list(p.map([0.01] * 200, max_in_flight=8, return_exceptions=True))
        killer.join()
        assert results == [0.01] * 200
        deadline = time.monotonic() + 60
        while not all(s.fast is not None and not s.dead for s in pool.slots):  # the replacement is up
            assert time.monotonic() < deadline
            time.sleep(0.05)
        through_ray = pool.slots[0]
        through_ray.fast, client = None, through_ray.fast
        client.close()
        killer = threading.Timer(0.3, os.kill, (through_ray.pid, signal.SIGKILL))
        killer.start()
        with concurrent.futures.ThreadPoolExecutor(8) as threads:
            assert list(threads.map(lambda _: p.call(0.01, timeout=60), range(200))) == [0.01] * 200
        killer.join()


def test_large_values_free_their_shared_memory_after_each_call(ray_session: Any) -> None:
    # A value read over the fast path lives in a shared-memory segment of
    # the replica that sent it; once the call is over and the caller has
    # dropped the result, the replica fills the same segment again. Were
    # the call to keep what it read alive (a reference cycle, say), every
    # call would make each replica map a new segment, and the caller learn
    # it: with the garbage collector off, the count here would grow.
    import gc

    first = pipeline.step(identity, execution_mode="actors", name="first")
    second = pipeline.step(identity, execution_mode="actors", name="second")
    x = np.ones(2 << 20, dtype=np.uint8)  # over the 256 KiB inline threshold
    with pipeline.compile(second(first(pipeline.INPUT)), optimize=False).deploy() as p:
        gc.disable()
        try:
            for _ in range(6):
                y = p.call(x)
                assert y.shape == x.shape and int(y[-1]) == 1
                del y
        finally:
            gc.enable()
        learned = 0
        for key in ("first", "second"):
            client = pool_of(p, key).slots[0].fast
            learned += sum(len(link.inbox._mappings) for link in client._idle)
        assert 1 <= learned <= 4, learned  # one or two segments per replica, not one per call
