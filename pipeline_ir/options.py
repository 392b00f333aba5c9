"""`DeployOptions`: how a deployed pipeline serves calls (`deploy(...)`).

Checked when `deploy()` is called, before anything starts: a bad value is
a ValueError naming the option and saying what it takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, TypedDict

from pipeline_ir.errors import PipelineValueError


@dataclass(frozen=True, kw_only=True)
class DeployOptions:
    """Options of `deploy()`; docs/operations.md says how to size them.

    max_in_flight: calls admitted at once for the whole pipeline (None: no
        bound). Past it, a call waits up to `overload_timeout_s` for a slot,
        then raises PipelineOverloadedError; `map()` waits instead.
    overload_timeout_s: how long a call waits for a slot (0: not at all).
    deploy_timeout_s: how long `deploy()` waits for every replica to be
        built (constructors, resources); past it, it raises
        PipelineTimeoutError naming the step, and ends every actor started.
    check_resources: what the `place` pass checks the deployment against
        before anything starts: "available" (what the nodes have free
        now), "total" (what they have in all: deploy() may then wait for
        resources other work holds, up to deploy_timeout_s), or "off"
        (autoscaling clusters: nodes come on demand).
    health_check_period_s: how often each actor replica is pinged; one that
        does not answer within `health_check_timeout_s` (a stopped process,
        a lost node) is replaced, and its calls fail or are retried.
    max_retries: how many times a call of an `idempotent=True` step that
        was lost with its replica is sent to another replica.
    abandon_grace_s: after a call's deadline, how long an actor replica may
        stay busy with the abandoned call before it is replaced (Ray cannot
        interrupt a running actor call).
    fast_path: call actor replicas on this machine over the same-node fast
        path (a Unix socket to the replica, shared memory for large
        buffers; docs/design.md "Fast path") instead of Ray actor tasks.
        Replicas on other nodes, and calls whose inputs are Ray object
        refs, always go through Ray. False: every call through Ray.
    cuda_ipc: on the fast path, pass CUDA tensors between this process and
        replicas with GPUs by CUDA IPC (the receiver maps the sender's GPU
        memory and clones it there) instead of through host memory; needs
        torch with CUDA in this process and the GPU in view of both sides
        (docs/design.md, "CUDA tensors between GPU steps"). Off by default
        until it has been measured on a GPU.
    """

    max_in_flight: int | None = None
    overload_timeout_s: float = 0.0
    deploy_timeout_s: float = 300.0
    check_resources: Literal["available", "total", "off"] = "available"
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 10.0
    max_retries: int = 3
    abandon_grace_s: float = 5.0
    fast_path: bool = True
    cuda_ipc: bool = False

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and (
            isinstance(self.max_in_flight, bool) or not isinstance(self.max_in_flight, int) or self.max_in_flight < 1
        ):
            raise PipelineValueError(f"deploy(): max_in_flight must be an int >= 1 or None, got {self.max_in_flight!r}")
        if self.check_resources not in ("available", "total", "off"):
            raise PipelineValueError(
                f"deploy(): check_resources must be 'available', 'total' or 'off', got {self.check_resources!r}"
            )
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise PipelineValueError(f"deploy(): max_retries must be an int >= 0, got {self.max_retries!r}")
        for name in ("fast_path", "cuda_ipc"):
            if not isinstance(getattr(self, name), bool):
                raise PipelineValueError(f"deploy(): {name} must be True or False, got {getattr(self, name)!r}")
        for f in fields(self):
            if f.name.endswith("_s"):
                value = getattr(self, f.name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise PipelineValueError(f"deploy(): {f.name} must be a number of seconds >= 0, got {value!r}")
        for name in ("health_check_period_s", "health_check_timeout_s", "deploy_timeout_s"):
            if getattr(self, name) == 0:
                raise PipelineValueError(f"deploy(): {name} must be > 0")


def check_timeout(where: str, timeout: object) -> float | None:
    """A call's `timeout=` argument, checked: None or seconds > 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise PipelineValueError(f"{where}: timeout must be a number of seconds > 0 or None, got {timeout!r}")
    return float(timeout)


class DeployKwargs(TypedDict, total=False):
    """The keyword arguments of `deploy()`: the fields of DeployOptions."""

    max_in_flight: int | None
    overload_timeout_s: float
    deploy_timeout_s: float
    check_resources: Literal["available", "total", "off"]
    health_check_period_s: float
    health_check_timeout_s: float
    max_retries: int
    abandon_grace_s: float
    fast_path: bool
    cuda_ipc: bool
