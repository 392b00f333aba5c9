"""Dynamic batching inside an actor replica (`max_batch_size` steps).

Callers pass one item each; the step's callable takes a list and returns a
list of the same length. A replica of a batched step accepts up to
`max_batch_size` calls at once (a threaded Ray actor); each call puts its
item in the replica's queue and waits for its own result. One batcher
thread per replica takes the first waiting item, waits up to
`batch_wait_timeout_s` for more (never past `max_batch_size`), runs the
batch, and hands each caller its result. The batcher blocks on a
condition variable while the queue is empty: an idle replica costs no CPU.

As in Triton's dynamic batcher (a preferred size and a maximum queue
delay) and Ray Serve's `@serve.batch`, the wait bounds the latency a
lone request pays; unlike `@serve.batch`, callers never see the batching:
the pipeline's code passes single items and gets single results, so
replicas, least-loaded routing, retries and deadlines work unchanged.

A batch that raises fails each of its calls with that error; a result that
is not a list of the batch's length fails them with a StepError naming the
step (the caller sees which step broke the contract).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeline_ir.errors import StepError


class _Pending:
    """One call waiting in the queue for its result."""

    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: object) -> None:
        self.item = item
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


class Batcher:
    """Collects single calls into batches for `fn` (list in, list out)."""

    def __init__(
        self,
        fn: Callable[..., object],
        max_batch_size: int,
        wait_s: float,
        label: str,
        node_id: int,
        wrap_error: Callable[[Exception, int], BaseException],
    ) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.label = label
        self.node_id = node_id
        self.wrap_error = wrap_error  # a step's exception -> the StepError callers get
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name=f"pipeline_ir-batcher-{label}", daemon=True)
        self._thread.start()

    def __call__(self, item: object) -> object:
        """Run `item` in the next batch; returns its result (blocking)."""
        pending = _Pending(item)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the batcher of step {self.label!r} is closed")
            self._queue.append(pending)
            self._cond.notify()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def stats(self) -> tuple[int, int]:
        """(items, batches) run so far."""
        return self.items, self.batches

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed and not self._queue:
                return None
            # The first item is here: wait a little for company.
            deadline = time.monotonic() + self.wait_s
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._queue[: self.max_batch_size]
            del self._queue[: self.max_batch_size]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        try:
            results = self.fn([p.item for p in batch])
            if isinstance(results, (str, bytes)) or not isinstance(results, Sequence) or len(results) != len(batch):
                got = f"{len(results)} results" if isinstance(results, Sequence) else f"a {type(results).__name__}"
                raise _ContractError(
                    StepError(
                        self.label,
                        self.node_id,
                        TypeError(f"batched step returned {got} for a batch of {len(batch)}"),
                        message=(
                            f"step {self.label!r} (node %{self.node_id}) is batched (max_batch_size="
                            f"{self.max_batch_size}): it must return a list with one result per item, "
                            f"but returned {got} for a batch of {len(batch)}"
                        ),
                    )
                )
        except _ContractError as e:
            for p in batch:
                p.error = e.error
        except Exception as e:
            error = self.wrap_error(e, self.node_id)
            for p in batch:
                p.error = error
        else:
            self.batches += 1
            self.items += len(batch)
            for p, r in zip(batch, results):
                p.result = r
        for p in batch:
            p.done.set()


class _ContractError(Exception):
    def __init__(self, error: StepError) -> None:
        self.error = error


def one_at_a_time(fn: Callable[..., object]) -> Callable[[object], object]:
    """A batched step's callable run on single items (LOCAL and TASKS, and
    `compile(backend=...)` forcing a batched step there): a batch of one."""

    def single(item: object) -> object:
        results = fn([item])
        if isinstance(results, (str, bytes)) or not isinstance(results, Sequence) or len(results) != 1:
            got = f"{len(results)} results" if isinstance(results, Sequence) else f"a {type(results).__name__}"
            raise TypeError(f"batched step returned {got} for a batch of 1; it must return a list with one result per item")
        return results[0]

    return single
