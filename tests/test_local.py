"""The LOCAL backend: seed examples, errors, switch, calls, generated code."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

import pipeline_ir as pipeline


# -- the seed page's examples (only the import line differs) --


@pipeline.step
def echo(inp):  # type: ignore[no-untyped-def]
    return inp


@pipeline.step
def add_one(inp):  # type: ignore[no-untyped-def]
    return inp + 1


@pipeline.step
def double(inp):  # type: ignore[no-untyped-def]
    return inp**2


@pipeline.step
class Adder:
    def __init__(self, value):  # type: ignore[no-untyped-def]
        self.value = value

    def __call__(self, inp):  # type: ignore[no-untyped-def]
        return self.value + inp


def test_seed_echo() -> None:
    my_node = echo(pipeline.INPUT)
    my_pipeline = my_node.deploy()
    assert my_pipeline.call(42) == 42
    my_pipeline.shutdown()


def test_seed_chain() -> None:
    my_node = double(add_one(pipeline.INPUT))
    with my_node.deploy() as my_pipeline:
        assert my_pipeline.call(1) == 4


def test_seed_adder() -> None:
    with Adder(2)(pipeline.INPUT).deploy() as my_pipeline:
        assert my_pipeline.call(2) == 4


class _DB:
    def get(self, key: str) -> list[float]:
        return [0.25, 0.75]


my_db = _DB()


@pipeline.step
def model_a(x: list[float]) -> list[float]:
    return [v * 2 for v in x]


@pipeline.step
def model_b(x: list[float]) -> list[float]:
    return [v + 1 for v in x]


@pipeline.step
def dynamic_weighting_combine(*classifier_outputs: list[float]) -> list[int]:
    my_weights = my_db.get("dynamic_weights")
    weighted = [sum(w * out[i] for w, out in zip(my_weights, classifier_outputs)) for i in range(len(classifier_outputs[0]))]
    return [int(v) for v in weighted]


def test_seed_business_logic_combine() -> None:
    model_nodes = [m(pipeline.INPUT) for m in (model_a, model_b)]
    with dynamic_weighting_combine(*model_nodes).deploy() as p:
        assert p.call([1.0, 4.0]) == [int(0.25 * 2 + 0.75 * 2), int(0.25 * 8 + 0.75 * 5)]


# -- results --


@pipeline.step
def pair(x: int) -> tuple[int, int]:
    return x, -x


@pipeline.step
def kw(a: int, *, b: int = 0) -> int:
    return a * 10 + b


def test_fan_out_projection_kwargs_multi_output() -> None:
    p = pair(pipeline.INPUT)
    out = (kw(p[0], b=p[1]), kw(p[1], b=3), p[0])
    with pipeline.compile(out).deploy() as pl:
        assert pl.call(2) == (18, -17, 2)


def test_fan_out_runs_once_per_call() -> None:
    calls: list[int] = []

    @pipeline.step
    def counted(x: int) -> int:
        calls.append(x)
        return x

    c = counted(pipeline.INPUT)
    with pipeline.compile((add_one(c), double(c))).deploy() as p:
        assert p.call(3) == (4, 9)
    assert calls == [3]


def test_input_projection_by_key() -> None:
    with add_one(pipeline.INPUT["x"]).deploy() as p:
        assert p.call({"x": 1}) == 2


# -- switch --


def test_switch_runs_only_the_chosen_branch() -> None:
    ran: list[str] = []

    @pipeline.step
    def small(x: int) -> str:
        ran.append("small")
        return f"small:{x}"

    @pipeline.step
    def large(x: int) -> str:
        ran.append("large")
        return f"large:{x}"

    @pipeline.step
    def prep(x: int) -> int:
        ran.append("prep")
        return x

    @pipeline.step
    def size(x: dict[str, object]) -> str:
        return "big" if x["n"] > 10 else "small"  # type: ignore[operator]

    n = pipeline.INPUT["n"]
    node = pipeline.switch(size(pipeline.INPUT), {"small": small(n), "big": large(prep(n))})
    with node.deploy() as p:
        assert p.call({"n": 3}) == "small:3"
        assert ran == ["small"]
        assert p.call({"n": 30}) == "large:30"
        assert ran == ["small", "prep", "large"]


def test_switch_shared_upstream_runs_unconditionally() -> None:
    ran: list[str] = []

    @pipeline.step
    def shared(x: int) -> int:
        ran.append("shared")
        return x

    s = shared(pipeline.INPUT)
    node = pipeline.switch(pipeline.INPUT, {1: add_one(s), 2: double(s)})
    with pipeline.compile((node, s)).deploy() as p:
        assert p.call(2) == (4, 2)
        assert ran == ["shared"]


def test_switch_default_and_no_match() -> None:
    node = pipeline.switch(pipeline.INPUT, {"a": 1, "b": 2}, default=0)
    with node.deploy() as p:
        assert p.call("a") == 1 and p.call("zzz") == 0
    with pipeline.switch(pipeline.INPUT, {"a": 1}).deploy() as p:
        with pytest.raises(pipeline.StepError, match=r"switch \(node %\d\) has no branch for key 'b'") as info:
            p.call("b")
        assert isinstance(info.value.__cause__, KeyError)
        assert p.call("a") == 1


def test_nested_switch() -> None:
    inner = pipeline.switch(pipeline.INPUT["b"], {0: add_one(pipeline.INPUT["x"]), 1: double(pipeline.INPUT["x"])})
    outer = pipeline.switch(pipeline.INPUT["a"], {True: inner}, default=echo(pipeline.INPUT["x"]))
    with outer.deploy() as p:
        assert p.call({"a": True, "b": 0, "x": 5}) == 6
        assert p.call({"a": True, "b": 1, "x": 5}) == 25
        assert p.call({"a": False, "b": 9, "x": 5}) == 5


# -- errors --


@pipeline.step
def fails_on_zero(x: int) -> float:
    return 1 / x


def test_step_error_names_step_and_node_and_keeps_cause() -> None:
    with double(fails_on_zero(add_one(pipeline.INPUT))).deploy() as p:
        with pytest.raises(pipeline.StepError) as info:
            p.call(-1)
        err = info.value
        assert err.step_name == "fails_on_zero" and err.node_id == 2
        assert "step 'fails_on_zero' (node %2) raised ZeroDivisionError" in str(err)
        assert isinstance(err.__cause__, ZeroDivisionError)
        assert p.call(1) == 0.25  # still usable


def test_errors_in_unoptimized_and_projection_nodes() -> None:
    with pipeline.compile(fails_on_zero(pipeline.INPUT), optimize=False).deploy() as p:
        with pytest.raises(pipeline.StepError, match="fails_on_zero"):
            p.call(0)
    with add_one(pipeline.INPUT["missing"]).deploy() as p:
        with pytest.raises(pipeline.StepError, match=r"step 'getitem' \(node %1\) raised KeyError") as info:
            p.call({})
        assert isinstance(info.value.__cause__, KeyError)


def test_constructor_error_at_deploy_names_step() -> None:
    @pipeline.step
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("no weights")

        def __call__(self, x: int) -> int:
            return x

    compiled = pipeline.compile(Broken()(pipeline.INPUT))
    with pytest.raises(pipeline.StepError, match=r"step 'Broken' \(node %1\) failed in its constructor: RuntimeError: no weights"):
        compiled.deploy()


def test_shutdown_is_idempotent_and_final() -> None:
    p = add_one(pipeline.INPUT).deploy()
    p.shutdown()
    p.shutdown()
    with pytest.raises(pipeline.PipelineError, match="shut down"):
        p.call(1)


# -- calling --


def test_call_async_and_map() -> None:
    with double(add_one(pipeline.INPUT)).deploy() as p:
        async def main() -> list[object]:
            return list(await asyncio.gather(*(p.call_async(i) for i in range(5))))

        assert asyncio.run(main()) == [1, 4, 9, 16, 25]
        assert list(p.map(range(5), max_in_flight=2)) == [1, 4, 9, 16, 25]
        with pytest.raises(ValueError, match="max_in_flight"):
            p.map([1], max_in_flight=0)


def test_async_errors_are_step_errors() -> None:
    with fails_on_zero(pipeline.INPUT).deploy() as p:
        with pytest.raises(pipeline.StepError, match="fails_on_zero"):
            asyncio.run(p.call_async(0))  # type: ignore[arg-type]


def test_generated_code_is_straight_line() -> None:
    with pipeline.compile(double(add_one(pipeline.INPUT))).deploy() as p:
        # One line a node. The C-level counter Pipeline.stats() reads is
        # bumped once for the whole straight run, and doubles as the tick
        # that hands one call in 32 to the timed twin (LOCAL steps timed).
        assert p.code == (
            "def run(v0):\n    if not next(count_add_one_to_double) & 31:\n        return _timed(v0)\n"
            "    v1 = add_one(v0)\n    v2 = double(v1)\n    v3 = v2\n    return v3\n"
        )


def test_local_pipeline_never_imports_ray_or_torch() -> None:
    script = textwrap.dedent(
        """
        import sys
        import pipeline_ir as pipeline

        @pipeline.step
        def inc(x):
            return x + 1

        with inc(pipeline.INPUT).deploy() as p:
            assert p.call(1) == 2
        print("ray" in sys.modules, "torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
