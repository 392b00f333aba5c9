"""CUDA tensors over the fast path by CUDA IPC (backends/cuda_ipc.py), on a
machine without a GPU.

What goes wrong silently with CUDA IPC is lifetime: torch counts one
reader per export, so an export opened twice frees memory under a reader,
and one never opened holds the sender's memory until its process ends.
That bookkeeping is ours, and it is tested here against a ledger standing
in for torch's CUDA calls (cuda_ipc's `_`-prefixed functions): "GPU"
tensors are CPU tensors the ledger marks, an export is a token, and every
token must end opened once or given back once, whatever happened to the
call that carried it. The CUDA calls themselves run on a GPU machine
(benchmarks/gpu/gpu_bench.py, which checks the values it moves).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline_ir as pipeline
from pipeline_ir.backends import cuda_ipc
from pipeline_ir.backends.fast_client import FastClient
from pipeline_ir.backends.fast_server import FastServer
from pipeline_ir.backends.fast_transport import CallTimeout, RemoteFailure, supported, this_node
from pipeline_ir.backends.replica import Replica
from pipeline_ir.backends.worker import Unit
from pipeline_ir.errors import PipelineValueError
from pipeline_ir.ir.nodes import Call

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not supported(), reason="the fast path needs Linux (Unix sockets, SO_PEERCRED, memfd)")

GPU, OTHER_GPU = "GPU-test-0", "GPU-test-1"


def _rebuild(*args: Any) -> Any:
    raise AssertionError("the ledger opens exports itself")


class Ledger:
    """torch's CUDA IPC calls, for the test: who exported what, and how
    often each export was opened or given back."""

    def __init__(self, sees: tuple[str, ...] = (GPU,)) -> None:
        self.sees = sees  # the GPUs this process opens handles on
        self.lock = threading.Lock()
        self.gpu: dict[int, tuple[weakref.ref[Any], str]] = {}
        self.exported: dict[int, Any] = {}  # token: the tensor (the sender's memory, held)
        self.opened: collections.Counter[int] = collections.Counter()
        self.released: collections.Counter[int] = collections.Counter()
        self.tokens = itertools.count()

    def on(self, t: Any, gpu: str = GPU) -> Any:
        """Mark `t` as living on `gpu`."""
        with self.lock:
            self.gpu[id(t)] = (weakref.ref(t), gpu)
        return t

    def gpu_of(self, t: Any) -> str | None:
        entry = self.gpu.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def export(self, t: Any) -> tuple[Any, tuple[Any, ...]]:
        with self.lock:
            token = next(self.tokens)
            self.exported[token] = t
        return _rebuild, (token,)

    def import_(self, rebuild: Any, args: tuple[Any, ...], index: int) -> Any:
        assert rebuild is _rebuild and self.sees[index]
        with self.lock:
            self.opened[args[0]] += 1
            return self.exported[args[0]]

    def own(self, view: Any) -> Any:
        return self.on(view.clone(), self.gpu_of(view) or GPU)

    def release(self, args: tuple[Any, ...]) -> None:
        with self.lock:
            self.released[args[0]] += 1

    def local_index(self, gpu: str) -> int | None:
        return self.sees.index(gpu) if gpu in self.sees else None

    def settled(self) -> bool:
        """Every export opened once or given back once, none both."""
        with self.lock:
            return all(self.opened[t] + self.released[t] == 1 for t in self.exported)

    def check(self, exports: int, released: int = 0) -> None:
        with self.lock:
            assert len(self.exported) == exports
            assert sum(self.released.values()) == released
            twice = {t: (self.opened[t], self.released[t]) for t in self.exported if self.opened[t] + self.released[t] != 1}
        assert not twice, f"exports not opened or given back exactly once (token: (opened, given back)): {twice}"


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Ledger:
    ledger = Ledger()
    monkeypatch.setattr(cuda_ipc, "_gpu_of", ledger.gpu_of)
    monkeypatch.setattr(cuda_ipc, "_export", ledger.export)
    monkeypatch.setattr(cuda_ipc, "_import", ledger.import_)
    monkeypatch.setattr(cuda_ipc, "_own", ledger.own)
    monkeypatch.setattr(cuda_ipc, "_release", ledger.release)
    monkeypatch.setattr(cuda_ipc, "_local_index", ledger.local_index)
    monkeypatch.setattr(cuda_ipc, "_uuids", lambda: ledger.sees)
    return ledger


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object does not pickle")


def _serve(handler: Any, gpus: tuple[str, ...] = (GPU,), caller_gpus: tuple[str, ...] = (GPU,)) -> tuple[FastServer, FastClient]:
    server = FastServer(handler, [os.getpid()], gpus=gpus, caller_gpus=caller_gpus)
    return server, FastClient(server.start())


@pytest.fixture
def served() -> Iterator[list[tuple[FastServer, FastClient]]]:
    pairs: list[tuple[FastServer, FastClient]] = []
    yield pairs
    for server, client in pairs:
        client.close()
        server.close()


def _wait_for(condition: Any, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


# -- both ways, values intact, each export opened once


def test_a_cuda_tensor_goes_both_ways_by_ipc_and_arrives_as_a_tensor_of_its_own(ledger: Ledger, served: list[Any]) -> None:
    seen: list[Any] = []

    def double(x: Any) -> Any:
        seen.append(x)
        return ledger.on(x * 2)

    served.append(_serve(double))
    _, client = served[0]
    x = ledger.on(torch.arange(6.0))
    before = cuda_ipc.counts()
    got = client.call((x,))
    after = cuda_ipc.counts()
    assert {k: after[k] - before[k] for k in after} == {"exported": 2, "opened": 2, "given_back": 0}  # what the GPU test reads
    assert torch.equal(got, torch.arange(6.0) * 2)
    assert ledger.gpu_of(got) == GPU and ledger.gpu_of(seen[0]) == GPU  # still on the GPU, both ways
    assert seen[0] is not x and got is not ledger.exported[1]  # clones: neither side maps the other's memory any more
    ledger.check(exports=2)


def test_a_step_that_changes_its_input_in_place_leaves_the_callers_tensor_alone(ledger: Ledger, served: list[Any]) -> None:
    kept: list[Any] = []

    def scribble(x: Any) -> Any:
        x.add_(100)  # on a mapping of the caller's memory this would change the caller's tensor
        kept.append(x)  # and keeping it past the call would pin the caller's memory
        return ledger.on(x[:2])

    served.append(_serve(scribble))
    x = ledger.on(torch.zeros(4))
    got = served[0][1].call((x,))
    assert torch.equal(x, torch.zeros(4)) and torch.equal(got, torch.full((2,), 100.0))
    ledger.check(exports=2)


def test_a_value_sent_to_two_replicas_is_exported_once_for_each(ledger: Ledger, served: list[Any]) -> None:
    served.extend([_serve(lambda x: float(x.sum())), _serve(lambda x: float(x.max()))])
    x = ledger.on(torch.arange(5.0))
    pending = [client.send((x,)) for _, client in served]  # both in flight at once
    assert [p.wait() for p in pending] == [10.0, 4.0]
    ledger.check(exports=2)


def test_shared_references_in_one_value_are_exported_once_and_stay_shared(ledger: Ledger, served: list[Any]) -> None:
    served.append(_serve(lambda pair: (pair[0] is pair[1], ledger.on(pair[0] + 1))))
    x = ledger.on(torch.ones(3))
    same, y = served[0][1].call(([x, x],))
    assert same and torch.equal(y, torch.full((3,), 2.0))
    ledger.check(exports=2)


def test_from_asyncio(ledger: Ledger, served: list[Any]) -> None:
    served.append(_serve(lambda x: ledger.on(-x)))
    x = ledger.on(torch.arange(3.0))

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(served[0][1].call_async((x,)) for _ in range(4))))

    for got in asyncio.run(main()):
        assert torch.equal(got, -torch.arange(3.0))
    ledger.check(exports=8)


def test_only_to_a_peer_that_sees_the_gpu(ledger: Ledger, served: list[Any]) -> None:
    """A replica without GPUs (or a caller without CUDA) is sent the
    tensor's bytes, as without cuda_ipc; so is a tensor on a GPU the peer
    does not see."""
    served.append(_serve(lambda x: ledger.on(x + 1), gpus=(), caller_gpus=()))
    x = ledger.on(torch.arange(3.0))
    assert torch.equal(served[0][1].call((x,)), torch.arange(3.0) + 1)
    ledger.check(exports=0)
    served.append(_serve(lambda x: ledger.on(x + 1, OTHER_GPU)))
    got = served[1][1].call((ledger.on(torch.arange(3.0), OTHER_GPU),))
    assert torch.equal(got, torch.arange(3.0) + 1)
    ledger.check(exports=0)


# -- exports that reach no reader are given back


def test_a_result_that_fails_to_pickle_after_its_tensor_gives_the_export_back(ledger: Ledger, served: list[Any]) -> None:
    served.append(_serve(lambda x: (ledger.on(x * 2), Unpicklable())))
    with pytest.raises(RemoteFailure, match="could not be pickled back"):
        served[0][1].call((torch.ones(2),))  # a CPU argument: only the result exports
    ledger.check(exports=1, released=1)


def test_arguments_that_fail_to_pickle_after_a_tensor_give_the_export_back(ledger: Ledger, served: list[Any]) -> None:
    served.append(_serve(lambda *args: None))
    x = ledger.on(torch.ones(2))
    with pytest.raises(TypeError, match="does not pickle"):
        served[0][1].call((x, Unpicklable()))

    async def main() -> None:
        await served[0][1].call_async((x, Unpicklable()))

    with pytest.raises(TypeError, match="does not pickle"):
        asyncio.run(main())
    ledger.check(exports=2, released=2)


def test_a_result_whose_frame_cannot_be_built_gives_the_export_back(ledger: Ledger, served: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_ir.backends import fast_segments

    def no_memory(self: Any, raw: Any) -> Any:
        raise OSError(12, "no memory for a segment")

    served.append(_serve(lambda x: (ledger.on(x + 1), torch.zeros(1 << 20))))  # 4 MB: a segment
    monkeypatch.setattr(fast_segments.Outbox, "place", no_memory)
    with pytest.raises(RemoteFailure, match="the result could not be sent"):
        served[0][1].call((torch.ones(2),))
    ledger.check(exports=1, released=1)


def test_a_value_given_back_twice_gives_its_exports_back_once(ledger: Ledger) -> None:
    from pipeline_ir.backends import fast_frames

    pickled = fast_frames.dumps((ledger.on(torch.ones(2)),), frozenset({GPU}))
    pickled.unsent()
    pickled.unsent()  # as when the error frame replacing an unbuildable result cannot be sent either
    ledger.check(exports=1, released=1)


def test_an_answer_its_caller_gave_up_on_gives_the_export_back(ledger: Ledger, served: list[Any]) -> None:
    def slow(x: Any) -> Any:
        time.sleep(0.3)
        return ledger.on(x + 1)

    served.append(_serve(slow))
    with pytest.raises(CallTimeout):
        served[0][1].call((torch.ones(2),), timeout=0.05)  # the connection is closed under the call
    assert _wait_for(lambda: ledger.exported and ledger.settled())
    ledger.check(exports=1, released=1)


def test_a_call_that_cannot_reach_its_replica_gives_the_export_back(ledger: Ledger, served: list[Any]) -> None:
    served.append(_serve(lambda x: x))
    server, client = served[0]
    assert client.call((1,)) == 1  # a connection, idle now
    server.close()
    time.sleep(0.05)
    with pytest.raises(ConnectionError):
        client.call((ledger.on(torch.ones(2)),))  # sent on the idle connection, whose peer is gone
    with pytest.raises(ConnectionError):
        client.call((ledger.on(torch.ones(2)),))  # no connection at all

    async def main() -> None:
        await served[1][1].call_async((ledger.on(torch.ones(2)),))

    served.append(_serve(lambda x: x))
    asyncio.run(served[1][1].call_async((1,)))
    served[1][0].close()
    time.sleep(0.05)
    with pytest.raises(ConnectionError):
        asyncio.run(main())
    ledger.check(exports=3, released=3)


def test_a_receiver_that_does_not_see_the_gpu_says_so_and_gives_the_export_back(ledger: Ledger, served: list[Any]) -> None:
    """Only if a process said it sees a GPU that it does not: the error
    says how to turn CUDA IPC off."""
    served.append(_serve(lambda x: ledger.on(x + 1, OTHER_GPU), caller_gpus=(GPU, OTHER_GPU)))
    with pytest.raises(RemoteFailure, match=f"from GPU {OTHER_GPU}, which this process does not see.*cuda_ipc=False"):
        served[0][1].call((torch.ones(2),))
    ledger.check(exports=1, released=1)


def test_an_export_that_fails_to_open_is_given_back(ledger: Ledger, served: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(rebuild: Any, args: tuple[Any, ...], index: int) -> Any:
        raise RuntimeError("cudaIpcOpenMemHandle failed")

    served.append(_serve(lambda x: ledger.on(x + 1)))
    monkeypatch.setattr(cuda_ipc, "_import", broken)
    with pytest.raises(RemoteFailure, match="cudaIpcOpenMemHandle failed"):
        served[0][1].call((torch.ones(2),))
    ledger.check(exports=1, released=1)


# -- any value: structure, identity and values kept, every export settled


def _values(ledger: Ledger) -> st.SearchStrategy[Any]:
    def tensor(args: tuple[int, bool, str]) -> Any:
        n, on_gpu, dtype = args
        t = torch.arange(n, dtype=getattr(torch, dtype))
        return ledger.on(t) if on_gpu else t

    leaves = st.one_of(
        st.tuples(st.integers(0, 300_000), st.booleans(), st.sampled_from(["float32", "int64", "uint8"])).map(tensor),
        st.integers(),
        st.text(max_size=5),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.tuples(inner, inner),
            st.dictionaries(st.text(max_size=3), inner, max_size=3),
            inner.map(lambda v: [v, v]),  # the same object twice
        ),
        max_leaves=8,
    )


def _same(a: Any, b: Any, ledger: Ledger) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
        assert (ledger.gpu_of(a) is None) == (ledger.gpu_of(b) is None)  # a GPU tensor comes back on the GPU
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y, ledger)
        if isinstance(a, list) and len(a) == 2 and isinstance(a[0], torch.Tensor) and a[0] is a[1]:
            assert b[0] is b[1]  # one export, one clone
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k], ledger)
    else:
        assert a == b


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_value_round_trips_with_every_export_settled(data: st.DataObject) -> None:
    ledger = Ledger()
    with pytest.MonkeyPatch.context() as mp:
        for name, fake in [
            ("_gpu_of", ledger.gpu_of),
            ("_export", ledger.export),
            ("_import", ledger.import_),
            ("_own", ledger.own),
            ("_release", ledger.release),
            ("_local_index", ledger.local_index),
        ]:
            mp.setattr(cuda_ipc, name, fake)
        value = data.draw(_values(ledger))
        server, client = _serve(lambda v: v)  # the echo sends back the clones it got: exported again
        try:
            _same(value, client.call((value,)), ledger)
        finally:
            client.close()
            server.close()
        assert ledger.settled()


# -- plumbing: who learns whose GPUs


def test_a_replica_with_gpus_tells_its_caller_and_exports_only_if_asked(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    compiled = pipeline.compile(_echo(pipeline.INPUT), backend="actors", optimize=False)
    node = next(n for n in compiled.graph.nodes if isinstance(n, Call))
    unit = Unit.of(compiled.graph, node, compiled.bindings)
    for caller_gpus, told in [((GPU,), (GPU,)), ((), ())]:
        replica = Replica(unit, (os.getpid(), this_node(), caller_gpus))
        address = replica._serve_fast()
        try:
            assert address is not None and address.gpus == told
            assert replica.server is not None and replica.server.caller_gpus == frozenset(caller_gpus)
        finally:
            assert replica.server is not None
            replica.server.close()


@pipeline.step(execution_mode="actors", num_gpus=1)
def _echo(x: Any) -> Any:
    return x


def test_deploy_checks_cuda_ipc_and_without_cuda_it_changes_nothing(ray_session: Any) -> None:
    with pytest.raises(PipelineValueError, match="cuda_ipc must be True or False"):
        _echo(pipeline.INPUT).deploy(cuda_ipc="yes")  # type: ignore[arg-type]
    x = torch.arange(4.0)
    with _echo(pipeline.INPUT).deploy(cuda_ipc=True) as p:
        assert torch.equal(p.call(x), x)


# -- torch's side, as far as a machine without CUDA can run it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_without_cuda_the_real_layer_sees_no_gpu_and_exports_nothing() -> None:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    assert cuda_ipc.visible_gpus() == () and cuda_ipc._gpu_of(torch.ones(2)) is None
    cuda_ipc.sending.peer, cuda_ipc.sending.exports = frozenset({GPU}), []
    try:
        assert cuda_ipc.share(torch.ones(2)) is None and cuda_ipc.sending.exports == []
    finally:
        cuda_ipc.sending.peer, cuda_ipc.sending.exports = frozenset(), None
    with pytest.raises(RuntimeError, match="unexpected CUDA IPC reduction"):
        cuda_ipc._import(print, (0,) * 15, 0)  # only torch's rebuild is ever called
    with pytest.raises(RuntimeError, match="unexpected CUDA IPC reduction"):
        cuda_ipc._import(rebuild_cuda_tensor, (0,) * 14, 0)
    cuda_ipc._release((0,) * 11 + (b"/torch_no_such_counter", 0, None, False))  # best effort: no error


def test_without_torch_a_process_sees_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    monkeypatch.setattr(cuda_ipc, "_uuids", lambda: pytest.fail("torch is not there to ask"))
    assert cuda_ipc.visible_gpus() == ()
