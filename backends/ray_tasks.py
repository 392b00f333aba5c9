"""The TASKS backend: each remote call is one Ray task.

One remote function per step (per fused group), made at deploy with the
step's resources; every node calling that step submits a task to it, with
its own node id first so that an error names the right node:

    v2 = r_double.submit(2, v1)      # an ObjectRef; v1 may be one too

ObjectRefs go straight into downstream calls, so Ray moves values between
workers without the caller fetching anything in between. Tasks are never
retried (`max_retries=0`): a step with side effects must not run twice
behind the user's back. A class step on TASKS is built once, at deploy, in
the caller (its constructor runs there, as in LOCAL mode). A built unit
that pickles small (up to INLINE_UNIT_BYTES: functions, small objects)
rides inside its remote function, which Ray exports to each worker once.
A larger one (a model) is put in the object store once and each call
passes its ObjectRef inside a list, so it never rides inside the remote
function (Ray caps those near 100 MiB); each worker process fetches it on
first use and keeps its own copy (of the last few units it ran). The list
is not free: a nested ref costs Ray's borrowing protocol on every call
(0.37 ms on a 2.8 ms task, measured on the 2-core machine), hence the
small units inline. Either way, state a call mutates stays
in that worker: a later call sees it if Ray runs it in the same worker,
and not otherwise, so a TASKS class step must not rely on state kept
between calls (an ACTORS step keeps it, per replica).

This module places tasks only where the IR says (resources, `colocate`);
it decides nothing itself (whether they fit: the place pass, at deploy).
A task with a `colocate` label prefers the label's node as it is at each
call (ray_runtime.Colocation), and runs elsewhere when that node is busy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import re
from collections.abc import Mapping
from typing import Any

import ray
from ray import cloudpickle

from pipeline_ir.backends import calls
from pipeline_ir.backends.fast_calls import aresolve, has_pending, resolve
from pipeline_ir.backends.ray_runtime import Colocation, prefer_node, resource_options, ship_code, submit_expr
from pipeline_ir.backends.serialization import ensure_registered
from pipeline_ir.backends.stats import PipelineStats
from pipeline_ir.backends.worker import Unit
from pipeline_ir.bindings import Bindings
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Fused


class Task:
    """The callee generated code holds for one step (or fused group)."""

    __slots__ = ("fn", "lead", "stats", "label", "colocation", "_near")

    def __init__(
        self, fn: Any, unit: Any, stats: PipelineStats | None = None, label: str | None = None, colocation: Colocation | None = None
    ) -> None:
        self.fn = fn
        # The unit's ref, in a list: Ray resolves top-level ObjectRef
        # arguments, not nested ones, so the worker gets the ref and fetches
        # the unit only once. None: the unit rides inside `fn`.
        self.lead: tuple[list[Any], ...] = () if unit is None else ([unit],)
        self.stats = stats
        self.label = label if colocation is not None else None
        self.colocation = colocation
        self._near: dict[str, Any] = {}  # node -> fn preferring that node

    def submit(self, node_id: int, *args: object, **kwargs: object) -> Any:
        """Start one task; returns its ObjectRef."""
        ensure_registered()  # torch may have been imported since deploy
        if has_pending(args, kwargs):  # results of fast-path calls: their values go
            args, kwargs = resolve(args, kwargs)
        ref = self._fn().remote(*self.lead, node_id, *args, **kwargs)
        calls.track(ref, node_id, _stop_task)
        if self.stats is not None:
            started = self.stats.submitted(node_id)
            state = calls.current()
            ref.future().add_done_callback(functools.partial(_finished, self.stats, node_id, started, state))
        return ref

    async def asubmit(self, node_id: int, *args: object, **kwargs: object) -> Any:
        """`submit` for asyncio: fast-path inputs are awaited on the loop."""
        if has_pending(args, kwargs):
            args, kwargs = await aresolve(args, kwargs)
        return self.submit(node_id, *args, **kwargs)

    def _fn(self) -> Any:
        """The remote function, preferring the colocate label's node as it
        is now: the label follows its actors when they move (a lost node)."""
        if self.label is None or self.colocation is None:
            return self.fn
        node = self.colocation.node(self.label)
        if node is None:
            return self.fn
        fn = self._near.get(node)
        if fn is None:
            fn = self._near[node] = self.fn.options(**prefer_node(node))
        return fn


def _finished(
    stats: PipelineStats, node_id: int, started: float, state: calls.CallState | None, future: concurrent.futures.Future[object]
) -> None:
    # On Ray's callback thread: bookkeeping only.
    stats.finished(node_id, started, None if state is None else state.ready, future.exception() is None)


def _stop_task(ref: Any, force: bool) -> None:  # noqa: D401 (a calls.Cancel)
    """Cancel a task of an abandoned call: a queued one never starts, a
    running one gets a KeyboardInterrupt (its worker lives on for the next
    call); at shutdown (`force`) its worker exits, as a task stuck in
    native code would not see the interrupt."""
    ray.cancel(ref, force=force)


# A unit that pickles to at most this many bytes rides inside its remote function.
INLINE_UNIT_BYTES = 1 << 20

# Per worker process: the units it ran lately, by ObjectRef. Bounded, since
# a long-lived worker serves pipelines deployed one after another.
_UNITS: collections.OrderedDict[bytes, Unit] = collections.OrderedDict()
_UNITS_KEPT = 4


def _unit(box: list[Any]) -> Unit:
    ref = box[0]
    key = ref.binary()
    unit = _UNITS.get(key)
    if unit is None:
        unit = ray.get(ref)
        _UNITS[key] = unit
        while len(_UNITS) > _UNITS_KEPT:
            _UNITS.popitem(last=False)
    else:
        _UNITS.move_to_end(key)
    return unit


def _remote_function(unit: Unit, options: Mapping[str, object]) -> Any:
    """The remote function fetching its unit from a ref in a list."""

    def run(box: list[Any], node_id: int, *args: object, **kwargs: object) -> object:
        return _unit(box)(node_id, *args, **kwargs)

    return _remote(run, unit, options)


def _inline_function(unit: Unit, options: Mapping[str, object]) -> Any:
    """The remote function carrying its unit (exported once per worker)."""

    def run(node_id: int, *args: object, **kwargs: object) -> object:
        return unit(node_id, *args, **kwargs)

    return _remote(run, unit, options)


def _remote(run: Any, unit: Unit, options: Mapping[str, object]) -> Any:
    # Ray names the worker process and its errors after the function; it
    # must be ASCII (a worker given "ü" dies in Ray's task handler).
    run.__name__ = run.__qualname__ = re.sub(r"[^0-9A-Za-z_]", "_", unit.label) or "step"
    remote: Any = ray.remote
    return remote(**options)(run)


class _TooLarge(Exception):
    pass


class _Budget:
    """A file that counts what is written to it and gives up past `limit`
    bytes: deciding whether a unit is small never pickles a large model
    whole (ray.put pickles it once more anyway)."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes  # bytes, or a pickle.PickleBuffer for a large buffer
        self.left -= size
        if self.left < 0:
            raise _TooLarge
        return size


