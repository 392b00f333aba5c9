"""`@step`, `ExecutionMode` and step options: the user-facing builder.

Decorating a function gives a `FunctionStep`; decorating a class gives a
`ClassStep`, which is instantiated with init args into a `ConfiguredStep`.
Calling either on nodes records a `CallNode` and runs nothing: a class's
constructor runs only at deploy(), once per replica. Options are validated
here, at decoration time, with errors that name the step; so is the shape
of the callable (a generator or an async def would run differently on
each backend). The step objects derive from `builder.StepObject`: this
module builds nodes, builder.py never imports it.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload

from pipeline_ir.builder import CallNode, PipelineNode, StepObject, check_argument
from pipeline_ir.errors import PipelineTypeError, PipelineValueError
from pipeline_ir.ir.placement import DEFAULT_BATCH_WAIT_S

T = TypeVar("T")
R = TypeVar("R", covariant=True)


class ExecutionMode(enum.Enum):
    """Where a step runs."""

    LOCAL = "local"  # inline, in the calling process
    TASKS = "tasks"  # one Ray task per call
    ACTORS = "actors"  # a pool of Ray actors, num_replicas of them


@dataclass(frozen=True)
class StepOptions:
    """Validated options of one step (see `step`)."""

    name: str
    mode: ExecutionMode
    num_replicas: int
    num_cpus: float | None
    num_gpus: float | None
    fuse: bool
    pure: bool
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None  # set whenever max_batch_size is
    idempotent: bool = False


def _parse_mode(name: str, execution_mode: object) -> ExecutionMode:
    if isinstance(execution_mode, ExecutionMode):
        return execution_mode
    if isinstance(execution_mode, str):
        try:
            return ExecutionMode(execution_mode.lower())
        except ValueError:
            raise PipelineValueError(
                f"step {name!r}: unknown execution_mode {execution_mode!r}; "
                "use 'local', 'tasks' or 'actors' (or pipeline.ExecutionMode)"
            ) from None
    raise PipelineTypeError(
        f"step {name!r}: execution_mode must be a pipeline.ExecutionMode or a string, "
        f"not {type(execution_mode).__name__}"
    )


def _parse_amount(name: str, label: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PipelineTypeError(f"step {name!r}: {label} must be a number, not {type(value).__name__}")
    if value < 0:
        raise PipelineValueError(f"step {name!r}: {label} must be >= 0, got {value}")
    return float(value)


def _parse_serving(
    name: str, mode: ExecutionMode, max_batch_size: object, batch_wait_timeout_s: object, idempotent: object
) -> tuple[int | None, float | None, bool]:
    """Validate the serving options: (max_batch_size, batch wait, idempotent)."""
    if max_batch_size is not None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"step {name!r}: max_batch_size must be an int, not {type(max_batch_size).__name__}")
        if max_batch_size < 1:
            raise ValueError(f"step {name!r}: max_batch_size must be at least 1, got {max_batch_size}")
        if mode is not ExecutionMode.ACTORS:
            raise ValueError(
                f"step {name!r}: max_batch_size={max_batch_size} needs execution_mode='actors' "
                f"(got {mode.value!r}); a replica gathers the calls into batches"
            )
    wait: float | None = None
    if batch_wait_timeout_s is not None:
        if max_batch_size is None:
            raise ValueError(
                f"step {name!r}: batch_wait_timeout_s is how long a batch waits to fill; "
                "it needs max_batch_size as well"
            )
        wait = _parse_amount(name, "batch_wait_timeout_s", batch_wait_timeout_s)
    elif max_batch_size is not None:
        wait = DEFAULT_BATCH_WAIT_S
    if not isinstance(idempotent, bool):
        raise TypeError(f"step {name!r}: idempotent must be True or False, not {idempotent!r}")
    if idempotent and mode is ExecutionMode.LOCAL:
        raise ValueError(
            f"step {name!r}: idempotent=True applies to execution_mode='tasks' or 'actors' steps "
            "(a call lost with a dead replica is retried); a local step runs in the caller"
        )
    return max_batch_size, wait, idempotent


def make_options(
    target: object,
    *,
    execution_mode: object,
    num_replicas: object,
    num_cpus: object,
    num_gpus: object,
    name: object,
    fuse: object,
    pure: object,
    max_batch_size: object = None,
    batch_wait_timeout_s: object = None,
    idempotent: object = False,
) -> StepOptions:
    """Validate the decorator's arguments for `target`."""
    if name is not None and (not isinstance(name, str) or not name):
        raise PipelineTypeError(f"step name must be a non-empty string, got {name!r}")
    step_name = name if isinstance(name, str) else getattr(target, "__name__", repr(target))
    mode = _parse_mode(step_name, execution_mode)
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int):
        raise PipelineTypeError(f"step {step_name!r}: num_replicas must be an int, not {type(num_replicas).__name__}")
    if num_replicas < 1:
        raise PipelineValueError(f"step {step_name!r}: num_replicas must be at least 1, got {num_replicas}")
    if num_replicas > 1 and mode is not ExecutionMode.ACTORS:
        raise PipelineValueError(
            f"step {step_name!r}: num_replicas={num_replicas} needs execution_mode='actors' "
            f"(got {mode.value!r}); replicas are Ray actors"
        )
    for label, flag in (("fuse", fuse), ("pure", pure)):
        if not isinstance(flag, bool):
            raise PipelineTypeError(f"step {step_name!r}: {label} must be True or False, not {flag!r}")
    if pure and isinstance(target, type):
        raise PipelineValueError(
            f"step {step_name!r}: pure=True is for function steps; a class step holds state, "
            "so two calls of it are never merged"
        )
    batch, wait, retry = _parse_serving(step_name, mode, max_batch_size, batch_wait_timeout_s, idempotent)
    return StepOptions(
        name=step_name,
        mode=mode,
        num_replicas=num_replicas,
        num_cpus=_parse_amount(step_name, "num_cpus", num_cpus),
        num_gpus=_parse_amount(step_name, "num_gpus", num_gpus),
        fuse=bool(fuse),
        pure=bool(pure),
        max_batch_size=batch,
        batch_wait_timeout_s=wait,
        idempotent=retry,
    )


