"""Lowering a whole graph: pick each mode's launcher, generate the program.

`lower()` is what `deploy()` calls. It imports the Ray backends (and so Ray)
only when the graph has a TASKS or ACTORS node, and returns a `Program`: the
generated sync and async entry points plus what must be closed at shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from pipeline_ir.backends.codegen import Launcher, PythonCode, generate, translate_error
from pipeline_ir.backends.local import LocalLauncher
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Mode
from pipeline_ir.trace import Bindings


@dataclass
class Program:
    """A deployed graph: generated entry points and their resources."""

    graph: Graph
    run: Callable[[object], object]
    arun: Callable[[object], Awaitable[object]]
    code: PythonCode
    async_code: PythonCode
    uses_ray: bool
    closers: list[Callable[[], None]] = field(default_factory=list)

    def translate(self, exc: BaseException, is_async: bool = False) -> BaseException:
        """The user-facing error for an exception raised by run/arun."""
        return translate_error(exc, self.async_code if is_async else self.code, self.graph)

    def close(self) -> None:
        """Release every resource (actors); idempotent."""
        closers, self.closers = self.closers, []
        for close in reversed(closers):
            close()


def needs_ray(graph: Graph) -> bool:
    """Whether deploying `graph` needs Ray (a TASKS or ACTORS node)."""
    return bool(graph.modes() & {"tasks", "actors"})


def cluster_gpus() -> float:
    """The GPUs of the Ray cluster this process joins (starting Ray if
    needed): what the place_gpu pass decides with at deploy."""
    from pipeline_ir.backends import ray_runtime

    return ray_runtime.cluster_gpus()


def local_keys(graph: Graph) -> list[str]:
    """Step keys called in this process: local calls and local fused bodies."""
    return [s.key for s in graph.steps if not s.placement.remote]


def lower(graph: Graph, bindings: Bindings) -> Program:
    """Build everything `graph` needs and return its Program."""
    batched = [s.name for s in graph.steps if s.placement.batching is not None]
    if batched:
        # Running them one item at a time would hand a list-taking callable
        # single values: fail loudly until the batching runtime exists.
        raise NotImplementedError(
            f"step {batched[0]!r}: max_batch_size is recorded in the graph, but this version cannot run "
            "batched steps yet; remove max_batch_size (docs/user-guide.md, 'Not implemented yet')"
        )
    used = graph.modes()
    closers: list[Callable[[], None]] = []
    launchers: dict[Mode, Launcher] = {"local": LocalLauncher(graph, bindings.steps, local_keys(graph))}
    runtime: dict[str, object] = {}
    uses_ray = needs_ray(graph)
    try:
        if uses_ray:
            from pipeline_ir.backends import ray_runtime

            ray_runtime.ensure_ray()
            runtime.update(ray_runtime.runtime_globals(graph))
        # colocate label -> Ray node id. Actors are placed first, so tasks
        # sharing a label with them follow them to their node.
        colocation: dict[str, str] = {}
        if "actors" in used:
            from pipeline_ir.backends.ray_actors import ActorLauncher

            actors = ActorLauncher(graph, bindings, colocation)
            closers.append(actors.close)
            launchers["actors"] = actors
        if "tasks" in used:
            from pipeline_ir.backends.ray_tasks import TaskLauncher

            launchers["tasks"] = TaskLauncher(graph, bindings, colocation)
        code = generate(graph, launchers, bindings.constants, runtime)
        async_code = generate(graph, launchers, bindings.constants, runtime, is_async=True)
        run = code.load()
        # The async source defines `async def arun`: calling it gives a coroutine.
        arun = cast(Callable[[object], Awaitable[object]], async_code.load())
    except BaseException:
        for close in closers:
            close()
        raise
    return Program(graph, run, arun, code, async_code, uses_ray, closers)
