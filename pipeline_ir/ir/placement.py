"""`Placement`: where and how one unit of a graph runs.

A unit is a step (every call of one StepSpec shares its replica pool) or a
fused group. Both carry one `Placement`, so passes and backends read and
rewrite placement as one value (`msgspec.structs.replace(p, colocate=...)`)
instead of copying fields one by one.

Fields set by the user (`@pipeline.step(...)`): mode, num_replicas,
num_cpus, num_gpus, batching, idempotent. Fields set by passes: colocate
(colocate.py), channel (use_channels.py); fusion passes combine the
members' placements into the group's (passes/grouping.py).
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import msgspec

Mode: TypeAlias = Literal["local", "tasks", "actors"]

# What `batch_wait_timeout_s` is when only `max_batch_size` is given.
DEFAULT_BATCH_WAIT_S = 0.01


class Batching(msgspec.Struct, frozen=True, kw_only=True):
    """Dynamic batching of an ACTORS unit: a replica gathers up to
    `max_batch_size` single calls, waiting at most `batch_wait_timeout_s`
    after the first, and runs the step once on the list of them (the step
    takes a list and returns a list of equal length)."""

    max_batch_size: int
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S


class Placement(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where a unit runs and with what. The default is a LOCAL unit that
    reserves nothing."""

    mode: Mode = "local"
    # Actors in the pool (ACTORS only).
    num_replicas: int = 1
    # Ray resources per task or per replica; None: Ray's default.
    num_cpus: float | None = None
    num_gpus: float | None = None
    # Units with the same label are scheduled on the same Ray node, so
    # tensors between them stay on one machine. Set by the colocate pass.
    colocate: str | None = None
    # Calls reach the (single) replica over Ray Compiled Graph channels
    # instead of one actor task each. Set by the use_channels pass.
    channel: bool = False
    # ACTORS only: calls are gathered into batches (see Batching).
    batching: Batching | None = None
    # A call lost with a dead replica may be run again on another one.
    idempotent: bool = False

    @property
    def remote(self) -> bool:
        """Whether the unit runs in a Ray process (TASKS or ACTORS)."""
        return self.mode != "local"
