"""@step: options, their validation, and build-time errors."""

from __future__ import annotations

import pytest

import pipeline_ir as pipeline
from pipeline_ir.builder import CallNode


def f(x: int) -> int:
    return x


class Model:
    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self, x: int) -> int:
        return x + self.value


def test_bare_decorator_is_local() -> None:
    s = pipeline.step(f)
    assert s.options.mode is pipeline.ExecutionMode.LOCAL
    assert s.name == "f"
    assert s.__doc__ == f.__doc__ and s.__name__ == "f"


@pytest.mark.parametrize("mode", ["tasks", "TASKS", "Tasks", pipeline.ExecutionMode.TASKS])
def test_execution_mode_accepts_enum_or_case_insensitive_string(mode: object) -> None:
    s = pipeline.step(execution_mode=mode)(f)  # type: ignore[arg-type]
    assert s.options.mode is pipeline.ExecutionMode.TASKS


def test_unknown_mode_string_is_value_error_naming_step() -> None:
    with pytest.raises(ValueError, match=r"step 'f': unknown execution_mode 'gpu'.*'local', 'tasks' or 'actors'"):
        pipeline.step(execution_mode="gpu")(f)


def test_mode_of_other_type_is_type_error() -> None:
    with pytest.raises(TypeError, match=r"step 'f': execution_mode must be"):
        pipeline.step(execution_mode=1)(f)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, -1])
def test_num_replicas_below_one(n: int) -> None:
    with pytest.raises(ValueError, match=r"step 'f': num_replicas must be at least 1"):
        pipeline.step(execution_mode="actors", num_replicas=n)(f)


@pytest.mark.parametrize("mode", ["local", "tasks"])
def test_num_replicas_needs_actors(mode: str) -> None:
    with pytest.raises(ValueError, match=r"num_replicas=2 needs execution_mode='actors'"):
        pipeline.step(execution_mode=mode, num_replicas=2)(f)


def test_num_replicas_must_be_int() -> None:
    with pytest.raises(TypeError, match="num_replicas must be an int"):
        pipeline.step(execution_mode="actors", num_replicas=2.0)(f)  # type: ignore[arg-type]


def test_resources_are_validated() -> None:
    s = pipeline.step(execution_mode="tasks", num_cpus=2, num_gpus=0.5)(f)
    assert (s.options.num_cpus, s.options.num_gpus) == (2.0, 0.5)
    with pytest.raises(ValueError, match=r"step 'f': num_gpus must be >= 0"):
        pipeline.step(num_gpus=-1)(f)
    with pytest.raises(TypeError, match=r"step 'f': num_cpus must be a number"):
        pipeline.step(num_cpus="1")(f)  # type: ignore[arg-type]


def test_name_option() -> None:
    s = pipeline.step(name="renamed")(f)
    assert s.name == "renamed"
    with pytest.raises(TypeError, match="non-empty string"):
        pipeline.step(name="")(f)


def test_pure_only_for_functions() -> None:
    with pytest.raises(ValueError, match=r"step 'Model': pure=True is for function steps"):
        pipeline.step(pure=True)(Model)


def test_decorating_twice_or_non_callable() -> None:
    s = pipeline.step(f)
    with pytest.raises(TypeError, match="already a pipeline step"):
        pipeline.step(s)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="decorates a function or a class"):
        pipeline.step(42)  # type: ignore[call-overload]


# Each result would differ by backend (a generator or coroutine object on
# LOCAL, an iterated generator or a pickling error on Ray): refused at once.


def gen(x: int):  # type: ignore[no-untyped-def]
    yield x


async def coro(x: int) -> int:
    return x


async def agen(x: int):  # type: ignore[no-untyped-def]
    yield x


class AsyncCall:
    async def __call__(self, x: int) -> int:
        return x


class GenCall:
    def __call__(self, x: int):  # type: ignore[no-untyped-def]
        yield x


class AsyncGenCall:
    async def __call__(self, x: int):  # type: ignore[no-untyped-def]
        yield x


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (gen, r"step 'gen' is a generator function \(it yields\).*return a list instead of yielding"),
        (coro, r"step 'coro' is an async function \(async def\); make it a plain def.*call_async\(\)"),
        (agen, r"step 'agen' is an async generator.*returns a list instead of yielding"),
        (AsyncCall, r"class step 'AsyncCall': __call__ is an async function.*make it a plain def.*call_async\(\)"),
        (GenCall, r"class step 'GenCall': __call__ is a generator function.*return a list instead of yielding"),
        (AsyncGenCall, r"class step 'AsyncGenCall': __call__ is an async generator"),
    ],
)
def test_generators_and_async_steps_rejected_at_decoration(target: object, message: str) -> None:
    with pytest.raises(pipeline.PipelineTypeError, match=message) as info:
        pipeline.step(target)  # type: ignore[call-overload]
    assert isinstance(info.value, TypeError)
    with pytest.raises(TypeError, match=message):
        pipeline.step(execution_mode="tasks")(target)


