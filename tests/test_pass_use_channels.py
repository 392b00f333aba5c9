"""use_channels: which actor units may take Compiled Graph channels.

Marked: one replica, every input and every reader in the caller, every
call of the step qualifying. Never: replica pools, units fed by or feeding
another Ray process, modes other than actors."""

from __future__ import annotations

import pytest

import pipeline_ir as pipeline
from pass_helpers import apply, traced
from pipeline_ir.errors import GraphError
from pipeline_ir.ir.nodes import Fused
from pipeline_ir.ir.verify import verify
from pipeline_ir.passes import colocate_actors, use_channels


@pipeline.step
def prep(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="actors")
def embed(x: int) -> int:
    return x * 2


@pipeline.step(execution_mode="actors")
def head(x: int) -> int:
    return x - 3


@pipeline.step(execution_mode="actors", num_replicas=2)
def pooled(x: int) -> int:
    return x


@pipeline.step(execution_mode="tasks")
def remote_prep(x: int) -> int:
    return x


@pipeline.step
def post(x: int) -> str:
    return str(x)


def test_marks_a_colocated_group_between_local_values() -> None:
    compiled = traced(post(head(embed(prep(pipeline.INPUT)))), name="p")
    grouped = apply(colocate_actors, compiled.graph).graph
    result = apply(use_channels, grouped)
    assert result.graph.dump() == (
        "pipeline p(%0: Any) -> str:\n"
        "  %1: int = prep(%0)\n"
        "  %5: int = fused actors {                      # actors channel, 2 nodes\n"
        "    %2: int = embed(%1)                         # actors\n"
        "    %3: int = head(%2)                          # actors\n"
        "  } -> %3\n"
        "  %4: str = post(%5)\n"
        "  return %4"
    )
    assert result.rewrites == (
        "%5 (embed+head): reads and returns values in the caller with one replica, so calls go over "
        "Compiled Graph channels instead of an actor task each",
    )


def test_marks_a_step_only_when_every_call_qualifies() -> None:
    both = traced((embed(pipeline.INPUT), embed(prep(pipeline.INPUT))))
    assert apply(use_channels, both.graph).graph.step("embed").placement.channel
    mixed = traced((embed(pipeline.INPUT), embed(remote_prep(pipeline.INPUT))))
    result = apply(use_channels, mixed.graph)
    assert result.graph is mixed.graph
    assert result.rewrites == ("embed keeps actor tasks: %3 cannot use a channel, it reads %2 from another Ray process",)


def test_never_marks_pools_or_units_feeding_ray() -> None:
    pool = traced(pooled(pipeline.INPUT))
    assert apply(use_channels, pool.graph).rewrites == (
        "pooled keeps actor tasks: %1 cannot use a channel, it has 2 replicas, and a compiled graph binds one actor",
    )
    feeding = traced(remote_prep(embed(pipeline.INPUT)))
    result = apply(use_channels, feeding.graph)
    assert result.graph is feeding.graph
    assert "its result goes to %2, which does not read it in the caller" in result.rewrites[0]


def test_a_switch_reading_the_unit_keeps_actor_tasks() -> None:
    # A switch whose arms are all remote keeps a Ray handle, not a value.
    node = pipeline.switch(pipeline.INPUT["k"], {0: embed(pipeline.INPUT["x"])}, default=head(pipeline.INPUT["x"]))
    result = apply(use_channels, traced(node).graph)
    assert not any(s.placement.channel for s in result.graph.steps)


def test_verify_rejects_channels_off_single_actors() -> None:
    g = traced(pooled(pipeline.INPUT)).graph
    import msgspec

    bad = msgspec.structs.replace(g, steps=tuple(msgspec.structs.replace(s, placement=msgspec.structs.replace(s.placement, channel=True)) for s in g.steps))
    with pytest.raises(GraphError, match="channel=True needs execution_mode 'actors' and one replica"):
        verify(bad)


def test_compile_option_runs_the_pass_last() -> None:
    compiled = pipeline.compile(head(embed(pipeline.INPUT)), channels=True)
    assert compiled.explain().splitlines()[-2:] == [
        "use_channels:",
        "  - %3 (embed+head): reads and returns values in the caller with one replica, so calls go over "
        "Compiled Graph channels instead of an actor task each",
    ]
    assert isinstance(compiled.graph.nodes[-1], Fused) and compiled.graph.nodes[-1].placement.channel
    assert not pipeline.compile(head(embed(pipeline.INPUT))).graph.nodes[-1].placement.channel  # type: ignore[union-attr]
