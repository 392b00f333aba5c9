"""fuse_tasks: what it fuses (chains, fan-in, projections, resources) and
what it must not (GPU boundary, fuse=False, switches, fan-out, outputs,
other modes). Golden dumps before and after."""

from __future__ import annotations

import pipeline_ir as pipeline
from pass_helpers import apply, same_results, traced
from pipeline_ir.passes import fuse_tasks


@pipeline.step(execution_mode="tasks")
def load(x: int) -> int:
    return x + 1


@pipeline.step(execution_mode="tasks", num_cpus=2)
def parse(x: int) -> int:
    return x * 2


@pipeline.step(execution_mode="tasks")
def score(x: int) -> int:
    return x - 3


@pipeline.step(execution_mode="tasks", num_gpus=1)
def infer(x: int) -> int:
    return x * 5


@pipeline.step(execution_mode="tasks", num_gpus=1)
def refine(x: int) -> int:
    return x + 7


@pipeline.step(execution_mode="tasks", fuse=False)
def audit(x: int) -> int:
    return x


@pipeline.step(execution_mode="tasks")
def split(x: int) -> tuple[int, int]:
    return x, -x


@pipeline.step(execution_mode="tasks")
def add(a: int, b: int) -> int:
    return a + b


@pipeline.step
def inline(x: int) -> int:
    return x


@pipeline.step(execution_mode="actors")
class Scale:
    def __call__(self, x: int) -> int:
        return 3 * x


INPUTS = [0, 1, 2, 5]


def test_chain_becomes_one_task_asking_for_the_most_cpus() -> None:
    compiled = traced(score(parse(load(pipeline.INPUT))))
    assert compiled.graph.dump() == (
        "pipeline score(%0: Any) -> int:\n"
        "  %1: int = load(%0)                            # tasks\n"
        "  %2: int = parse(%1)                           # tasks cpu=2\n"
        "  %3: int = score(%2)                           # tasks\n"
        "  return %3"
    )
    result = apply(fuse_tasks, compiled.graph)
    assert result.graph.dump() == (
        "pipeline score(%0: Any) -> int:\n"
        "  %4: int = fused tasks {                       # tasks cpu=2, 3 nodes\n"
        "    %1: int = load(%0)                          # tasks\n"
        "    %2: int = parse(%1)                         # tasks cpu=2\n"
        "    %3: int = score(%2)                         # tasks\n"
        "  } -> %3\n"
        "  return %4"
    )
    assert result.rewrites == (
        "fused load %1, parse %2, score %3 into %4 (tasks cpu=2): adjacent TASKS steps run as one Ray task",
    )
    same_results(compiled, result.graph, INPUTS)


def test_never_across_a_gpu_boundary_but_gpu_steps_fuse_together() -> None:
    compiled = traced(refine(infer(score(load(pipeline.INPUT)))))
    result = apply(fuse_tasks, compiled.graph)
    assert result.graph.dump() == (
        "pipeline refine(%0: Any) -> int:\n"
        "  %5: int = fused tasks {                       # tasks, 2 nodes\n"
        "    %1: int = load(%0)                          # tasks\n"
        "    %2: int = score(%1)                         # tasks\n"
        "  } -> %2\n"
        "  %6: int = fused tasks {                       # tasks gpu=1, 2 nodes\n"
        "    %3: int = infer(%5)                         # tasks gpu=1\n"
        "    %4: int = refine(%3)                        # tasks gpu=1\n"
        "  } -> %4\n"
        "  return %6"
    )
    same_results(compiled, result.graph, INPUTS)


def test_fuse_false_step_stays_alone_and_breaks_the_chain() -> None:
    compiled = traced(score(audit(load(pipeline.INPUT))))
    result = apply(fuse_tasks, compiled.graph)
    assert result.graph is compiled.graph
    assert result.rewrites == ()


def test_fan_out_node_is_never_inside_a_group_but_fan_in_merges() -> None:
    x = load(pipeline.INPUT)
    compiled = traced(add(parse(x), score(x)))
    result = apply(fuse_tasks, compiled.graph)
    # %1 has two readers: it stays outside; both branches join their reader.
    assert result.graph.dump() == (
        "pipeline add(%0: Any) -> int:\n"
        "  %1: int = load(%0)                            # tasks\n"
        "  %5: int = fused tasks {                       # tasks cpu=2, 3 nodes\n"
        "    %2: int = parse(%1)                         # tasks cpu=2\n"
        "    %3: int = score(%1)                         # tasks\n"
        "    %4: int = add(%2, %3)                       # tasks\n"
        "  } -> %4\n"
        "  return %5"
    )
    same_results(compiled, result.graph, INPUTS)


