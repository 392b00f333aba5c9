"""Compiled Graph channels to one actor replica (`channel=True` units).

The use_channels pass marks single-replica ACTORS units whose inputs and
readers are all in the caller. For such a unit, the actors backend compiles
a one-node Ray Compiled Graph over its replica at deploy: the replica then
runs a loop that reads each call from a shared-memory channel and writes
the result to another, and a call costs a channel write and a read instead
of an actor task (see docs/backends.md for the figures).

`Channel.submit` returns a CompiledDAGRef, which the generated code fetches
with the same `_get` as an ObjectRef. A compiled graph is not thread-safe,
so submissions hold a lock. This module holds the compiled graph's
lifecycle only; the pool (pool.py) decides when to build or rebuild
it, and the replica runs one call at a time whichever way it arrives.
"""

from __future__ import annotations

import logging
import threading
from typing import Any


class Channel:
    """A compiled graph calling `Replica.call_packed` on one actor."""

    def __init__(self, handle: Any) -> None:
        from ray.dag import InputNode

        with InputNode() as inp:
            dag = handle.call_packed.bind(inp)
        self.dag: Any = dag.experimental_compile()
        self._lock = threading.Lock()

    def submit(self, node_id: int, args: tuple[object, ...], kwargs: dict[str, object]) -> Any:
        """Send one call; returns its CompiledDAGRef."""
        with self._lock:
            return self.dag.execute((node_id, args, kwargs))

    def close(self) -> None:
        """Stop the replica's loop and free the channels (the actor stays)."""
        try:
            self.dag.teardown()
        except Exception:
            pass  # the actor is already gone: nothing left to stop


# Ray's compiled graphs log four INFO lines per graph at every teardown
# (each shutdown(), each replaced replica), and, when the graph's actor
# died, an error with the RayActorError's traceback. The pipeline reports
# that death to the caller as a StepError naming the step and replaces the
# replica, so both are noise here. Quieted by logger and level (INFO, unless
# the user set this logger's level) and by exception type; other records of
# Ray's compiled graphs pass.
_CG_LOGGER = logging.getLogger("ray.dag.compiled_dag_node")


class _DropActorDeaths(logging.Filter):
    """Drops records that carry a RayActorError (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        import ray.exceptions

        return not (record.exc_info is not None and isinstance(record.exc_info[1], ray.exceptions.RayActorError))


if _CG_LOGGER.level == logging.NOTSET:
    _CG_LOGGER.setLevel(logging.WARNING)
_CG_LOGGER.addFilter(_DropActorDeaths())
