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

from pipeline_ir.errors import PipelineError

if TYPE_CHECKING:
    from pipeline_ir.backends.lower import Program
    from pipeline_ir.bindings import Bindings
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


def _closed(x: object) -> object:
    raise PipelineError("this pipeline was shut down; deploy it again to call it")


async def _aclosed(x: object) -> object:
    raise PipelineError("this pipeline was shut down; deploy it again to call it")


class Pipeline:
    """A deployed pipeline. Use it as a context manager, or call shutdown()."""

    def __init__(self, compiled: Deployable) -> None:
        from pipeline_ir.backends.lower import lower

        self.compiled = compiled
        self._program: Program = lower(compiled.graph, compiled.bindings)
        self._run: Callable[[object], object] = self._program.run
        self._arun: Callable[[object], Awaitable[object]] = self._program.arun
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

    def call(self, x: object = None) -> object:
        """Run the pipeline on `x` and return its result (a tuple for a
        multi-output pipeline). A step's exception raises StepError."""
        try:
            return self._run(x)
        except Exception as e:
            raise self._program.translate(e)  # noqa: B904 (the StepError carries its cause)

    async def call_async(self, x: object = None) -> object:
        """`call` for asyncio: awaits Ray results instead of blocking."""
        try:
            return await self._arun(x)
        except Exception as e:
            raise self._program.translate(e, is_async=True)  # noqa: B904

    def map(self, xs: Iterable[object], max_in_flight: int = 8) -> Iterator[object]:
        """Results for each x of `xs`, in input order, with up to
        `max_in_flight` calls running at once."""
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"map(): max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if not self._program.uses_ray:
            # Local steps run in this thread anyway: concurrency buys nothing.
            return (self.call(x) for x in xs)
        return _map_async(self.call_async, xs, max_in_flight)

    def shutdown(self) -> None:
        """End every actor of the pipeline. Idempotent."""
        self._run = _closed
        self._arun = _aclosed
        self._finalizer()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if not self._finalizer.alive else "running"
        return f"<Pipeline {self.compiled.graph.name} ({state})>"


_Handle = Union["asyncio.Task[object]", "concurrent.futures.Future[object]"]


def _map_async(call: Callable[[object], Awaitable[object]], xs: Iterable[object], limit: int) -> Iterator[object]:
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
                pending.append(runner.submit(_coroutine(call, x)))
            if not pending:
                return
            yield runner.wait(pending.popleft())
    finally:
        runner.close(pending)


async def _coroutine(call: Callable[[object], Awaitable[object]], x: object) -> object:
    return await call(x)




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
