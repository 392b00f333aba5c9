"""fuse_tasks: adjacent TASKS steps become one Ray task.

Each Ray task costs a scheduling round trip and an object-store put/get of
its result; a chain of task steps fused into one group runs as a single
task whose body calls the steps in order, in one worker, passing values as
plain Python objects.

Rules (the grouping itself is shared with the other fusion passes, see
grouping.py, which also explains why a group never spans a switch):

- only TASKS steps with `fuse=True` join a group;
- steps join only steps asking for the same GPU share (`gpu_class`), so a
  CPU step never runs holding a GPU;
- the task asks for the most CPUs any member asks for (`combined_cpus`).

Class steps in TASKS mode fuse like functions: a TASKS step has no replica
pool whose state calls could share, so fusing cannot split one.
"""

from __future__ import annotations

from collections.abc import Hashable

from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Placement, StepSpec
from pipeline_ir.passes.grouping import combined_cpus, combined_gpus, fuse_pass, gpu_class
from pipeline_ir.passes.manager import PassResult


def _task_class(step: StepSpec) -> Hashable | None:
    if step.placement.mode != "tasks" or not step.fuse:
        return None
    return ("tasks", gpu_class(step))


def _one_task(steps: list[StepSpec]) -> Placement:
    return Placement(mode="tasks", num_cpus=combined_cpus(steps), num_gpus=combined_gpus(steps))


def fuse_tasks(graph: Graph) -> PassResult:
    """Fuse each convex group of TASKS calls with one output into one task."""
    return fuse_pass(graph, _task_class, _one_task, "adjacent TASKS steps run as one Ray task")
