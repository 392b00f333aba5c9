"""Waiting for replicas to come up, and saying why they did not.

`not_ready` is the error of a deploy (or of a pool's first replica) not
ready within `deploy_timeout_s`: per replica, whether Ray has started its
process (`where()` answered: its constructor is still running) or not (it
waits for resources, or for a worker process). `learn_placement` fills in
where a replica runs once its process is up, without waiting for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from pipeline_ir.errors import PipelineTimeoutError

if TYPE_CHECKING:
    from pipeline_ir.backends.pool import Pool, Slot


def learn_placement(slot: Slot) -> None:
    """Fill in the pid and node of a replica not known to be ready (a
    replacement, or one a deploy gave up on) if its process is up by now,
    without waiting for it."""
    if slot.pid is not None or slot.up_ref is None:
        return
    up, _ = ray.wait([slot.up_ref], timeout=0)
    if up:
        try:
            slot.pid, slot.node, _actor = ray.get(up[0])
        except ray.exceptions.RayError:
            pass  # it failed to start: no process to wait for


def not_ready(pool: Pool, slots: list[Slot]) -> PipelineTimeoutError:
    """The error of a deploy whose `slots` of `pool` were not ready in
    time: for each, whether Ray has started its process (its constructor
    is running) or not (waiting for resources)."""
    building: list[str] = []
    waiting: list[str] = []
    for slot in slots:
        up = [] if slot.up_ref is None else ray.wait([slot.up_ref], timeout=0)[0]
        if up:
            try:
                pid, node, _actor = ray.get(up[0])
            except ray.exceptions.RayError:
                waiting.append(str(slot.index))
                continue
            building.append(f"{slot.index} (pid {pid} on node {node[:8]})")
        else:
            waiting.append(str(slot.index))
    label = pool.unit.label
    parts = []
    if building:
        parts.append(f"{_replicas(building)} still running {'its constructor' if len(building) == 1 else 'their constructors'}")
    if waiting:
        needs = ", ".join(f"{k}={v:g}" for k, v in pool.options.items() if k in ("num_cpus", "num_gpus"))
        they = "it waits" if len(waiting) == 1 else "they wait"
        parts.append(
            f"{_replicas(waiting)} not started by Ray: {they} for resources ({needs or 'CPU=1 to start'} per replica) "
            "no node has free, or for a worker process"
        )
    return PipelineTimeoutError(
        f"deploy(): step {label!r} was not ready within deploy_timeout_s: " + "; ".join(parts)
        + ". Every actor the deploy started was stopped. Make the constructor return sooner, free or add "
        "resources, or deploy(deploy_timeout_s=...) to wait longer",
        step_name=label,
        node_id=pool.node_ids[0],
    )


def _replicas(which: list[str]) -> str:
    return f"replica{'' if len(which) == 1 else 's'} {', '.join(which)}"
