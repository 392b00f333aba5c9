"""Lowering a whole graph: pick each mode's launcher, generate the program.

`lower()` is what `deploy()` calls. It imports the Ray backends (and so Ray)
only when the graph has a TASKS or ACTORS node, and returns a `Program`: the
generated sync and async entry points plus what must be closed at shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from pipeline_ir.backends import calls
from pipeline_ir.backends.codegen import Launcher, PythonCode, generate, translate_error
from pipeline_ir.backends.local import LocalLauncher
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Fused, Mode
from pipeline_ir.options import DeployOptions
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

    live: set[calls.CallState] = field(default_factory=set)  # calls running now

    def translate(self, exc: BaseException, is_async: bool = False) -> BaseException:
        """The user-facing error for an exception raised by run/arun."""
        return translate_error(exc, self.async_code if is_async else self.code, self.graph)

    def call(self, x: object, timeout: float | None = None) -> object:
        """One call with an optional deadline; on failure, what the call
        left running is cancelled before the error is raised."""
        state, token = calls.begin(timeout)
        self.live.add(state)
        try:
            return self.run(x)
        except BaseException as e:
            if self.uses_ray:
                state.cancel_unfinished()
            raise self.translate(e)  # noqa: B904 (a StepError carries its cause)
        finally:
            self.live.discard(state)
            calls.end(token)

    async def acall(self, x: object, timeout: float | None = None) -> object:
        """`call` for asyncio. Cancelling the awaiting task (asyncio.wait_for,
        a client gone) cancels the call's remote work too."""
        state, token = calls.begin(timeout)
        self.live.add(state)
        try:
            return await self.arun(x)
        except BaseException as e:
            if self.uses_ray:
                state.cancel_unfinished()
            raise self.translate(e, is_async=True)  # noqa: B904
        finally:
            self.live.discard(state)
            calls.end(token)

    def close(self) -> None:
        """Cancel the calls still running, then release every resource
        (actors); idempotent."""
        if self.uses_ray:
            for state in list(self.live):
                state.cancel_unfinished(force=True)
        closers, self.closers = self.closers, []
        for close in reversed(closers):
            close()


def modes(graph: Graph) -> set[Mode]:
    """The execution modes a graph's top-level nodes run in."""
    used: set[Mode] = set()
    for n in graph.nodes:
        if isinstance(n, Call):
            used.add(graph.step(n.step).mode)
        elif isinstance(n, Fused):
            used.add(n.mode)
    return used


def needs_ray(graph: Graph) -> bool:
    """Whether deploying `graph` needs Ray (a TASKS or ACTORS node)."""
    return bool(modes(graph) & {"tasks", "actors"})


def cluster_gpus() -> float:
    """The GPUs of the Ray cluster this process joins (starting Ray if
    needed): what the place_gpu pass decides with at deploy."""
    from pipeline_ir.backends import ray_runtime

    return ray_runtime.cluster_gpus()


def local_keys(graph: Graph) -> list[str]:
    """Step keys called in this process: local calls and local fused bodies."""
    keys: dict[str, None] = {}
    for n in graph.all_nodes():
        if isinstance(n, Call) and graph.step(n.step).mode == "local":
            keys[n.step] = None
    return list(keys)


def lower(graph: Graph, bindings: Bindings, options: DeployOptions | None = None) -> Program:
    """Build everything `graph` needs and return its Program."""
    options = options if options is not None else DeployOptions()
    used = modes(graph)
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
