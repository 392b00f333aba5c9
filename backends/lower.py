"""Lowering a whole graph: pick each mode's launcher, generate the program.

`lower()` is what `deploy()` calls. It imports the Ray backends (and so Ray)
only when the graph has a TASKS or ACTORS node, and returns a `Program`: the
generated sync and async entry points plus what must be closed at shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from pipeline_ir.backends import calls
from pipeline_ir.backends.codegen import Launcher, PythonCode, generate, translate_error, unreturned_at
from pipeline_ir.backends.local import LocalLauncher
from pipeline_ir.backends.stats import PipelineStats
from pipeline_ir.backends.stats import TIMED_EVERY
from pipeline_ir.backends.stats import clock as stats_clock
from pipeline_ir.backends.stats import export as export_stats
from pipeline_ir.bindings import Bindings
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Mode
from pipeline_ir.options import DeployOptions

if TYPE_CHECKING:
    from pipeline_ir.passes.place_cluster import Cluster


@dataclass
class Program:
    """A deployed graph: generated entry points and their resources."""

    graph: Graph
    # The entry points; each hands one call in TIMED_EVERY to its timed
    # twin (LOCAL steps timed), whose lines their PythonCode also knows.
    run: Callable[[object], object]
    arun: Callable[[object], Awaitable[object]]
    code: PythonCode
    async_code: PythonCode
    uses_ray: bool
    stats: PipelineStats
    closers: list[Callable[[], None]] = field(default_factory=list)
    launchers: dict[Mode, Launcher] = field(default_factory=dict)
    live: set[calls.CallState] = field(default_factory=set)  # Ray calls running now

    def failure(self, exc: BaseException, code: PythonCode, state: calls.CallState | None) -> BaseException:
        """The user-facing error for `exc`, raised by the program of `code`;
        what the call left running is cancelled and the error counted."""
        if state is not None:
            state.cancel_unfinished()
        self.stats.unreturned(unreturned_at(exc, code))
        error = translate_error(exc, code, self.graph)
        self.stats.failed(getattr(error, "node_id", None))
        return error

    def call(self, x: object, timeout: float | None = None) -> object:
        """One call with an optional deadline; on failure, what the call
        left running is cancelled before the error is raised.

        The deadline bounds the waits for remote work: LOCAL steps run in
        this thread and are never preempted, so a call of a LOCAL-only
        pipeline takes no call state at all (Pipeline.call runs `run`
        itself then, one frame less)."""
        if not self.uses_ray:
            try:
                return self.run(x)
            except Exception as e:
                raise self.failure(e, self.code, None)  # noqa: B904 (a StepError carries its cause)
        state, token = calls.begin(timeout)
        self.live.add(state)
        try:
            return self.run(x)
        except BaseException as e:
            raise self.failure(e, self.code, state)  # noqa: B904
        finally:
            self.live.discard(state)
            calls.end(token)

    async def acall(self, x: object, timeout: float | None = None) -> object:
        """`call` for asyncio. Cancelling the awaiting task (asyncio.wait_for,
        a client gone) cancels the call's remote work too."""
        state, token = calls.begin(timeout) if self.uses_ray else (None, None)
        if state is not None:
            self.live.add(state)
        try:
            return await self.arun(x)
        except BaseException as e:
            raise self.failure(e, self.async_code, state)  # noqa: B904
        finally:
            if state is not None and token is not None:
                self.live.discard(state)
                calls.end(token)

    def update(self, key: str, bindings: Bindings) -> None:
        """Rebuild class step `key`'s actor replicas from `bindings`."""
        actors = self.launchers.get("actors")
        if actors is None or not hasattr(actors, "update"):
            raise AssertionError("update() reached a program without actor pools")
        actors.update(key, bindings)

    def close(self) -> None:
        """Cancel the calls still running, then release every resource
        (actors); idempotent."""
        if self.uses_ray:
            for state in list(self.live):
                state.cancel_unfinished(force=True)
        closers, self.closers = self.closers, []
        for close in reversed(closers):
            close()


def needs_ray(graph: Graph) -> bool:
    """Whether deploying `graph` needs Ray (a TASKS or ACTORS node)."""
    return bool(graph.modes() & {"tasks", "actors"})


def cluster_snapshot() -> Cluster:
    """The alive nodes of the Ray cluster this process joins (starting Ray
    if needed) and their resources: what the place pass decides with at
    deploy."""
    from pipeline_ir.backends import ray_runtime

    return ray_runtime.cluster_snapshot()


def local_keys(graph: Graph) -> list[str]:
    """Step keys called in this process: local calls and local fused bodies."""
    return [s.key for s in graph.steps if not s.placement.remote]


def lower(graph: Graph, bindings: Bindings, options: DeployOptions | None = None) -> Program:
    """Build everything `graph` needs and return its Program."""
    options = options if options is not None else DeployOptions()
    used = graph.modes()
    closers: list[Callable[[], None]] = []
    launchers: dict[Mode, Launcher] = {"local": LocalLauncher(graph, bindings.steps, local_keys(graph))}
    stats = PipelineStats(graph)
    runtime: dict[str, object] = {"_clock": stats_clock}
    uses_ray = needs_ray(graph)
    try:
        if uses_ray:
            from pipeline_ir.backends import ray_runtime

            ray_runtime.ensure_ray()
            runtime.update(ray_runtime.runtime_globals(graph))
            # colocate label -> the Ray node its units prefer. Actors are
            # started first, so tasks sharing a label follow them.
            colocation = ray_runtime.Colocation()
        if "actors" in used:
            from pipeline_ir.backends.ray_actors import ActorLauncher

            actors = ActorLauncher(graph, bindings, colocation, stats, options, runtime)
            closers.append(actors.close)
            launchers["actors"] = actors
        if "tasks" in used:
            from pipeline_ir.backends.ray_tasks import TaskLauncher

            launchers["tasks"] = TaskLauncher(graph, bindings, colocation, stats)
        consts = bindings.constants
        # The entry points hand one call in TIMED_EVERY to the timed programs.
        timed_code = generate(graph, launchers, consts, runtime, probes=stats, timed=True, counted_by_entry=True)
        timed_async = generate(graph, launchers, consts, runtime, is_async=True, probes=stats, timed=True, counted_by_entry=True)
        run_timed = timed_code.load()
        arun_timed = timed_async.load()
        code = generate(graph, launchers, consts, runtime, probes=stats, sampled=(timed_code, run_timed, TIMED_EVERY))
        async_code = generate(graph, launchers, consts, runtime, is_async=True, probes=stats, sampled=(timed_async, arun_timed, TIMED_EVERY))
        run = code.load()
        # The async source defines `async def arun`: calling it gives a coroutine.
        arun = cast(Callable[[object], Awaitable[object]], async_code.load())
    except BaseException:
        for close in closers:
            close()
        raise
    if uses_ray:
        export_stats(stats, graph.name)
    return Program(graph, run, arun, code, async_code, uses_ray, stats, closers, launchers)
