"""What runs inside a Ray worker or actor: one *unit* of a graph.

A unit is a remote `call` node's step, or a remote `fused` group's whole
body. Both Ray backends ship a `Unit` to the process that runs it: the
tasks backend inside its remote function, the actors backend to each
replica's constructor. A unit carries the graph (for names in errors), the
node, and only the bindings and constants that node needs; the callables
travel by pickle exactly as they would with plain `ray.remote` (by value
when they live in `__main__` or a closure, by reference otherwise).

Here a step's exception becomes the StepError that LOCAL mode raises (same
message, step name, node id, cause) and is made safe to pickle back to the
caller. This module decides nothing about placement or routing.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline_ir.backends.codegen import PythonCode, generate_body, translate_error
from pipeline_ir.backends.local import LocalLauncher, instantiate, single_items
from pipeline_ir.backends.serialization import ensure_registered
from pipeline_ir.bindings import Bindings, StepBinding
from pipeline_ir.errors import StepError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Constant, External, Fused
from pipeline_ir.ir.printer import node_label


class RemoteException(Exception):
    """Stands in for a step's exception that could not be pickled back to
    the caller. Its message names the original type and message; the
    original traceback is attached as a note."""

    def __init__(self, type_name: str, text: str, reason: str) -> None:
        super().__init__(f"{type_name}: {text} (the original exception could not be sent back: {reason})")
        self.type_name = type_name
        self.text = text
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (RemoteException, (self.type_name, self.text, self.reason))


def unit_keys(node: Call | Fused) -> list[str]:
    """The step keys a unit calls."""
    if isinstance(node, Call):
        return [node.step]
    return list(dict.fromkeys(b.step for b in node.body if isinstance(b, Call)))


class _Prebuilt(LocalLauncher):
    """A local launcher over step objects built elsewhere (the TASKS
    backend builds class steps once, at deploy, in the caller)."""

    def __init__(self, objects: dict[str, Callable[..., object]]) -> None:
        self.objects = objects


@dataclass
class Unit:
    """A remote node and what it needs to run, as shipped to a worker.

    `objects` holds already-built step objects (TASKS: built at deploy);
    when empty they are built by `build()` where the unit runs (ACTORS:
    once per replica). The compiled body is cached per process and never
    pickled.
    """

    graph: Graph
    node: Call | Fused
    steps: Mapping[str, StepBinding]
    constants: Mapping[str, object]
    objects: dict[str, Callable[..., object]] = field(default_factory=dict)
    _fn: Callable[..., object] | None = field(default=None, repr=False)
    _body: PythonCode | None = field(default=None, repr=False)

    @staticmethod
    def of(graph: Graph, node: Call | Fused, bindings: Bindings) -> Unit:
        """The unit for `node`, with the subset of `bindings` it needs."""
        keys = unit_keys(node)
        consts: dict[str, object] = {}
        if isinstance(node, Fused):
            for b in node.body:
                if isinstance(b, Constant) and isinstance(b.value, External):
                    consts[b.value.key] = bindings.constants[b.value.key]
        return Unit(graph, node, {k: bindings.steps[k] for k in keys}, consts)

    @property
    def label(self) -> str:
        """The unit's name in errors: its step, or its steps joined by +."""
        return node_label(self.graph, self.node.id)

    def build(self) -> None:
        """Build the step objects: class steps run their constructors here.
        A constructor failure raises StepError naming the step."""
        if not self.objects:
            keys = unit_keys(self.node)
            self.objects = {k: instantiate(self.graph, k, self.steps[k]) for k in keys}

    def _compiled(self) -> Callable[..., object]:
        if self._fn is None:
            self.build()
            if isinstance(self.node, Call):
                self._fn = single_items(self.graph, self.node.step, self.objects[self.node.step])
            else:
                # Batched steps are never fused (passes/grouping.py): a body
                # calls plain steps only.
                code = generate_body(self.graph, self.node, _Prebuilt(self.objects), self.constants)
                self._body = code
                self._fn = code.load()
        return self._fn

    def __call__(self, node_id: int, *args: object, **kwargs: object) -> object:
        """Run the unit as node `node_id`; a step's exception is raised as a
        StepError that pickles back to the caller intact."""
        fn = self._compiled()
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            error = shippable(self._step_error(e, node_id))
        else:
            # Before Ray pickles the result: a step may have imported torch.
            ensure_registered()
            return result
        # Raised outside the except block, so no worker-side context rides along.
        raise error

    def batched(self) -> tuple[Callable[..., object], int, float] | None:
        """For a batched step's unit: its list-taking callable, max batch
        size and wait; None otherwise."""
        if not isinstance(self.node, Call):
            return None
        batching = self.graph.step(self.node.step).placement.batching
        if batching is None:
            return None
        self.build()
        return self.objects[self.node.step], batching.max_batch_size, batching.batch_wait_timeout_s

    def step_error(self, exc: Exception, node_id: int) -> StepError:
        """The StepError for `exc` raised while running as node `node_id`,
        safe to pickle back to the caller."""
        return shippable(self._step_error(exc, node_id))

    def _step_error(self, exc: Exception, node_id: int) -> StepError:
        if isinstance(self.node, Fused) and self._body is not None:
            found = translate_error(exc, self._body, self.graph)
            if isinstance(found, StepError):
                return found
        if isinstance(exc, StepError):
            return exc  # a pipeline called inside a step: it already named its step
        return StepError(node_label(self.graph, node_id), node_id, exc)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_fn"] = state["_body"] = None  # rebuilt where the unit runs
        return state


def shippable(err: StepError) -> StepError:
    """`err`, safe to pickle to the caller: the worker's traceback attached
    to its cause as a note, and a cause that does not survive pickling
    replaced by a RemoteException saying what it was."""
    cause = err.__cause__
    if cause is None:
        return err
    text = "".join(traceback.format_exception(cause))
    err.remote_traceback = text
    # Ray's pickler, as Ray uses it: classes from __main__ travel by value.
    import ray.cloudpickle

    try:
        cause.add_note(f"remote traceback (in the Ray worker that ran the step):\n{text.rstrip()}")
        dumps: Any = ray.cloudpickle.dumps
        ray.cloudpickle.loads(dumps(cause))
        return err
    except Exception as e:
        stand_in = RemoteException(f"{type(cause).__module__}.{type(cause).__qualname__}", str(cause), f"{type(e).__name__}: {e}")
        stand_in.add_note(f"remote traceback (in the Ray worker that ran the step):\n{text.rstrip()}")
        return StepError(err.step_name, err.node_id, stand_in, message=str(err), remote_traceback=text)
