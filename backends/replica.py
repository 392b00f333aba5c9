"""`Replica`: the Ray actor that hosts one unit of an ACTORS pool.

What runs inside the actor process: it builds the unit's step objects in
its first call, `ready()` (class steps run `__init__` once per replica),
not in the actor's constructor, then runs the calls the pool routes to
it. `where()`, on the control thread, answers as soon as the process is
up, so a deploy that times out can tell a replica Ray has not started
(waiting for resources) from one whose constructor still runs. Two
concurrency groups keep the control path apart from the work:

- calls (the default group): one at a time for a plain unit, so Ray keeps
  the rest queued, where a deadline can still cancel them; up to
  `max_batch_size` at once for a batched step, whose calls meet in the
  replica's `Batcher` (batching.py) and run as one list;
- "control" (one thread of its own): `where`, `ping` for health checks
  and `batch_stats`, answered even while a call (or the build) runs, so a busy replica is
  never mistaken for a hung one, and a stopped process (SIGSTOP) or a lost
  node is (health.py).

With a caller (its pid and Ray node), a replica on the caller's node also
serves its calls over the same-node fast path (fast_transport.py): once
built, `ready()` starts a `FastServer` that admits only that process, and
returns its address with the rest. A replica on another node starts none:
the caller could not reach it, and a replica killed there (SIGKILL: no
cleanup of its own) would leave its socket's files behind.
Those calls run on the server's connection threads, one at a time with
the actor's own (the same lock), or into the batcher.

This module decides nothing: the pool (pool.py) routes, the monitor
(health.py) judges.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import ray

from pipeline_ir.backends import cuda_ipc
from pipeline_ir.backends.batching import Batcher
from pipeline_ir.backends.fast_server import FastServer
from pipeline_ir.backends.fast_transport import Address, supported, this_node
from pipeline_ir.backends.serialization import ensure_registered
from pipeline_ir.backends.worker import Unit, shippable
from pipeline_ir.errors import StepError

CONTROL = "control"


class Replica:
    """One actor of a pool: hosts a unit and runs its calls."""

    def __init__(self, unit: Unit, caller: tuple[int, str, tuple[str, ...]] | None = None) -> None:
        self.unit = unit
        # (pid, node, GPUs) of the process whose calls the fast path serves;
        # its GPUs (UUIDs) are set when it asked for CUDA IPC (cuda_ipc.py).
        self.caller = caller
        self.server: FastServer | None = None
        self.error: StepError | None = None
        self.batcher: Batcher | None = None
        self._built = False
        self._building = threading.Lock()
        # Calls come as actor tasks and, for channel units, also from the
        # compiled graph's loop thread: one at a time all the same.
        self._one_at_a_time = threading.Lock()

    def _build(self) -> None:
        """Build the unit, once (class steps run `__init__`)."""
        with self._building:
            if self._built:
                return
            try:
                self.unit.build()
                batched = self.unit.batched()
            except StepError as e:
                # Kept and raised by ready() and call(): the replica lives on
                # to say why, rather than dying as a bare ActorDiedError.
                self.error = shippable(e)
                batched = None
            if batched is not None:
                fn, size, wait = batched
                self.batcher = Batcher(fn, size, wait, self.unit.label, self.unit.node.id, self.unit.step_error)
            self._built = True

    @ray.method(concurrency_group=CONTROL)
    def where(self) -> tuple[int, str, str]:
        """This replica's pid, Ray node id and Ray actor id: answered as
        soon as the process is up, built or not."""
        return _where()

    def ready(self) -> tuple[int, str, str, Address | None]:
        """Build the unit; then this replica's pid, node, actor id and
        fast-path address (None: no fast path)."""
        self._build()
        if self.error is not None:
            raise self.error
        return (*_where(), self._serve_fast())

    def _serve_fast(self) -> Address | None:
        if self.caller is None or not supported():
            return None
        pid, node, caller_gpus = self.caller
        if node != this_node():
            return None
        with self._building:
            if self.server is None:
                # Only a replica Ray gave GPUs looks for them (importing torch).
                gpus = cuda_ipc.visible_gpus() if caller_gpus and ray.get_gpu_ids() else ()
                server = FastServer(self.call, [pid], on_unsendable=self._unsendable, gpus=gpus, caller_gpus=caller_gpus)
                server.start()
                self.server = server
            return self.server.address

    def _unsendable(self, args: tuple[Any, ...], error: Exception) -> BaseException:
        node_id = args[0] if args and isinstance(args[0], int) else self.unit.node.id
        label = self.unit.label
        return StepError(
            label,
            node_id,
            message=f"step {label!r} (node %{node_id}): its result could not be pickled back to the caller: {type(error).__name__}: {error}",
        )

    def call(self, node_id: int, *args: object, **kwargs: object) -> object:
        """Run the unit as node `node_id`."""
        if not self._built:
            self._build()  # calls run out of order: one may come before ready()
        if self.error is not None:
            raise self.error
        if self.batcher is not None:
            # A batched step takes one item (its one parameter) per call.
            item = args[0] if args else next(iter(kwargs.values()))
            result = self.batcher(item)
            ensure_registered()
            return result
        with self._one_at_a_time:
            return self.unit(node_id, *args, **kwargs)

    def call_packed(self, payload: tuple[int, tuple[object, ...], dict[str, object]]) -> object:
        """`call` with its arguments in one value, as a compiled graph sends them."""
        node_id, args, kwargs = payload
        return self.call(node_id, *args, **kwargs)

    @ray.method(concurrency_group=CONTROL)
    def ping(self) -> int:
        """Answered on the control thread: the process runs and Ray reaches it."""
        return os.getpid()

    @ray.method(concurrency_group=CONTROL)
    def batch_stats(self) -> tuple[int, int]:
        """(items, batches) this replica's batcher has run."""
        return self.batcher.stats() if self.batcher is not None else (0, 0)

    def __repr__(self) -> str:
        # Ray prefixes the actor's log lines with this: kept ASCII, as Ray
        # encodes some of what it names after user code as ASCII.
        return f"Replica({ascii(self.unit.label)[1:-1]})"


def _where() -> tuple[int, str, str]:
    context = ray.get_runtime_context()
    actor_id = context.get_actor_id()
    assert actor_id is not None  # this runs in an actor
    return os.getpid(), context.get_node_id(), actor_id


_remote: Any = ray.remote
RemoteReplica: Any = _remote(concurrency_groups={CONTROL: 1})(Replica)


def call_concurrency(unit: Unit) -> int:
    """How many calls a replica of `unit` runs at once: a batch's worth
    for a batched step, else one."""
    batching = unit.graph.unit_placement(unit.node).batching
    return 1 if batching is None else batching.max_batch_size
