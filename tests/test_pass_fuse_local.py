"""fuse_local: LOCAL chains become one block of generated code; never with
fuse=False steps, across a remote step or a switch, or around fan-out."""

from __future__ import annotations

import pipeline_ir as pipeline
from pass_helpers import apply, same_results, traced
from pipeline_ir.passes import fuse_local


@pipeline.step
def inc(x: int) -> int:
    return x + 1


@pipeline.step
def double(x: int) -> int:
    return x * 2


@pipeline.step(fuse=False)
def trace_point(x: int) -> int:
    return x


@pipeline.step(execution_mode="tasks")
def remote(x: int) -> int:
    return x - 1


@pipeline.step
def add(a: int, b: int) -> int:
    return a + b


def test_chain_with_its_constants_becomes_one_block() -> None:
    compiled = traced(add(double(inc(pipeline.INPUT)), 10))
    result = apply(fuse_local, compiled.graph)
    assert result.graph.dump() == (
        "pipeline add(%0: Any) -> int:\n"
        "  %5: int = fused local {                       # local, 4 nodes\n"
        "    %1: int = inc(%0)\n"
        "    %2: int = double(%1)\n"
        "    %3: int = 10\n"
        "    %4: int = add(%2, %3)\n"
        "  } -> %4\n"
        "  return %5"
    )
    assert result.rewrites == (
        "fused inc %1, double %2, add %4 into %5 (local): adjacent LOCAL steps run as one block of generated code",
    )
    same_results(compiled, result.graph, [0, 7])


def test_fuse_false_and_remote_steps_break_chains() -> None:
    for node in (double(trace_point(inc(pipeline.INPUT))), double(remote(inc(pipeline.INPUT)))):
        compiled = traced(node)
        assert apply(fuse_local, compiled.graph).graph is compiled.graph


def test_fan_out_node_ends_its_group() -> None:
    x = inc(pipeline.INPUT)
    compiled = traced((double(x), x))
    assert apply(fuse_local, compiled.graph).graph is compiled.graph


def test_never_across_a_switch() -> None:
    key = inc(pipeline.INPUT)
    compiled = traced(double(pipeline.switch(key, {1: double(inc(pipeline.INPUT))}, default=0)))
    result = apply(fuse_local, compiled.graph)
    assert result.graph.dump() == (
        "pipeline double(%0: Any) -> int:\n"
        "  %1: int = inc(%0)\n"
        "  %7: int = fused local {                       # local, 2 nodes\n"
        "    %2: int = inc(%0)\n"
        "    %3: int = double(%2)\n"
        "  } -> %3\n"
        "  %4: int = 0\n"
        "  %5: int = switch %1 {1: %7} default %4\n"
        "  %6: int = double(%5)\n"
        "  return %6"
    )
    same_results(compiled, result.graph, [0, 1])
