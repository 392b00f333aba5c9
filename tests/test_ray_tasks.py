"""The TASKS backend: seed examples, resources, errors, where steps live."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import pipeline_ir as pipeline

pytestmark = pytest.mark.usefixtures("ray_session")


# -- the seed page's examples, on TASKS (only the decorator differs) --


@pipeline.step(execution_mode="tasks")
def echo(inp):  # type: ignore[no-untyped-def]
    return inp


@pipeline.step(execution_mode="tasks")
def add_one(inp):  # type: ignore[no-untyped-def]
    return inp + 1


@pipeline.step(execution_mode="tasks")
def double(inp):  # type: ignore[no-untyped-def]
    return inp**2


@pipeline.step(execution_mode="tasks")
class Adder:
    def __init__(self, value):  # type: ignore[no-untyped-def]
        self.value = value

    def __call__(self, inp):  # type: ignore[no-untyped-def]
        return self.value + inp


def test_seed_examples_on_tasks() -> None:
    my_pipeline = echo(pipeline.INPUT).deploy()
    assert my_pipeline.call(42) == 42
    my_pipeline.shutdown()
    # Unoptimized, the chain is two tasks with the ref passed between them.
    with pipeline.compile(double(add_one(pipeline.INPUT)), optimize=False).deploy() as p:
        assert p.call(1) == 4
        assert "_get" not in p.code.split("fetched")[0], p.code  # nothing fetched in between
    with Adder(2)(pipeline.INPUT).deploy() as p:
        assert p.call(2) == 4


@pipeline.step(execution_mode="tasks")
class Where:
    def __init__(self) -> None:
        self.built_in = os.getpid()

    def __call__(self, x: object) -> tuple[int, int]:
        return self.built_in, os.getpid()


def test_class_step_is_built_at_deploy_in_the_caller_and_runs_in_a_worker() -> None:
    with Where()(pipeline.INPUT).deploy() as p:
        built_in, ran_in = p.call(None)  # type: ignore[misc]
    assert built_in == os.getpid() != ran_in


# -- resources --


@pipeline.step(execution_mode="tasks", num_gpus=1)
def gpu_ids(x: object) -> list[int]:
    import ray

    return [int(i) for i in ray.get_gpu_ids()]


@pipeline.step(execution_mode="tasks", num_cpus=2)
def assigned(x: object) -> dict[str, float]:
    import ray

    return dict(ray.get_runtime_context().get_assigned_resources())


def test_resources_are_respected() -> None:
    with pipeline.compile((gpu_ids(pipeline.INPUT), assigned(pipeline.INPUT)), optimize=False).deploy() as p:
        gpus, resources = p.call(None)  # type: ignore[misc]
    assert gpus == [0]
    assert resources.get("CPU") == 2.0 and "GPU" not in resources


@pipeline.step(execution_mode="tasks", num_cpus=64)
def greedy(x: object) -> object:
    return x


def test_resources_no_node_has_fail_deploy_naming_the_step() -> None:
    with pytest.raises(pipeline.PlacementError, match=r"step 'greedy' \(%1\): one task needs CPU=64, GPU=0, but no node .*1 node, CPU=8, GPU=1 in all"):
        greedy(pipeline.INPUT).deploy()


# -- errors --


@pipeline.step(execution_mode="tasks")
def fail_on_negative(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


class NotPicklable(Exception):
    def __init__(self, lock: Any) -> None:
        super().__init__("holds a lock")
        self.lock = lock

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("cannot pickle a lock")


@pipeline.step(execution_mode="tasks")
def raise_unpicklable(x: int) -> int:
    import threading

    raise NotPicklable(threading.Lock())


def _error_of(p: pipeline.Pipeline, x: object) -> pipeline.StepError:
    with pytest.raises(pipeline.StepError) as info:
        p.call(x)
    return info.value


def test_step_error_matches_local_and_pipeline_keeps_working() -> None:
    node = fail_on_negative(add_one(pipeline.INPUT))
    with pipeline.compile(node, backend="local").deploy() as local:
        expected = _error_of(local, -5)
    with pipeline.compile(node, optimize=False).deploy() as p:
        err = _error_of(p, -5)
        assert p.call(3) == 4  # usable after the failure
    assert str(err) == str(expected) == "step 'fail_on_negative' (node %2) raised ValueError: negative: -4"
    assert (err.step_name, err.node_id) == (expected.step_name, expected.node_id)
    assert type(err.__cause__) is ValueError and str(err.__cause__) == "negative: -4"
    assert "RayTaskError" not in repr(err) and err.__context__ is None
    assert err.remote_traceback is not None and "fail_on_negative" in err.remote_traceback


def test_error_inside_a_fused_task_group_names_the_inner_step() -> None:
    node = add_one(fail_on_negative(add_one(pipeline.INPUT)))
    compiled = pipeline.compile(node)
    assert any(type(n).__name__ == "Fused" for n in compiled.graph.nodes), compiled.graph.dump()
    with compiled.deploy() as p:
        err = _error_of(p, -5)
        assert p.call(1) == 3
    assert (err.step_name, err.node_id) == ("fail_on_negative", 2)
    assert str(err) == "step 'fail_on_negative' (node %2) raised ValueError: negative: -4"


def test_unpicklable_exception_is_reported_honestly() -> None:
    with raise_unpicklable(pipeline.INPUT).deploy() as p:
        err = _error_of(p, 1)
    assert str(err) == "step 'raise_unpicklable' (node %1) raised NotPicklable: holds a lock"
    cause = err.__cause__
    assert type(cause).__name__ == "RemoteException"
    assert "test_ray_tasks.NotPicklable: holds a lock" in str(cause) and "could not be sent back" in str(cause)


@pipeline.step(execution_mode="tasks")
def exit_worker(x: int) -> int:
    if x:
        os._exit(3)  # the worker process dies under the task
    return x


def test_a_crashed_task_worker_is_a_step_error_not_a_hang() -> None:
    with exit_worker(pipeline.INPUT).deploy() as p:
        err = _error_of(p, 1)
        assert p.call(0) == 0
    assert (err.step_name, err.node_id) == ("exit_worker", 1)
    assert str(err).startswith("step 'exit_worker' (node %1) failed in Ray: WorkerCrashedError")


# -- where steps are defined --


def test_steps_defined_in_a_closure_run_on_tasks() -> None:
    offset = 100

    @pipeline.step(execution_mode="tasks")
    def shifted(x: int) -> int:
        return x + offset

    @pipeline.step(execution_mode="tasks")
    class Scale:
        def __init__(self, k: int) -> None:
            self.k = k

        def __call__(self, x: int) -> int:
            return x * self.k

    with pipeline.compile(Scale(3)(shifted(pipeline.INPUT)), optimize=False).deploy() as p:
        assert p.call(1) == 303


_SCRIPT = """
    import os
    import pipeline_ir as pipeline

    def echo(inp):
        return inp

    def add_one(inp):
        return inp + 1

    def double(inp):
        return inp**2

    class Adder:
        def __init__(self, value):
            self.value = value

        def __call__(self, inp):
            return self.value + inp

    for backend in ("tasks", "actors"):
        # The seed's examples, steps defined in this script's __main__.
        on = pipeline.step(execution_mode=backend)
        with pipeline.step(execution_mode=backend, num_replicas=2 if backend == "actors" else 1)(echo)(pipeline.INPUT).deploy() as p:
            assert p.call(42) == 42
        with on(double)(on(add_one)(pipeline.INPUT)).deploy() as p:
            assert p.call(1) == 4
        with on(Adder)(2)(pipeline.INPUT).deploy() as p:
            assert p.call(2) == 4
        # Mixed: LOCAL, TASKS and ACTORS in one graph (the contract's example).
        local_add = pipeline.step(add_one)
        tasks_double = pipeline.step(execution_mode="tasks")(lambda x: x * 2)
        actors_adder = pipeline.step(execution_mode="actors", num_replicas=2)(Adder)
        with actors_adder(10)(tasks_double(local_add(pipeline.INPUT))).deploy() as p:
            assert p.call(1) == 14
        print(backend, "ok", os.environ.get("RAY_ADDRESS"))
