"""colocate: tensor edges between remote units that stayed separate get a
shared label, and the records say why each edge stayed a cross-process hop.
Never labels untyped or non-tensor edges, edges to or from LOCAL nodes,
or tensors that pass through the caller."""

from __future__ import annotations

import numpy as np
import torch

import pipeline_ir as pipeline
from pass_helpers import apply, traced
from pipeline_ir.ir.nodes import Fused
from pipeline_ir.ir.types import TypeRef, from_annotation
from pipeline_ir.passes import colocate, colocate_actors, fuse_tasks, run_passes
from pipeline_ir.passes.colocate import is_tensor


@pipeline.step(execution_mode="tasks")
def decode(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8)


@pipeline.step(execution_mode="tasks")
def resize(a: np.ndarray) -> np.ndarray:
    return a[:2]


@pipeline.step(execution_mode="tasks", fuse=False)
def crop(a: np.ndarray) -> np.ndarray:
    return a[:2]


@pipeline.step(execution_mode="actors", num_gpus=1)
class Model:
    def __call__(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a)


@pipeline.step(execution_mode="actors", num_gpus=1, num_replicas=2)
class Head:
    def __call__(self, t: torch.Tensor) -> int:
        return int(t.sum())


@pipeline.step(execution_mode="actors", num_gpus=1)
class Tail:
    def __call__(self, t: torch.Tensor) -> int:
        return int(t.sum())


@pipeline.step(execution_mode="tasks")
def untyped(a):  # type: ignore[no-untyped-def]
    return a


@pipeline.step(execution_mode="tasks")
def wants(a: np.ndarray) -> int:
    return int(a.sum())


@pipeline.step(execution_mode="tasks", num_gpus=1)
def gpu_wants(a: np.ndarray) -> int:
    return int(a.sum())


@pipeline.step(execution_mode="tasks")
def count(n: int) -> int:
    return n + 1


@pipeline.step
def local_sum(a: np.ndarray) -> int:
    return int(a.sum())


@pipeline.step(execution_mode="tasks")
def pair(b: bytes) -> tuple[np.ndarray, int]:
    return np.frombuffer(b, dtype=np.uint8), 1


def test_tensor_types() -> None:
    assert is_tensor(from_annotation(torch.Tensor)) and is_tensor(from_annotation(np.ndarray))
    assert is_tensor(from_annotation(torch.nn.Parameter))  # a subclass
    assert is_tensor(from_annotation(np.ndarray | None))
    assert not is_tensor(from_annotation(list[float])) and not is_tensor(TypeRef(name="typing.Any"))


def test_labels_a_chain_and_says_why_each_hop_stayed_remote() -> None:
    compiled = traced(Head()(Model()(crop(decode(pipeline.INPUT)))))
    result = apply(colocate, compiled.graph)
    assert result.graph.dump() == (
        "pipeline Head(%0: Any) -> int:\n"
        "  %1: ndarray = decode(%0)                      # tasks colocate=c1\n"
        "  %2: ndarray = crop(%1)                        # tasks colocate=c1 nofuse\n"
        "  %3: Tensor = Model()(%2)                      # actors gpu=1 colocate=c1\n"
        "  %4: int = Head()(%3)                          # actors x2 gpu=1 colocate=c1\n"
        "  return %4"
    )
    assert result.rewrites == (
        "%1 -> %2 (ndarray, decode -> crop) stays a cross-process hop: crop has fuse=False; colocate=c1 puts both ends on one node",
        "%2 -> %3 (ndarray, crop -> Model) stays a cross-process hop: one end runs as tasks, the other as actors; "
        "colocate=c1 puts both ends on one node",
        "%3 -> %4 (Tensor, Model -> Head) stays a cross-process hop: replica counts differ (x1 vs x2); "
        "colocate=c1 puts both ends on one node",
    )


def test_labels_fused_groups_and_ignores_edges_inside_them() -> None:
    compiled = traced(Tail()(Model()(resize(decode(pipeline.INPUT)))))
    fused, _ = run_passes(compiled.graph, [fuse_tasks, colocate_actors])
    result = apply(colocate, fused)
    assert result.graph.dump() == (
        "pipeline Tail(%0: Any) -> int:\n"
        "  %5: ndarray = fused tasks {                   # tasks colocate=c1, 2 nodes\n"
        "    %1: ndarray = decode(%0)                    # tasks\n"
        "    %2: ndarray = resize(%1)                    # tasks\n"
        "  } -> %2\n"
        "  %6: int = fused actors {                      # actors gpu=1 colocate=c1, 2 nodes\n"
        "    %3: Tensor = Model()(%5)                    # actors gpu=1\n"
        "    %4: int = Tail()(%3)                        # actors gpu=1\n"
        "  } -> %4\n"
        "  return %6"
    )
    assert result.rewrites == (
        "%5 -> %6 (ndarray, decode+resize -> Model+Tail) stays a cross-process hop: one end runs as tasks, "
        "the other as actors; colocate=c1 puts both ends on one node",
    )
    assert isinstance(result.graph.nodes[1], Fused) and result.graph.steps == fused.steps  # labels on groups only


