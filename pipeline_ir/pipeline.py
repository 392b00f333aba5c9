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
from typing import TYPE_CHECKING, Union

from pipeline_ir.admission import Admission
from pipeline_ir.errors import PipelineError
from pipeline_ir.options import DeployOptions, check_timeout

if TYPE_CHECKING:
    from pipeline_ir.backends.lower import Program
    from pipeline_ir.compile import CompiledPipeline
    from pipeline_ir.ir.graph import Graph


class Pipeline:
    """A deployed pipeline. Use it as a context manager, or call shutdown()."""

    def __init__(self, compiled: CompiledPipeline, options: DeployOptions | None = None) -> None:
        from pipeline_ir.backends.lower import cluster_gpus, lower, needs_ray

        self.options = options if options is not None else DeployOptions()
        if needs_ray(compiled.graph):
            # GPU placement is decided by a pass, with the cluster's GPUs.
            compiled = compiled.place(cluster_gpus())
        self.compiled = compiled
        self._program: Program = lower(compiled.graph, compiled.bindings, self.options)
        self._admission = Admission(self.options.max_in_flight, self.options.overload_timeout_s)
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
        seconds = check_timeout("call()", timeout)
        self._check_open()
        self._admission.enter()
        try:
            return self._program.call(x, seconds)
        finally:
            self._admission.exit()

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
            raise ValueError(f"map(): max_in_flight must be an int >= 1, got {max_in_flight!r}")
        seconds = check_timeout("map()", timeout)
        self._check_open()
        if not self._program.uses_ray:
            # Local steps run in this thread anyway: concurrency buys nothing.
            return _map_local(self, xs, seconds, return_exceptions)
        limit = max_in_flight if self.options.max_in_flight is None else min(max_in_flight, self.options.max_in_flight)
        return _map_async(lambda x: self._call_for_map(x, seconds), xs, limit, return_exceptions)

    def shutdown(self) -> None:
        """Cancel the calls still running and end every actor of the
        pipeline. Idempotent."""
        self._closed = True
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
