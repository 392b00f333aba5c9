"""Placement in the IR: the serving step options (max_batch_size,
batch_wait_timeout_s, idempotent) from the decorator to the Placement,
their printing and JSON form, the rules passes follow for them, and the
graph's unit and placement lookups."""

from __future__ import annotations

import functools

import msgspec
import pytest
import torch

import pipeline_ir as pipeline
from pipeline_ir.errors import GraphError
from pipeline_ir.ir import Batching, Call, Fused, Graph, Placement
from pipeline_ir.ir.printer import placement_text
from pipeline_ir.ir.types import render
from pipeline_ir.ir.verify import verify
from pipeline_ir.passes import colocate, colocate_actors, force_backend, fuse_local, fuse_tasks, run_passes, use_channels
from tests.pass_helpers import apply, traced


@pipeline.step(execution_mode="actors", idempotent=True)
class Pre:
    def __call__(self, x: int) -> int:
        return x + 1


@pipeline.step(execution_mode="actors", max_batch_size=8, idempotent=True)
class Model:
    def __call__(self, xs: list[int]) -> list[float]:
        return [x / 2 for x in xs]


@pipeline.step(execution_mode="actors")
class Post:
    def __call__(self, x: float) -> str:
        return str(x)


@pipeline.step(execution_mode="tasks", idempotent=True)
def t1(x: int) -> int:
    return x


@pipeline.step(execution_mode="tasks")
def t2(x: int) -> int:
    return x


@pipeline.step(execution_mode="tasks", idempotent=True)
def t3(x: int) -> int:
    return x


# -- options --


def test_options_become_the_steps_placement() -> None:
    graph = traced(Post()(Model()(Pre()(pipeline.INPUT)))).graph
    assert graph.step("Model").placement == Placement(
        mode="actors", batching=Batching(max_batch_size=8, batch_wait_timeout_s=0.01), idempotent=True
    )
    assert graph.step("Pre").placement == Placement(mode="actors", idempotent=True)
    assert graph.step("Post").placement == Placement(mode="actors")


def test_batch_wait_timeout_is_kept() -> None:
    step = pipeline.step(execution_mode="actors", max_batch_size=4, batch_wait_timeout_s=0)(lambda xs: xs)
    assert (step.options.max_batch_size, step.options.batch_wait_timeout_s) == (4, 0.0)
    graph = traced(step(pipeline.INPUT)).graph
    assert graph.steps[0].placement.batching == Batching(max_batch_size=4, batch_wait_timeout_s=0.0)


def test_batched_steps_are_typed_per_item() -> None:
    """The callable takes list[int] and returns list[float]; a call passes
    one int and gets one float, and that is what types are checked on."""
    graph = traced(Post()(Model()(Pre()(pipeline.INPUT)))).graph
    model = graph.step("Model")
    assert render(model.params[0].type) == "int" and render(model.returns) == "float"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_batch_size": 8}, ValueError, r"step 'f': max_batch_size=8 needs execution_mode='actors' \(got 'local'\)"),
        ({"execution_mode": "tasks", "max_batch_size": 8}, ValueError, r"max_batch_size=8 needs execution_mode='actors'"),
        ({"execution_mode": "actors", "max_batch_size": 0}, ValueError, r"step 'f': max_batch_size must be at least 1, got 0"),
        ({"execution_mode": "actors", "max_batch_size": 2.0}, TypeError, r"step 'f': max_batch_size must be an int, not float"),
        ({"execution_mode": "actors", "max_batch_size": True}, TypeError, r"max_batch_size must be an int, not bool"),
        ({"execution_mode": "actors", "batch_wait_timeout_s": 0.1}, ValueError, r"step 'f': batch_wait_timeout_s .* needs max_batch_size"),
        ({"execution_mode": "actors", "max_batch_size": 2, "batch_wait_timeout_s": -1}, ValueError, r"batch_wait_timeout_s must be >= 0"),
        ({"execution_mode": "actors", "max_batch_size": 2, "batch_wait_timeout_s": "1"}, TypeError, r"batch_wait_timeout_s must be a number"),
        ({"idempotent": True}, ValueError, r"step 'f': idempotent=True applies to execution_mode='tasks' or 'actors'"),
        ({"execution_mode": "tasks", "idempotent": 1}, TypeError, r"step 'f': idempotent must be True or False"),
    ],
)
def test_invalid_serving_options_name_the_step_and_option(options: dict[str, object], error: type[Exception], message: str) -> None:
    def f(x: int) -> int:
        return x

    with pytest.raises(error, match=message):
        pipeline.step(**options)(f)  # type: ignore[call-overload]