def test_projection_of_a_single_reader_joins_the_group() -> None:
    compiled = traced(score(split(load(pipeline.INPUT))[1]))
    result = apply(fuse_tasks, compiled.graph)
    assert result.graph.dump() == (
        "pipeline score(%0: Any) -> int:\n"
        "  %5: int = fused tasks {                       # tasks, 4 nodes\n"
        "    %1: int = load(%0)                          # tasks\n"
        "    %2: tuple[int, int] = split(%1)             # tasks\n"
        "    %3: int = %2[1]\n"
        "    %4: int = score(%3)                         # tasks\n"
        "  } -> %4\n"
        "  return %5"
    )
    same_results(compiled, result.graph, INPUTS)


def test_node_read_by_two_projections_ends_its_group() -> None:
    s = split(load(pipeline.INPUT))
    compiled = traced(add(s[0], s[1]))
    result = apply(fuse_tasks, compiled.graph)
    assert result.graph.dump() == (
        "pipeline add(%0: Any) -> int:\n"
        "  %6: tuple[int, int] = fused tasks {           # tasks, 2 nodes\n"
        "    %1: int = load(%0)                          # tasks\n"
        "    %2: tuple[int, int] = split(%1)             # tasks\n"
        "  } -> %2\n"
        "  %3: int = %6[0]\n"
        "  %4: int = %6[1]\n"
        "  %5: int = add(%3, %4)                         # tasks\n"
        "  return %5"
    )
    same_results(compiled, result.graph, INPUTS)


def test_never_across_a_switch_each_arm_fuses_on_its_own() -> None:
    k = load(pipeline.INPUT)
    arms = {1: parse(load(pipeline.INPUT)), 2: score(parse(pipeline.INPUT))}
    compiled = traced(score(pipeline.switch(k, arms, default=k)))
    result = apply(fuse_tasks, compiled.graph)
    assert result.graph.dump() == (
        "pipeline score(%0: Any) -> int:\n"
        "  %1: int = load(%0)                            # tasks\n"
        "  %8: int = fused tasks {                       # tasks cpu=2, 2 nodes\n"
        "    %2: int = load(%0)                          # tasks\n"
        "    %3: int = parse(%2)                         # tasks cpu=2\n"
        "  } -> %3\n"
        "  %9: int = fused tasks {                       # tasks cpu=2, 2 nodes\n"
        "    %4: int = parse(%0)                         # tasks cpu=2\n"
        "    %5: int = score(%4)                         # tasks\n"
        "  } -> %5\n"
        "  %6: int = switch %1 {1: %8, 2: %9} default %1\n"
        "  %7: int = score(%6)                           # tasks\n"
        "  return %7"
    )
    same_results(compiled, result.graph, [-1, 0, 1, 4])


def test_an_output_read_elsewhere_is_never_inside_a_group() -> None:
    y = load(pipeline.INPUT)
    compiled = traced((parse(y), y))
    result = apply(fuse_tasks, compiled.graph)
    assert result.graph is compiled.graph


def test_outputs_are_group_ends() -> None:
    compiled = traced((parse(load(pipeline.INPUT)), load(pipeline.INPUT)))
    result = apply(fuse_tasks, compiled.graph)
    assert result.graph.outputs == (4, 3)
    assert result.graph.dump().endswith("  %3: int = load(%0)                            # tasks\n  return %4, %3")
    same_results(compiled, result.graph, INPUTS)


def test_local_and_actor_steps_are_not_tasks() -> None:
    compiled = traced(score(inline(load(pipeline.INPUT))))
    assert apply(fuse_tasks, compiled.graph).graph is compiled.graph
    compiled = traced(score(Scale()(load(pipeline.INPUT))))
    assert apply(fuse_tasks, compiled.graph).graph is compiled.graph


def test_after_compile_backend_tasks_everything_fuses() -> None:
    compiled = pipeline.compile(score(Scale()(inline(pipeline.INPUT))), backend="tasks", passes=[fuse_tasks], debug=True)
    assert [type(n).__name__ for n in compiled.graph.nodes] == ["Input", "Fused"]
    assert "fused inline %1, Scale %2, score %3 into %4 (tasks)" in compiled.explain()
