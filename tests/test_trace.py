"""Tracing builder nodes into the IR, and the text dump of what was traced."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline_ir as pipeline
from pipeline_ir.ir import Call, Constant, External, Inline, Input, Project, Switch


@pipeline.step
def add_one(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="tasks")
def double(x: int) -> int:
    return x * 2


@pipeline.step(execution_mode="actors", num_replicas=2, num_gpus=1)
class Adder:
    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self, x: int) -> int:
        return x + self.value


@pipeline.step
def pair(x: int) -> tuple[int, str]:
    return x, str(x)


@pipeline.step
def combine(*xs: int, scale: int = 1) -> int:
    return sum(xs) * scale


@pipeline.step
def to_str(x: int) -> str:
    return str(x)


def raw(node: object) -> pipeline.Graph:
    return pipeline.compile(node, optimize=False).graph  # type: ignore[arg-type]


def test_api_example_dump() -> None:
    node = Adder(10)(double(add_one(pipeline.INPUT)))
    assert raw(node).dump() == (
        "pipeline Adder(%0: Any) -> int:\n"
        "  %1: int = add_one(%0)\n"
        "  %2: int = double(%1)                          # tasks\n"
        "  %3: int = Adder(10)(%2)                       # actors x2 gpu=1\n"
        "  return %3"
    )


def test_nodes_are_topological_with_input_first() -> None:
    a = add_one(pipeline.INPUT)
    g = raw(combine(a, add_one(a), scale=3))
    assert isinstance(g.nodes[0], Input)
    seen: set[int] = set()
    for n in g.nodes:
        from pipeline_ir.ir import node_inputs

        assert set(node_inputs(n)) <= seen
        seen.add(n.id)


def test_fan_out_node_is_recorded_once() -> None:
    a = add_one(pipeline.INPUT)
    g = raw(combine(a, a, a))
    calls = [n for n in g.nodes if isinstance(n, Call)]
    assert [g.step(c.step).name for c in calls] == ["add_one", "combine"]
    assert calls[1].args == (calls[0].id,) * 3


def test_one_step_spec_per_function_and_per_class_instance() -> None:
    a = add_one(pipeline.INPUT)
    b = add_one(a)
    m1, m2 = Adder(1), Adder(2)
    g = raw(combine(m1(a), m1(b), m2(b)))
    keys = [s.key for s in g.steps]
    assert keys == ["add_one", "Adder", "Adder#2", "combine"]
    assert g.step("Adder").init_args == (Inline(value=1),)
    assert g.step("Adder#2").init_args == (Inline(value=2),)
    assert g.step("Adder").path == f"{__name__}:Adder"


def test_kwargs_and_constants() -> None:
    g = raw(combine(pipeline.INPUT, 5, scale=add_one(pipeline.INPUT)))
    call = g.node(g.outputs[0])
    assert isinstance(call, Call)
    assert len(call.args) == 2 and [k for k, _ in call.kwargs] == ["scale"]
    const = g.node(call.args[1])
    assert isinstance(const, Constant) and const.value == Inline(value=5)
    assert "%2: int = 5" in g.dump()


@pipeline.step
def gather(*xs):  # type: ignore[no-untyped-def]
    return xs


def test_non_json_constants_are_external() -> None:
    arr = np.arange(3, dtype=np.float32)
    compiled = pipeline.compile(gather(pipeline.INPUT, arr, (1, 2), b"xy"), optimize=False)
    consts = [n for n in compiled.graph.nodes if isinstance(n, Constant)]
    assert all(isinstance(c.value, External) for c in consts)
    assert "<ndarray shape=(3,) dtype=float32>" in compiled.graph.dump()
    assert "<bytes len=2>" in compiled.graph.dump()
    keys = [c.value.key for c in consts if isinstance(c.value, External)]
    assert compiled.bindings.constants[keys[0]] is arr
    assert compiled.bindings.constants[keys[1]] == (1, 2)


def test_projections_and_their_types() -> None:
    p = pair(pipeline.INPUT)
    g = raw((p[0], p[1], pipeline.INPUT["key"]))
    projs = [n for n in g.nodes if isinstance(n, Project)]
    assert [(n.key, n.type.name) for n in projs] == [(0, "builtins.int"), (1, "builtins.str"), ("key", "typing.Any")]
    assert g.multi_output and len(g.outputs) == 3
    assert '= %1[0]' in g.dump() and '= %0["key"]' in g.dump()
    assert g.dump().endswith("return %2, %3, %4")


def test_switch_is_recorded() -> None:
    key = pipeline.INPUT["kind"]
    s = pipeline.switch(key, {"a": add_one(pipeline.INPUT["x"]), "b": 7}, default=to_str(pipeline.INPUT["x"]))
    g = raw(s)
    sw = g.node(g.outputs[0])
    assert isinstance(sw, Switch)
    assert [c.value for c in sw.cases] == ["a", "b"] and sw.default is not None
    assert sw.type.name == "typing.Union"
    assert 'switch %1 {"a": %3, "b": %6} default %5' in g.dump()


def test_switch_argument_errors() -> None:
    with pytest.raises(TypeError, match="key must be a pipeline node"):
        pipeline.switch("x", {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"branch key 1.5 is a float"):
        pipeline.switch(pipeline.INPUT, {1.5: 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="at least one branch or a default"):
        pipeline.switch(pipeline.INPUT, {})
    with pytest.raises(TypeError, match=r"switch branch 'a': got the step 'add_one' itself"):
        pipeline.switch(pipeline.INPUT, {"a": add_one})


def test_constant_pipeline_compiles() -> None:
    g = raw(add_one(41))
    assert g.dump() == "pipeline add_one(%0: Any) -> int:\n  %1: int = 41\n  %2: int = add_one(%1)\n  return %2"
    with g_deploy(add_one(41)) as p:
        assert p.call() == 42


def g_deploy(node: pipeline.PipelineNode) -> pipeline.Pipeline:
    return node.deploy()


def test_compile_rejects_non_nodes() -> None:
    with pytest.raises(TypeError, match=r"output 0 is a int, not a pipeline node"):
        pipeline.compile(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"got the step 'add_one' itself"):
        pipeline.compile(add_one)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one output"):
        pipeline.compile(())


def test_type_mismatch_is_caught_at_compile_time() -> None:
    with pytest.raises(pipeline.PipelineTypeError) as info:
        pipeline.compile(add_one(to_str(pipeline.INPUT)))
    msg = str(info.value)
    assert "step 'to_str' (node %1) returns str" in msg
    assert "step 'add_one' (node %2) expects int for parameter 'x'" in msg
    assert isinstance(info.value, TypeError)


def test_type_mismatch_through_projection_and_varargs() -> None:
    p = pair(pipeline.INPUT)
    pipeline.compile(add_one(p[0]))  # int -> int is fine
    with pytest.raises(pipeline.PipelineTypeError, match=r"node %2 returns str.*'combine'.*parameter '\*xs'"):
        pipeline.compile(combine(p[1]))


def test_compatible_types_pass() -> None:
    @pipeline.step
    def takes_float(x: float) -> float:
        return x

    @pipeline.step
    def takes_optional(x: int | None) -> int:
        return x or 0

    @pipeline.step
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    # int -> float: the numeric tower; the parameter keeps its own type.
    widened = raw(takes_float(add_one(pipeline.INPUT)))
    assert "%1: int = add_one(%0)\n  %2: float = takes_float(%1)" in widened.dump()
    assert widened.step("takes_float").params[0].type.name == "builtins.float"
    # int -> int | None: a member of the union.
    optional = pipeline.compile(takes_optional(add_one(pipeline.INPUT)))
    assert [a.name for a in optional.graph.step("takes_optional").params[0].type.args] == ["builtins.int", "builtins.NoneType"]
    with optional.deploy() as p:
        assert p.call(-1) == 0 and p.call(1) == 2
    # Any in between: nothing to check at compile, so a mismatch shows when it runs.
    unchecked = pipeline.compile(add_one(untyped(to_str(pipeline.INPUT))))
    assert "%2: Any = untyped(%1)" in unchecked.source_graph.dump()
    with unchecked.deploy() as p:
        with pytest.raises(pipeline.StepError, match=r"step 'add_one' \(node %3\) raised TypeError") as info:
            p.call(1)
        assert isinstance(info.value.__cause__, TypeError)


def test_deep_chain_does_not_hit_recursion_limit() -> None:
    node: pipeline.PipelineNode = pipeline.INPUT
    for _ in range(3000):
        node = add_one(node)
    with pipeline.compile(node, optimize=False).deploy() as p:
        assert p.call(0) == 3000