def test_rejection_names_the_step_by_its_name_option() -> None:
    with pytest.raises(TypeError, match=r"step 'tokenizer' is a generator function"):
        pipeline.step(name="tokenizer")(gen)


def test_returning_a_list_is_the_way() -> None:
    @pipeline.step
    def tokens(text: str) -> list[str]:
        return text.split()

    with tokens(pipeline.INPUT).deploy() as p:
        assert p.call("a b") == ["a", "b"]


def test_build_errors_are_pipeline_errors_and_builtins() -> None:
    with pytest.raises(pipeline.PipelineValueError) as value_error:
        pipeline.step(execution_mode="gpu")(f)
    assert isinstance(value_error.value, ValueError) and isinstance(value_error.value, pipeline.PipelineError)
    with pytest.raises(pipeline.PipelineTypeError) as type_error:
        pipeline.step(num_cpus="1")(f)  # type: ignore[call-overload]
    assert isinstance(type_error.value, TypeError) and isinstance(type_error.value, pipeline.PipelineError)
    with pytest.raises(pipeline.PipelineTypeError, match="got the step 'f' itself"):
        pipeline.step(f)(pipeline.step(f))
    with pytest.raises(pipeline.PipelineValueError, match="unknown backend"):
        pipeline.compile(pipeline.step(f)(pipeline.INPUT), backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(pipeline.PipelineValueError, match="at least one output"):
        pipeline.compile(())


def test_class_without_call_rejected() -> None:
    class NoCall:
        pass

    with pytest.raises(TypeError, match=r"class step 'NoCall' must define __call__"):
        pipeline.step(NoCall)


def test_calling_records_a_node_and_runs_nothing() -> None:
    calls: list[int] = []

    @pipeline.step
    def record(x: int) -> int:
        calls.append(x)
        return x

    node = record(pipeline.INPUT)
    assert isinstance(node, CallNode)
    assert calls == []


def test_class_constructor_not_run_before_deploy() -> None:
    built: list[int] = []

    @pipeline.step
    class Counting:
        def __init__(self, v: int) -> None:
            built.append(v)

        def __call__(self, x: int) -> int:
            return x

    node = Counting(3)(pipeline.INPUT)
    compiled = pipeline.compile(node)
    assert built == []
    with compiled.deploy() as p:
        assert built == [3]
        assert p.call(5) == 5
    assert built == [3]


def test_wrong_arity_is_caught_when_building() -> None:
    s = pipeline.step(f)
    with pytest.raises(TypeError, match=r"step 'f': too many positional arguments.*fix the call arguments"):
        s(pipeline.INPUT, pipeline.INPUT)
    with pytest.raises(TypeError, match=r"step 'f': got an unexpected keyword argument 'y'"):
        s(pipeline.INPUT, y=pipeline.INPUT)
    m = pipeline.step(Model)
    with pytest.raises(TypeError, match=r"step 'Model': missing a required argument: 'value'.*init arguments"):
        m()


def test_uncalled_step_passed_as_argument() -> None:
    a, b = pipeline.step(f), pipeline.step(name="b")(f)
    with pytest.raises(TypeError, match=r"got the step 'f' itself, not a node; call it on its inputs first, e.g. f\(pipeline.INPUT\)"):
        b(a)


def test_uninstantiated_class_step_passed_as_argument() -> None:
    m, b = pipeline.step(Model), pipeline.step(f)
    with pytest.raises(TypeError, match=r"got the class step 'Model' itself; instantiate it"):
        b(m)
    with pytest.raises(TypeError, match=r"configured step 'Model' without inputs"):
        b(m(1))


def test_node_inside_container_rejected() -> None:
    s = pipeline.step(f)
    with pytest.raises(TypeError, match=r"inside a list.*f\(\*nodes\)"):
        s([pipeline.INPUT])


def test_node_as_init_arg_rejected() -> None:
    m = pipeline.step(Model)
    with pytest.raises(TypeError, match=r"init args are fixed at deploy\(\)"):
        m(pipeline.INPUT)


def test_nodes_cannot_be_iterated_or_tested() -> None:
    node = pipeline.step(f)(pipeline.INPUT)
    with pytest.raises(TypeError, match="cannot be unpacked or iterated"):
        a, b = node  # type: ignore[misc]
    with pytest.raises(TypeError, match="pipeline.switch"):
        bool(node)
    with pytest.raises(TypeError, match="indexed by an int or a str"):
        node[1.5]  # type: ignore[index]
