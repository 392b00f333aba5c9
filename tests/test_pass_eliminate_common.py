"""eliminate_common: merges identical pure calls, inline constants and
projections; never impure or class steps, external constants, unequal
JSON values, or nodes of sibling switch arms (a merged node must not run
where neither original ran)."""

from __future__ import annotations

import numpy as np

import pipeline_ir as pipeline
from pass_helpers import apply, run_locally, same_results, traced
from pipeline_ir.passes import eliminate_common, fuse_local


@pipeline.step(pure=True)
def inc(x: int) -> int:
    return x + 1


@pipeline.step(pure=True)
def add(a: int, b: int = 0) -> int:
    return a + b


@pipeline.step
def log(x: int) -> int:
    return x


@pipeline.step(pure=True)
def both(a, b, c):  # type: ignore[no-untyped-def]
    return (a, b, c)


@pipeline.step(pure=True)
def check(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


@pipeline.step
def parity(x: int) -> int:
    return x % 2


@pipeline.step
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, x: int) -> int:
        self.n += 1
        return x + self.n


def test_identical_pure_calls_run_once() -> None:
    compiled = traced(add(inc(pipeline.INPUT), inc(pipeline.INPUT)))
    result = apply(eliminate_common, compiled.graph)
    assert compiled.graph.dump() == (
        "pipeline add(%0: Any) -> int:\n"
        "  %1: int = inc(%0)                             # pure\n"
        "  %2: int = inc(%0)                             # pure\n"
        "  %3: int = add(%1, %2)                         # pure\n"
        "  return %3"
    )
    assert result.graph.dump() == (
        "pipeline add(%0: Any) -> int:\n"
        "  %1: int = inc(%0)                             # pure\n"
        "  %3: int = add(%1, %1)                         # pure\n"
        "  return %3"
    )
    assert result.rewrites == ("merged %2 into %1 (inc): same pure step on the same inputs, so it runs once",)
    same_results(compiled, result.graph, [0, 3])


def test_merges_chains_through_equal_constants_and_keyword_order() -> None:
    compiled = traced(add(add(a=inc(pipeline.INPUT), b=1), add(b=1, a=inc(pipeline.INPUT))))
    result = apply(eliminate_common, compiled.graph)
    assert result.graph.dump() == (
        "pipeline add(%0: Any) -> int:\n"
        "  %1: int = inc(%0)                             # pure\n"
        "  %2: int = 1\n"
        "  %3: int = add(a=%1, b=%2)                     # pure\n"
        "  %7: int = add(%3, %3)                         # pure\n"
        "  return %7"
    )
    assert result.rewrites == (
        "merged %4 into %1 (inc): same pure step on the same inputs, so it runs once",
        "merged %5 into %2 (constant): same inline value and type, so one node holds it",
        "merged %6 into %3 (add): same pure step on the same inputs, so it runs once",
    )
    same_results(compiled, result.graph, [0, 3])


def test_never_merges_impure_or_class_steps() -> None:
    c = Counter()
    compiled = traced(add(log(pipeline.INPUT), log(pipeline.INPUT)))
    assert apply(eliminate_common, compiled.graph).graph is compiled.graph
    compiled = traced(add(c(pipeline.INPUT), c(pipeline.INPUT)))
    assert apply(eliminate_common, compiled.graph).graph is compiled.graph
    # The counter is called twice per call: merging would change the result.
    assert run_locally(compiled, compiled.graph, [0]) == [3]


def test_constants_merge_only_when_json_equal_inline_scalars() -> None:
    compiled = traced(both(1, 1.0, True))
    assert apply(eliminate_common, compiled.graph).graph is compiled.graph
    array = np.arange(3)
    compiled = traced(both(array, array.copy(), pipeline.INPUT))
    assert apply(eliminate_common, compiled.graph).graph is compiled.graph
    # Mutable containers: a step may mutate one, so they are never shared.
    compiled = traced(both({"k": [1, 2]}, {"k": [1, 2]}, pipeline.INPUT))
    assert apply(eliminate_common, compiled.graph).graph is compiled.graph
    compiled = traced(both("a", "a", pipeline.INPUT))
    result = apply(eliminate_common, compiled.graph)
    assert result.rewrites == ("merged %2 into %1 (constant): same inline value and type, so one node holds it",)


def test_equal_projections_merge_and_unlock_their_readers() -> None:
    compiled = traced(add(inc(pipeline.INPUT[0]), inc(pipeline.INPUT[0])))
    result = apply(eliminate_common, compiled.graph)
    assert result.graph.dump() == (
        "pipeline add(%0: Any) -> int:\n"
        '  %1: Any = %0[0]\n'
        "  %2: int = inc(%1)                             # pure\n"
        "  %5: int = add(%2, %2)                         # pure\n"
        "  return %5"
    )
    same_results(compiled, result.graph, [[1], (4, 5)])


def test_calls_of_sibling_switch_arms_merge_but_run_only_in_those_arms() -> None:
    # check(x) is needed by arms 0 and 1: merged, it runs in those two arms
    # and still never for x = -3, which takes the default (check(-3) raises).
    x = pipeline.INPUT
    node = pipeline.switch(x, {0: check(x), 1: add(check(x), 1)}, default=0)
    compiled = traced(node)
    result = apply(eliminate_common, compiled.graph)
    assert result.graph.dump() == (
        "pipeline pipeline(%0: Any) -> int:\n"
        "  %1: int = check(%0)                           # pure\n"
        "  %3: int = 1\n"
        "  %4: int = add(%1, %3)                         # pure\n"
        "  %5: int = 0\n"
        "  %6: int = switch %0 {0: %1, 1: %4} default %5\n"
        "  return %6"
    )
    assert run_locally(compiled, result.graph, [-3, 0, 1]) == [0, 0, 2]
    same_results(compiled, result.graph, [-3, 0, 1, 7])


def test_merges_into_a_node_of_an_enclosing_block() -> None:
    x = pipeline.INPUT
    outer = check(x)
    node = add(outer, pipeline.switch(parity(x), {0: inc(check(x))}, default=5))
    compiled = traced(node)
    result = apply(eliminate_common, compiled.graph)
    assert result.rewrites == ("merged %3 into %1 (check): same pure step on the same inputs, so it runs once",)
    same_results(compiled, result.graph, [0, 1, 4, -2])


def test_a_node_of_an_arm_merged_with_one_outside_runs_where_either_ran() -> None:
    x = pipeline.INPUT
    node = (pipeline.switch(parity(x), {0: check(x)}, default=1), check(x))
    compiled = traced(node)
    result = apply(eliminate_common, compiled.graph)
    assert result.rewrites == ("merged %5 into %2 (check): same pure step on the same inputs, so it runs once",)
    same_results(compiled, result.graph, [3, 4, -1, 7])


def test_duplicate_outputs_become_one_node_returned_twice() -> None:
    compiled = traced((inc(pipeline.INPUT), inc(pipeline.INPUT)))
    result = apply(eliminate_common, compiled.graph)
    assert result.graph.outputs == (1, 1)
    assert run_locally(compiled, result.graph, [1]) == [(2, 2)]


def test_fused_bodies_are_opaque() -> None:
    compiled = traced(add(inc(inc(pipeline.INPUT)), 1))
    graph = fuse_local(compiled.graph).graph
    assert apply(eliminate_common, graph).graph is graph