def _bind(name: str, signature: inspect.Signature | None, args: tuple[object, ...], kwargs: dict[str, object], what: str) -> None:
    """Check arguments against the signature now, not at the first call."""
    for i, a in enumerate(args):
        check_argument(a, f"step {name!r}, {what} argument {i}")
    for k, v in kwargs.items():
        check_argument(v, f"step {name!r}, {what} argument {k!r}")
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        raise PipelineTypeError(f"step {name!r}: {e} (signature {signature}); fix the {what} arguments") from None


def _signature(fn: Callable[..., object], skip_first: bool = False) -> inspect.Signature | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins without signature metadata: checked at run time
    if skip_first:
        params = list(sig.parameters.values())[1:]
        sig = sig.replace(parameters=params)
    return sig


def _check_synchronous(fn: object, what: str) -> None:
    """Reject callables whose result is not the step's value.

    A step's result is one value. A generator function returns a generator
    object, which LOCAL would hand on as is while Ray would iterate it; an
    async def returns a coroutine, which Ray cannot even pickle. Refusing
    them here keeps every backend alike.
    """
    if inspect.isasyncgenfunction(fn):
        raise PipelineTypeError(
            f"{what} is an async generator (async def with yield); a step returns one value: "
            "make it a plain def that returns a list instead of yielding"
        )
    if inspect.iscoroutinefunction(fn):
        raise PipelineTypeError(
            f"{what} is an async function (async def); make it a plain def: pipeline_ir runs "
            "steps synchronously in their worker; use call_async() on the deployed pipeline "
            "for asyncio"
        )
    if inspect.isgeneratorfunction(fn):
        raise PipelineTypeError(
            f"{what} is a generator function (it yields); a step returns one value: "
            "return a list instead of yielding"
        )


class FunctionStep(StepObject, Generic[R]):
    """A decorated function. Calling it on nodes returns a node."""

    def __init__(self, fn: Callable[..., R], options: StepOptions) -> None:
        _check_synchronous(fn, f"step {options.name!r}")
        self.fn = fn
        self.options = options
        self.signature = _signature(fn)
        functools.update_wrapper(self, fn)

    @property
    def name(self) -> str:
        return self.options.name

    def __call__(self, *args: object, **kwargs: object) -> CallNode:
        _bind(self.name, self.signature, args, kwargs, "call")
        return CallNode(self, args, kwargs)

    def not_a_node(self, where: str) -> str:
        return (
            f"{where}: got the step {self.name!r} itself, not a node; call it on its inputs "
            f"first, e.g. {self.name}(pipeline.INPUT)"
        )

    def __repr__(self) -> str:
        return f"<pipeline step {self.name} ({self.options.mode.value})>"


class ClassStep(StepObject, Generic[T]):
    """A decorated class. Instantiate it with init args to get a configured
    step; the constructor itself runs only at deploy()."""

    def __init__(self, cls: type[T], options: StepOptions) -> None:
        if not any("__call__" in vars(k) for k in cls.__mro__[:-1]):
            raise PipelineTypeError(f"class step {options.name!r} must define __call__(self, ...)")
        _check_synchronous(cls.__call__, f"class step {options.name!r}: __call__")
        self.cls = cls
        self.options = options
        self.init_signature = _signature(cls)
        self.call_signature = _signature(cls.__call__, skip_first=True)
        functools.update_wrapper(self, cls, updated=())

    @property
    def name(self) -> str:
        return self.options.name

    def __call__(self, *init_args: object, **init_kwargs: object) -> ConfiguredStep:
        for value in (*init_args, *init_kwargs.values()):
            if isinstance(value, PipelineNode):
                raise PipelineTypeError(
                    f"class step {self.name!r}: init args are fixed at deploy() and cannot be "
                    f"pipeline nodes; pass nodes to the configured step: {self.name}(...)(node)"
                )
        _bind(self.name, self.init_signature, init_args, init_kwargs, "init")
        return ConfiguredStep(self, init_args, init_kwargs)

    def not_a_node(self, where: str) -> str:
        return (
            f"{where}: got the class step {self.name!r} itself; instantiate it with its init "
            f"args and call it on its inputs, e.g. {self.name}(...)(pipeline.INPUT)"
        )

    def __repr__(self) -> str:
        return f"<pipeline class step {self.name} ({self.options.mode.value})>"


