"""`Bindings`: the run-time objects a Graph names but cannot hold as data.

The tracer (trace.py) fills them beside the Graph; the backends read them
when they lower and run it. This module imports nothing of pipeline_ir, so
a Ray worker that unpickles bindings never imports the tracer or the
builder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepBinding:
    """What a step key stands for at run time: a function, or a class with
    the init args its replicas are built with."""

    target: Callable[..., object]
    init_args: tuple[object, ...] = ()
    init_kwargs: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Bindings:
    """The run-time objects a Graph names but cannot hold as data: the
    callable of each step key, and each External constant by its key."""

    steps: Mapping[str, StepBinding]
    constants: Mapping[str, object]
