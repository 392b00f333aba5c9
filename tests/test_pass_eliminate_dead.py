"""eliminate_dead: drops what no output needs, with the steps only it
called; never the input, never a live node, never inside fused groups."""

from __future__ import annotations

import msgspec

import pipeline_ir as pipeline
from pass_helpers import apply, traced
from pipeline_ir.passes import eliminate_dead, fuse_local


@pipeline.step(pure=True)
def inc(x: int) -> int:
    return x + 1


@pipeline.step
def log(x: int) -> int:
    return x


@pipeline.step
def add(a: int, b: int) -> int:
    return a + b


def test_drops_unused_nodes_and_their_steps() -> None:
    compiled = traced((inc(pipeline.INPUT), log(inc(pipeline.INPUT)), add(3, 4)))
    # A graph edited by hand (or decoded from JSON) that returns only %1.
    graph = msgspec.structs.replace(compiled.graph, outputs=(1,), multi_output=False)
    assert graph.dump() == (
        "pipeline add(%0: Any) -> int:\n"
        "  %1: int = inc(%0)                             # pure\n"
        "  %2: int = inc(%0)                             # pure\n"
        "  %3: int = log(%2)\n"
        "  %4: int = 3\n"
        "  %5: int = 4\n"
        "  %6: int = add(%4, %5)\n"
        "  return %1"
    )
    result = apply(eliminate_dead, graph)
    assert result.graph.dump() == "pipeline add(%0: Any) -> int:\n  %1: int = inc(%0)                             # pure\n  return %1"
    assert result.rewrites == (
        "dropped %2 (inc): no output uses its value",
        "dropped %3 (log): no output uses its value",
        "dropped %4 (constant): no output uses its value",
        "dropped %5 (constant): no output uses its value",
        "dropped %6 (add): no output uses its value",
        "dropped step 'log': no node calls it any more",
        "dropped step 'add': no node calls it any more",
    )
    assert [s.name for s in result.graph.steps] == ["inc"]


def test_traced_graph_has_nothing_dead_and_is_returned_as_is() -> None:
    x = inc(pipeline.INPUT)
    compiled = traced((add(x, log(x)), x))
    assert apply(eliminate_dead, compiled.graph).graph is compiled.graph


def test_never_drops_the_input_even_when_unused() -> None:
    compiled = traced(add(1, 2))
    result = apply(eliminate_dead, compiled.graph)
    assert result.graph is compiled.graph
    assert result.graph.nodes[0].id == 0


def test_keeps_switch_branches_and_key() -> None:
    node = pipeline.switch(log(pipeline.INPUT), {1: inc(pipeline.INPUT), 2: add(pipeline.INPUT, 5)}, default=7)
    compiled = traced(node)
    assert apply(eliminate_dead, compiled.graph).graph is compiled.graph


def test_fused_groups_stay_whole_and_their_inputs_live() -> None:
    compiled = traced((add(inc(pipeline.INPUT), 1), log(pipeline.INPUT)))
    fused = fuse_local(compiled.graph).graph
    graph = msgspec.structs.replace(fused, outputs=(fused.outputs[0],), multi_output=False)
    result = apply(eliminate_dead, graph)
    assert result.graph.nodes[1:] == graph.nodes[1:2]  # the group, whole
    assert result.rewrites == (
        "dropped %4 (log): no output uses its value",
        "dropped step 'log': no node calls it any more",
    )