class ConfiguredStep(StepObject):
    """A class step with its init args: one replica pool. Call it on nodes."""

    def __init__(self, step: ClassStep[Any], init_args: tuple[object, ...], init_kwargs: dict[str, object]) -> None:
        self.step = step
        self.init_args = init_args
        self.init_kwargs = init_kwargs

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def options(self) -> StepOptions:
        return self.step.options

    def __call__(self, *args: object, **kwargs: object) -> CallNode:
        _bind(self.name, self.step.call_signature, args, kwargs, "call")
        return CallNode(self, args, kwargs)

    def not_a_node(self, where: str) -> str:
        return (
            f"{where}: got the configured step {self.name!r} without inputs; call it on its "
            f"inputs, e.g. {self.name}(...)(pipeline.INPUT)"
        )

    def __repr__(self) -> str:
        return f"<pipeline step {self.name}(...) ({self.options.mode.value})>"


class _Decorator(Protocol):
    @overload
    def __call__(self, fn_or_cls: type[T], /) -> ClassStep[T]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(self, fn_or_cls: Callable[..., R], /) -> FunctionStep[R]: ...


@overload
def step(fn_or_cls: type[T], /) -> ClassStep[T]: ...  # type: ignore[overload-overlap]
@overload
def step(fn_or_cls: Callable[..., R], /) -> FunctionStep[R]: ...
@overload
def step(
    fn_or_cls: None = None,
    /,
    *,
    execution_mode: ExecutionMode | str = ...,
    num_replicas: int = ...,
    num_cpus: float | None = ...,
    num_gpus: float | None = ...,
    name: str | None = ...,
    fuse: bool = ...,
    pure: bool = ...,
    max_batch_size: int | None = ...,
    batch_wait_timeout_s: float | None = ...,
    idempotent: bool = ...,
) -> _Decorator: ...


def step(
    fn_or_cls: Callable[..., Any] | None = None,
    /,
    *,
    execution_mode: ExecutionMode | str = ExecutionMode.LOCAL,
    num_replicas: int = 1,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    name: str | None = None,
    fuse: bool = True,
    pure: bool = False,
    max_batch_size: int | None = None,
    batch_wait_timeout_s: float | None = None,
    idempotent: bool = False,
) -> Any:
    """Make a function or class a pipeline step; bare `@step` works too.

    execution_mode: ExecutionMode.LOCAL (default, inline in the caller),
        TASKS (a Ray task per call) or ACTORS (a pool of Ray actors); a
        string is accepted, case-insensitive.
    num_replicas: actors in the pool (ACTORS only; default 1).
    num_cpus, num_gpus: Ray resources per task or per replica.
    name: the step's name in dumps and errors (default: `__name__`).
    fuse: False keeps optimization passes from merging this step.
    pure: True declares that equal inputs give equal results, so two calls
        on the same inputs may run once (function steps only).
    max_batch_size: dynamic batching (ACTORS only): a replica runs up to
        this many calls at once; the function (or `__call__`) takes a list
        of inputs and returns a list of results of equal length, while
        callers still pass one input each.
    batch_wait_timeout_s: how long a batch waits to fill after its first
        call (default 0.01; only with max_batch_size).
    idempotent: True declares that running a call twice is harmless, so a
        call lost with a dead replica may be retried on another one
        (TASKS and ACTORS only).
    """

    def decorate(target: Callable[..., Any]) -> FunctionStep[Any] | ClassStep[Any]:
        if isinstance(target, (FunctionStep, ClassStep)):
            raise PipelineTypeError(f"{target!r} is already a pipeline step; decorate it once")
        if not callable(target):
            raise PipelineTypeError(f"pipeline.step decorates a function or a class, not {type(target).__name__}")
        options = make_options(
            target,
            execution_mode=execution_mode,
            num_replicas=num_replicas,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            name=name,
            fuse=fuse,
            pure=pure,
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            idempotent=idempotent,
        )
        if isinstance(target, type):
            return ClassStep(target, options)
        return FunctionStep(target, options)

    if fn_or_cls is None:
        return decorate
    return decorate(fn_or_cls)
