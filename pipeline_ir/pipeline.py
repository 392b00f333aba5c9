"""`Pipeline`: a deployed pipeline, and the ways to call it.

Holds the lowered program (backends/lower.py) and nothing else of the
backends: `call`, `call_async` and `map` run the generated code, and
`shutdown` (also on `with` exit and on garbage collection) releases every
actor. Errors raised inside steps reach the caller as StepError.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Union

from pipeline_ir.admission import Admission
from pipeline_ir.errors import PipelineError, PipelineValueError
from pipeline_ir.options import DeployOptions, check_timeout

from pipeline_ir.bindings import Bindings, StepBinding

if TYPE_CHECKING:
    from pipeline_ir.backends.lower import Program
    from pipeline_ir.ir.graph import Graph


class Deployable(Protocol):
    """What a Pipeline runs: a CompiledPipeline (compile.py) already fitted
    to the cluster. Named here so that this module never imports the
    compiler: `CompiledPipeline.deploy()` builds the Pipeline, not the
    other way round."""

    @property
    def graph(self) -> Graph: ...

    @property
    def bindings(self) -> Bindings: ...

    def explain(self) -> str: ...


class Pipeline:
    """A deployed pipeline. Use it as a context manager, or call shutdown()."""

    def __init__(self, compiled: Deployable, options: DeployOptions | None = None) -> None:
        from pipeline_ir.backends.lower import lower

        self.options = options if options is not None else DeployOptions()
        self.compiled = compiled
        self._bindings: Bindings = compiled.bindings
        self._program: Program = lower(compiled.graph, compiled.bindings, self.options)
        self._admission = Admission(self.options.max_in_flight, self.options.overload_timeout_s)
        # A LOCAL-only pipeline with no admission limit: `call` runs the
        # generated function itself (one Python frame less per call) until
        # shutdown.
        self._local_run = self._program.run if not self._program.uses_ray and self.options.max_in_flight is None else None
        self._closed = False
        # Garbage collection ends the actors too; the finalizer holds the
        # program, never the Pipeline, so it does not keep it alive.
        self._finalizer = weakref.finalize(self, self._program.close)

    @property
    def graph(self) -> Graph:
        """The IR this pipeline runs."""
        return self.compiled.graph

    @property
    def code(self) -> str:
        """The generated Python source of one synchronous call."""
        return self._program.code.source

    def _check_open(self) -> None:
        if self._closed:
            raise PipelineError("this pipeline was shut down; deploy it again to call it")

    def call(self, x: object = None, *, timeout: float | None = None) -> object:
        """Run the pipeline on `x` and return its result (a tuple for a
        multi-output pipeline).

        A step's exception raises StepError. With `timeout` (seconds), a
        call still running then raises PipelineTimeoutError (a TimeoutError)
        naming the step still running, and the rest of the call is
        cancelled. Past `deploy(max_in_flight=N)` calls in flight, raises
        PipelineOverloadedError after `overload_timeout_s`."""
        run = self._local_run
        if run is not None and timeout is None:  # kept short: a LOCAL call costs ~2x calling the steps by hand
            try:
                return run(x)
            except Exception as e:
                raise self._program.failure(e, self._program.code, None)  # noqa: B904 (a StepError carries its cause)
        if timeout is not None:
            timeout = check_timeout("call()", timeout)
        if self._closed:
            self._check_open()
        admission = self._admission
        if admission.limit is None:
            return self._program.call(x, timeout)
        admission.enter()
        try:
            return self._program.call(x, timeout)
        finally:
            admission.exit()

    async def call_async(self, x: object = None, *, timeout: float | None = None) -> object:
        """`call` for asyncio: awaits Ray results instead of blocking.
        Cancelling the awaiting task cancels the call's remote work."""
        seconds = check_timeout("call_async()", timeout)
        self._check_open()
        await self._admission.enter_async()
        try:
            return await self._program.acall(x, seconds)
        finally:
            self._admission.exit()

    async def _call_for_map(self, x: object, timeout: float | None) -> object:
        # map() paces itself: it waits for admission instead of overflowing.
        await self._admission.enter_async(wait=True)
        try:
            return await self._program.acall(x, timeout)
        finally:
            self._admission.exit()

    def map(
        self, xs: Iterable[object], max_in_flight: int = 8, *, timeout: float | None = None, return_exceptions: bool = False
    ) -> Iterator[object]:
        """Results for each x of `xs`, in input order, with up to
        `max_in_flight` calls running at once (never more than the
        pipeline's own `max_in_flight`).

        `timeout` is each call's deadline. With `return_exceptions=True` a
        failed item yields its exception (StepError, PipelineTimeoutError)
        in its place and the rest go on, so every item is accounted for;
        otherwise the first failure is raised and the calls still in flight
        are cancelled."""
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise PipelineValueError(f"map(): max_in_flight must be an int >= 1, got {max_in_flight!r}")
        seconds = check_timeout("map()", timeout)
        self._check_open()
        if not self._program.uses_ray:
            # Local steps run in this thread anyway: concurrency buys nothing.
            return _map_local(self, xs, seconds, return_exceptions)
        limit = max_in_flight if self.options.max_in_flight is None else min(max_in_flight, self.options.max_in_flight)
        return _map_async(lambda x: self._call_for_map(x, seconds), xs, limit, return_exceptions)

    def stats(self) -> dict[str, dict[str, float | int | None]]:
        """Live figures of each step: `calls`, `errors`, `p50_s`, `p99_s`
        (latency of the last calls, None before any), `in_flight`, and
        `mean_batch_size` for batched steps. Keyed by step name (its key,
        `model#2`, when two steps share a name); a remote fused group by
        its steps' keys joined with "+". docs/operations.md says what each
        figure measures."""
        return self._program.stats.snapshot()

    def dump(self, stats: bool = True) -> str:
        """The IR this pipeline runs, as text, with each node's live
        figures beside it (`stats=False`: the plain dump): where the time
        of a call goes, on the graph you compiled."""
        text = self.graph.dump()
        return self._program.stats.annotate(text) if stats else text

    def update(self, step: object, *init_args: object, **init_kwargs: object) -> None:
        """Replace the replicas of class step `step` (the decorated class,
        or its name or key) with replicas built from new init args, without
        dropping calls in flight: the new replicas are built first (their
        constructors run; a failure raises and the old ones keep serving),
        new calls go to them, and the old ones finish what they have before
        they end. For ACTORS class steps (alone or fused into a group)."""
        self._check_open()
        key = self._class_step_key(step)
        bindings = self._bindings
        old = bindings.steps[key]
        fresh = StepBinding(old.target, tuple(init_args), dict(init_kwargs))
        new = type(bindings)(steps={**bindings.steps, key: fresh}, constants=bindings.constants)
        self._program.update(key, new)
        self._bindings = new

    def _class_step_key(self, step: object) -> str:
        graph = self.graph
        classes = [s for s in graph.steps if s.kind == "class"]
        if isinstance(step, str):
            found = [s for s in classes if step in (s.key, s.name)]
        else:
            target = getattr(step, "cls", step)  # a ClassStep, or the class itself
            found = [s for s in classes if self._bindings.steps[s.key].target is target]
        what = step if isinstance(step, str) else getattr(step, "__name__", None) or repr(step)
        if not found:
            names = ", ".join(repr(s.key) for s in classes) or "none"
            raise PipelineValueError(f"update(): this pipeline has no class step {what!r} (its class steps: {names})")
        if len(found) > 1:
            keys = ", ".join(repr(s.key) for s in found)
            raise PipelineValueError(f"update(): {what!r} names several configured steps ({keys}); pass the key of the one to replace")
        spec = found[0]
        modes = {graph.placement_of(c.id).mode for c in graph.callers(spec.key)}
        if modes != {"actors"}:
            raise PipelineValueError(
                f"update(): step {spec.key!r} runs as {'/'.join(sorted(modes))}; update() replaces actor replicas: "
                "deploy it with execution_mode='actors', or deploy the pipeline again with the new arguments"
            )
        return spec.key

    def shutdown(self) -> None:
        """Cancel the calls still running and end every actor of the
        pipeline. Idempotent."""
        self._closed = True
        self._local_run = None
        self._finalizer()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if not self._finalizer.alive else "running"
        return f"<Pipeline {self.compiled.graph.name} ({state})>"