def _pickles_small(unit: Unit) -> bool:
    """Whether `unit` pickles (as Ray exports functions) to at most
    INLINE_UNIT_BYTES."""
    try:
        dump: Any = cloudpickle.dump  # untyped in Ray
        dump(unit, _Budget(INLINE_UNIT_BYTES))
    except Exception:
        # Too large, or only Ray's own serializers can store it: the object store it is.
        return False
    return True


class TaskLauncher:
    """Spells TASKS nodes as Ray task submissions."""

    remote = True

    def __init__(
        self, graph: Graph, bindings: Bindings, colocation: Colocation | None = None, stats: PipelineStats | None = None
    ) -> None:
        self.graph = graph
        self.stats = stats
        self.bindings = bindings
        self.colocation = Colocation() if colocation is None else colocation
        self.tasks: dict[str | int, Task] = {}
        ship_code(b.target for b in bindings.steps.values())
        # Class steps are built now, so a constructor error fails deploy()
        # as it does in LOCAL mode, and each constructor runs once.
        for unit in graph.units():
            if graph.unit_placement(unit).mode == "tasks":
                self.callee(unit)

    def callee(self, node: Call | Fused) -> Task:
        key: str | int = node.step if isinstance(node, Call) else node.id
        task = self.tasks.get(key)
        if task is None:
            unit = Unit.of(self.graph, node, self.bindings)
            unit.build()
            placement = self.graph.unit_placement(node)
            # Whether it fits was decided at deploy (the place pass).
            options = {"max_retries": 0, **resource_options(placement)}
            if _pickles_small(unit):
                task = Task(_inline_function(unit, options), None, self.stats, placement.colocate, self.colocation)
            else:
                task = Task(_remote_function(unit, options), ray.put(unit), self.stats, placement.colocate, self.colocation)
            self.tasks[key] = task
        return task

    def expr(self, node: Call | Fused, callee: str, args: str, is_async: bool = False) -> str:
        return "await " + submit_expr(node, callee, args, "asubmit") if is_async else submit_expr(node, callee, args)
