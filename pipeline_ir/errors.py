"""The exception hierarchy of pipeline_ir: every error a user can catch.

Errors that pipeline_ir raises derive from `PipelineError`. Errors that are
also a builtin kind (a wrong type, a bad value) derive from that builtin too,
so code that catches `TypeError` or `ValueError` keeps working, as API.md
asks of step options.

Plain builtins, on purpose:
- `Graph.node(id)` and `Graph.step(key)` raise `KeyError` for a missing id
  or key, as a Mapping lookup does;
- an exception raised inside a step reaches the caller as the `__cause__`
  of a StepError, never bare.
Still plain, to be moved here by their owners: `Pipeline.map()`'s
`ValueError` for a bad `max_in_flight`, and the pass manager's `TypeError`
for a pass that returns no PassResult (passes/manager.py).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error raised by pipeline_ir."""


class PipelineTypeError(PipelineError, TypeError):
    """A value of the wrong kind.

    While building: an argument of the wrong type (a step passed where a
    node belongs, a class step not instantiated, an option of the wrong
    type, an async or generator step). At `compile()`, before anything
    runs: an upstream output type that cannot match a downstream parameter
    type; the message names both steps, the parameter and both types.
    """


class PipelineValueError(PipelineError, ValueError):
    """An argument of the right type with a bad value: a step option
    (`num_replicas=0`, an unknown `execution_mode`), a switch with no
    branch, an unknown `compile(backend=...)`, a compile with no output.
    """


class GraphError(PipelineError, ValueError):
    """A Graph breaks an IR invariant (bad reference, order, or field).

    Users see it when they hand-edit or decode a malformed graph; a pass that
    produces one has a bug, and the message names that pass.
    """


class PlacementError(PipelineError):
    """The Ray cluster cannot give a step what it asks for.

    Raised by `deploy()` before any step starts (the `place` pass): a step
    asks for GPUs no node has (`compile(..., gpu_fallback=True)` runs it
    on CPU instead), or the actor replicas and tasks do not fit on the
    nodes together. The message names the step, what it needs per replica
    or task and in all, what the cluster has, and what to do.
    `step_name` names the unit; `busy` is True when it would fit the
    nodes' totals and only what other work holds now is short.
    """

    def __init__(self, message: str, step_name: str | None = None, busy: bool = False) -> None:
        super().__init__(message)
        self.step_name = step_name
        self.busy = busy


class PipelineOverloadedError(PipelineError):
    """More calls are in flight than the pipeline admits.

    Raised by `call`/`call_async` when `deploy(max_in_flight=N)` calls are
    already running and none finished within `overload_timeout_s`. Nothing
    of the rejected call ran: it is always safe to retry later.
    """


class PipelineTimeoutError(PipelineError, TimeoutError):
    """A call's deadline (`call(x, timeout=s)`) passed before it finished,
    or `deploy()`'s (`deploy_timeout_s`) before every actor replica was
    built: then `step_name` names the step whose replicas were not ready,
    the message says whether Ray was still waiting for resources for them
    or their constructor was still running, and every actor the deploy
    started was stopped.

    For a call, `step_name` names the step that was still running (None when no step
    was, e.g. the deadline passed while the call waited for admission);
    the rest of the call was cancelled: queued work never starts, running
    Ray tasks are stopped, and an actor replica still busy with the
    abandoned call after a grace period is replaced (docs/operations.md).
    """

    def __init__(self, message: str, step_name: str | None = None, node_id: int | None = None) -> None:
        super().__init__(message)
        self.step_name = step_name
        self.node_id = node_id

    def __reduce__(self) -> tuple[object, ...]:
        return (PipelineTimeoutError, (str(self), self.step_name, self.node_id))


class StepError(PipelineError):
    """An exception raised inside a step while the pipeline ran.

    The message names the step and the node; `step_name` and `node_id` carry
    them, and the original exception is `__cause__`. The same error is raised
    whichever backend ran the step.
    """

    def __init__(
        self,
        step_name: str,
        node_id: int,
        cause: BaseException | None = None,
        message: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        if message is None:
            what = f"{type(cause).__name__}: {cause}" if cause is not None else "failed"
            message = f"step {step_name!r} (node %{node_id}) raised {what}"
        super().__init__(message)
        self.step_name = step_name
        self.node_id = node_id
        self.remote_traceback = remote_traceback
        if cause is not None:
            self.__cause__ = cause

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions pickle only their args by default, which loses
        # `__cause__` and our fields when Ray ships the error from a worker.
        return (
            StepError,
            (self.step_name, self.node_id, self.__cause__, str(self), self.remote_traceback),
        )

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