def test_untyped_value_is_typed_by_the_parameter_it_reaches() -> None:
    compiled = traced(wants(untyped(pipeline.INPUT)))
    result = apply(colocate, compiled.graph)
    assert [s.placement.colocate for s in result.graph.steps] == ["c1", "c1"]
    assert result.rewrites == (
        "%1 -> %2 (ndarray, untyped -> wants) stays a cross-process hop: no fusion pass merged them "
        "(fuse_tasks / colocate_actors did not run); colocate=c1 puts both ends on one node",
    )


def test_non_tensor_and_local_edges_are_left_alone() -> None:
    for node in (count(count(pipeline.INPUT)), local_sum(decode(pipeline.INPUT)), untyped(untyped(pipeline.INPUT))):
        compiled = traced(node)
        result = apply(colocate, compiled.graph)
        assert result.graph is compiled.graph
        assert result.rewrites == ()


def test_tensor_through_a_projection_is_reported_not_labelled() -> None:
    p = pair(pipeline.INPUT)
    compiled = traced((wants(p[0]), p[1]))
    result = apply(colocate, compiled.graph)
    assert result.graph is compiled.graph
    assert result.rewrites == (
        "left %1 -> %3 (ndarray, pair -> wants) remote: the value is projected by %2 in the caller, "
        "so it goes through the caller",
    )


def test_fan_out_and_gpu_boundary_are_named() -> None:
    d = decode(pipeline.INPUT)
    compiled = traced((wants(d), gpu_wants(d)))
    result = apply(colocate, compiled.graph)
    assert result.rewrites == (
        "%1 -> %2 (ndarray, decode -> wants) stays a cross-process hop: %1 has several readers (%2, %3), "
        "and a fused group has one output; colocate=c1 puts both ends on one node",
        "%1 -> %3 (ndarray, decode -> gpu_wants) stays a cross-process hop: GPU boundary (gpu=0 vs gpu=1); "
        "colocate=c1 puts both ends on one node",
    )


def test_unconnected_edges_get_different_labels_and_shared_steps_join_them() -> None:
    compiled = traced((wants(decode(pipeline.INPUT)), wants(decode(pipeline.INPUT[0]))))
    result = apply(colocate, compiled.graph)
    # decode and wants are called twice each, but each is one StepSpec (one
    # unit), so both edges join one label.
    assert {s.name: s.placement.colocate for s in result.graph.steps} == {"decode": "c1", "wants": "c1"}
    m, h = Model(), Tail()
    compiled = traced((wants(decode(pipeline.INPUT)), h(m(pipeline.INPUT))))
    result = apply(colocate, compiled.graph)
    assert {s.name: s.placement.colocate for s in result.graph.steps} == {"decode": "c1", "wants": "c1", "Model": "c2", "Tail": "c2"}


def _wants(a: np.ndarray) -> int:
    return int(a.sum())


def test_a_wide_fan_out_names_a_few_readers_and_counts_the_rest() -> None:
    # Twelve task steps read one array: each edge's record lists eight
    # readers and says how many more, so records stay short however wide.
    d = decode(pipeline.INPUT)
    readers = tuple(pipeline.step(execution_mode="tasks", name=f"w{i}")(_wants)(d) for i in range(12))
    result = apply(colocate, traced(readers).graph)
    assert len(result.rewrites) == 12
    assert result.rewrites[0] == (
        "%1 -> %2 (ndarray, decode -> w0) stays a cross-process hop: %1 has several readers "
        "(%2, %3, %4, %5, %6, %7, %8, %9 and 4 more), and a fused group has one output; "
        "colocate=c1 puts both ends on one node"
    )
    assert {s.placement.colocate for s in result.graph.steps} == {"c1"}


def test_a_long_fused_group_is_labelled_by_its_first_and_last_steps() -> None:
    # Ten tasks steps fused into one group, read by two GPU steps that cannot join it.
    node = pipeline.INPUT
    for i in range(10):
        node = pipeline.step(execution_mode="tasks", name=f"t{i}")(_identity)(node)
    compiled = traced((gpu_wants(node), gpu_wants(node)))
    fused = run_passes(compiled.graph, [fuse_tasks])[0]
    result = apply(colocate, fused)
    assert "(ndarray, t0+t1+t2+t3+t4+t5+...+t9 -> gpu_wants)" in result.rewrites[0]


def _identity(a: np.ndarray) -> np.ndarray:
    return a


@pipeline.step(execution_mode="actors")
class Scale:
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t * 2


@pipeline.step(execution_mode="actors", num_gpus=1)
class Refine:
    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t + 1


def test_a_hop_left_by_the_fold_names_the_fold_rule_not_a_gpu_boundary() -> None:
    # Scale folds into Model's actor; Refine, a second GPU step, keeps its own.
    compiled = traced(Refine()(Scale()(Model()(decode(pipeline.INPUT)))))
    folded, _ = run_passes(compiled.graph, [colocate_actors])
    result = apply(colocate, folded)
    assert result.rewrites[-1] == (
        "%5 -> %4 (Tensor, Model+Scale -> Refine) stays a cross-process hop: a small CPU step joins one GPU step's "
        "actor, and colocate_actors never merges two GPU steps' actors through it; colocate=c1 puts both ends on one node"
    )