def _map_local(p: Pipeline, xs: Iterable[object], timeout: float | None, return_exceptions: bool) -> Iterator[object]:
    for x in xs:
        try:
            yield p.call(x, timeout=timeout)
        except PipelineError as e:
            if not return_exceptions:
                raise
            yield e


_Handle = Union["asyncio.Task[object]", "concurrent.futures.Future[object]"]


def _map_async(
    call: Callable[[object], Awaitable[object]], xs: Iterable[object], limit: int, return_exceptions: bool
) -> Iterator[object]:
    """Drive `call` over `xs` on a private event loop, `limit` at a time."""
    runner = _LoopRunner()
    pending: collections.deque[_Handle] = collections.deque()
    it = iter(xs)
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    x = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append(runner.submit(_coroutine(call, x, return_exceptions)))
            if not pending:
                return
            yield runner.wait(pending.popleft())
    finally:
        runner.close(pending)


async def _coroutine(call: Callable[[object], Awaitable[object]], x: object, return_exceptions: bool) -> object:
    if not return_exceptions:
        return await call(x)
    try:
        return await call(x)
    except PipelineError as e:
        return e




class _LoopRunner:
    """A private event loop, run here, or in a helper thread when this
    thread already runs one (map() called from asyncio code, a notebook)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.thread: threading.Thread | None = None
        else:
            self.thread = threading.Thread(target=self.loop.run_forever, name="pipeline_ir-map", daemon=True)
            self.thread.start()

    def submit(self, coro: Coroutine[object, object, object]) -> _Handle:
        if self.thread is None:
            return self.loop.create_task(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def wait(self, handle: _Handle) -> object:
        if isinstance(handle, concurrent.futures.Future):
            return handle.result()
        return self.loop.run_until_complete(handle)

    def close(self, pending: Iterable[_Handle]) -> None:
        left = list(pending)
        for handle in left:
            handle.cancel()
        if self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
        elif left:
            self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))  # type: ignore[arg-type]
        self.loop.close()