"""


def test_seed_examples_as_a_script_with_steps_in_main(tmp_path: Path, ray_session: Any) -> None:
    script = tmp_path / "seed_on_ray.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    # The script joins this session's Ray (as `ray.init()` does for a
    # cluster already running on the machine) instead of starting its own.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tasks ok" in done.stdout and "actors ok" in done.stdout


class Weights:
    """A TASKS class step holding `n` bytes of state."""

    def __init__(self, n: int) -> None:
        self.w = bytes(range(256)) * (n // 256)

    def __call__(self, i: int) -> int:
        return self.w[i % len(self.w)] + len(self.w)


def test_small_units_ride_in_the_function_large_ones_in_the_object_store(ray_session: Any) -> None:
    # A unit up to INLINE_UNIT_BYTES is exported with its remote function
    # (no ref per call); a larger one (a model) is put once and passed by ref.
    from pipeline_ir.backends.ray_tasks import INLINE_UNIT_BYTES

    step = pipeline.step(Weights, execution_mode="tasks")
    for n, inline in ((1024, True), (2 * INLINE_UNIT_BYTES, False)):
        with step(n)(pipeline.INPUT).deploy() as p:
            assert [p.call(i) for i in (1, 300)] == [1 + n, 300 % 256 + n]
            (task,) = p._program.launchers["tasks"].tasks.values()  # type: ignore[attr-defined]
            assert (task.lead == ()) is inline