# -- printing and JSON --


def test_dump_shows_batching_and_retry() -> None:
    assert traced(Post()(Model()(Pre()(pipeline.INPUT))), name="p").graph.dump() == (
        "pipeline p(%0: Any) -> str:\n"
        "  %1: int = Pre()(%0)                           # actors retry\n"
        "  %2: float = Model()(%1)                       # actors batch<=8/10ms retry\n"
        "  %3: str = Post()(%2)                          # actors\n"
        "  return %3"
    )


def test_placement_text_orders_every_field() -> None:
    p = Placement(
        mode="actors", num_replicas=2, num_cpus=1, num_gpus=0.5, colocate="c1",
        batching=Batching(max_batch_size=16, batch_wait_timeout_s=0.0025), idempotent=True,
    )
    assert placement_text(p) == "actors x2 cpu=1 gpu=0.5 batch<=16/2.5ms colocate=c1 retry"
    assert placement_text(Placement()) == ""


def test_json_round_trip_keeps_the_placement() -> None:
    graph = traced(Post()(Model()(Pre()(pipeline.INPUT)))).graph
    data = msgspec.json.decode(graph.to_json())
    assert data["steps"][1]["placement"] == {
        "mode": "actors",
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
        "idempotent": True,
    }
    assert Graph.from_json(graph.to_json()) == graph


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        (Placement(mode="actors", channel=True, batching=Batching(max_batch_size=2)), "a batched unit cannot use a channel"),
        (Placement(mode="actors", batching=Batching(max_batch_size=0)), "max_batch_size must be at least 1"),
        (Placement(mode="actors", batching=Batching(max_batch_size=2, batch_wait_timeout_s=-1)), "batch_wait_timeout_s must be >= 0"),
        (Placement(idempotent=True), "idempotent=True applies to 'tasks' and 'actors' units"),
    ],
)
def test_verify_checks_the_placement(placement: Placement, message: str) -> None:
    graph = traced(Pre()(pipeline.INPUT)).graph
    bad = msgspec.structs.replace(graph, steps=(msgspec.structs.replace(graph.steps[0], placement=placement),))
    with pytest.raises(GraphError, match=f"step 'Pre': {message}"):
        verify(bad)


def test_verify_rejects_a_batched_step_inside_a_group() -> None:
    graph = apply(colocate_actors, traced(Pre()(Pre()(pipeline.INPUT))).graph).graph
    batched = Placement(mode="actors", batching=Batching(max_batch_size=2))
    bad = msgspec.structs.replace(graph, steps=tuple(msgspec.structs.replace(s, placement=batched) for s in graph.steps))
    with pytest.raises(GraphError, match="holds batched step 'Pre': a batched step is a unit of its own"):
        verify(bad)


# -- passes --


def test_colocate_actors_keeps_a_batched_step_its_own_unit() -> None:
    graph = traced(Post()(Model()(Pre()(pipeline.INPUT)))).graph
    result = apply(colocate_actors, graph)
    assert result.graph is graph
    assert result.rewrites == (
        "kept Model %2 as its own unit: it is batched (max_batch_size=8), its callable takes and returns a list, "
        "so it cannot run inline with steps that take one value",
    )


def test_a_lone_batched_step_needs_no_note() -> None:
    result = apply(colocate_actors, traced(Model()(pipeline.INPUT)).graph)
    assert result.rewrites == ()


def test_a_group_is_idempotent_only_if_every_member_is() -> None:
    all_retry = apply(fuse_tasks, traced(t3(t1(pipeline.INPUT))).graph).graph
    some_retry = apply(fuse_tasks, traced(t3(t2(t1(pipeline.INPUT)))).graph).graph
    for graph, idempotent in ((all_retry, True), (some_retry, False)):
        fused = graph.nodes[-1]
        assert isinstance(fused, Fused) and fused.placement.idempotent is idempotent
    assert "# tasks retry, 2 nodes" in all_retry.dump()


def test_use_channels_skips_a_batched_unit() -> None:
    graph = traced(Model()(pipeline.INPUT)).graph
    result = apply(use_channels, graph)
    assert result.graph is graph
    assert result.rewrites == ("Model keeps actor tasks: %1 cannot use a channel, it is batched, and a channel carries one call at a time",)


@pipeline.step(execution_mode="tasks")
def load(x: int) -> torch.Tensor:
    return torch.zeros(x)


@pipeline.step(execution_mode="actors", max_batch_size=4)
def embed(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return xs


def test_colocate_labels_a_batched_unit_like_any_other() -> None:
    graph = apply(colocate, traced(embed(load(pipeline.INPUT))).graph).graph
    assert {s.name: s.placement.colocate for s in graph.steps} == {"load": "c1", "embed": "c1"}
    assert graph.step("embed").placement.batching == Batching(max_batch_size=4)


def test_force_backend_keeps_batching_and_drops_idempotent_on_local() -> None:
    graph = traced(Post()(Model()(Pre()(pipeline.INPUT)))).graph
    local, records = run_passes(graph, [functools.partial(force_backend, backend="local")], verify_each=True)
    assert local.step("Model").placement == Placement(batching=Batching(max_batch_size=8))
    assert records[0].rewrites[1] == (
        "step 'Model': actors -> local, as compile(backend='local') asks "
        "(idempotent dropped: a local call has no replica to lose; each call is a batch of one)"
    )
    tasks, _ = run_passes(graph, [functools.partial(force_backend, backend="tasks")], verify_each=True)
    assert tasks.step("Model").placement.idempotent


def test_fuse_local_and_default_passes_leave_batching_alone() -> None:
    compiled = pipeline.compile(Post()(Model()(Pre()(pipeline.INPUT))), debug=True)
    assert compiled.graph.step("Model").placement.batching == Batching(max_batch_size=8)
    assert "kept Model %2 as its own unit" in compiled.explain()
    assert apply(fuse_local, compiled.graph).graph is compiled.graph


# -- graph lookups --


def test_callers_units_and_placements() -> None:
    x = Pre()(pipeline.INPUT)
    graph = pipeline.compile((t3(t1(x)), Post()(Model()(x))), debug=True).graph
    fused = next(n for n in graph.nodes if isinstance(n, Fused))
    inner = next(b for b in fused.body if isinstance(b, Call) and b.step == "t1")
    assert graph.callers("t1") == (inner,)
    assert graph.unit_of(inner.id) is fused and graph.unit_of(fused.id) is fused
    assert graph.placement_of(inner.id) == fused.placement == Placement(mode="tasks", idempotent=True)
    model = graph.callers("Model")[0]
    assert graph.unit_of(model.id) is model
    assert graph.placement_of(model.id) == graph.step("Model").placement
    assert graph.unit_of(0) is None and graph.placement_of(0) == Placement()
    assert graph.modes() == {"tasks", "actors"}
    assert [u.id for u in graph.units()] == [n.id for n in graph.nodes if isinstance(n, (Call, Fused))]
    with pytest.raises(KeyError, match="no node %999"):
        graph.unit_of(999)