"""The same-node fast path's transport (backends/fast_transport.py, fast_server.py, fast_client.py, fast_frames.py).

A Ray actor of our own hosts a FastServer over a real replica unit (a
compiled step, as the actors backend ships it), so a step's exception
comes back as the StepError the worker builds. The caller is this test
process; the actor is killed at the end of the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipeline_ir as pipeline
from pipeline_ir.backends import ray_runtime
from pipeline_ir.backends import fast_frames as fr
from pipeline_ir.backends.fast_client import FastClient
from pipeline_ir.backends.fast_server import FastServer
from pipeline_ir.backends.fast_transport import (
    Address,
    CallTimeout,
    PeerGone,
    RemoteFailure,
    Unreachable,
    same_node,
    supported,
    this_node,
)
from pipeline_ir.backends.replica import Replica
from pipeline_ir.backends.worker import Unit, shippable
from pipeline_ir.errors import StepError
from pipeline_ir.ir.nodes import Call
from process_helpers import wait_gone

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.usefixtures("ray_session"),
    pytest.mark.skipif(not supported(), reason="the fast path needs Linux (Unix sockets, SO_PEERCRED, memfd)"),
]

BIG = 1_000_000  # float64 elements: 8 MB, over the memfd threshold


@pipeline.step(execution_mode="actors")
def work(x: Any, mode: str = "echo", marker: str = "") -> Any:
    """The step the test replica runs; `mode` picks a behaviour."""
    if mode == "raise":
        raise ValueError(f"bad input {x!r}")
    if mode == "lock":
        return threading.Lock()  # cannot be pickled
    if mode == "sleep":
        Path(marker).touch()  # the caller waits for this: the call is running
        time.sleep(x)
    if mode == "pid":
        return os.getpid()
    return x


class Host:
    """A minimal replica: a unit and the FastServer that serves it."""

    def __init__(self, unit: Unit, caller_pid: int) -> None:
        unit.build()
        self.unit = unit
        self.server = FastServer(unit, [caller_pid], on_unsendable=self._unsendable)
        self.server.start()

    def _unsendable(self, args: tuple[Any, ...], error: Exception) -> BaseException:
        return shippable(StepError(self.unit.label, args[0], error))

    def address(self) -> Address:
        assert self.server.address is not None
        return self.server.address

    def refused(self) -> int:
        return self.server.refused

    def close_server(self) -> None:
        self.server.close()


def _start_host(ray: Any) -> tuple[Any, Address, int]:
    compiled = pipeline.compile(work(pipeline.INPUT), backend="actors", optimize=False)
    node = next(n for n in compiled.graph.nodes if isinstance(n, Call))
    unit = Unit.of(compiled.graph, node, compiled.bindings)
    ray_runtime.ship_code([Host])  # this test module travels by value
    handle = ray.remote(num_cpus=0)(Host).remote(unit, os.getpid())
    address = ray.get(handle.address.remote())
    return handle, address, node.id


def _stop_host(ray: Any, handle: Any, address: Address) -> None:
    ray.kill(handle)
    assert wait_gone([address.pid]) == []
    FastClient(address).close(remove_server_files=True)


@pytest.fixture(scope="module")
def host(ray_session: Any) -> Iterator[tuple[Any, Address, int]]:
    handle, address, node_id = _start_host(ray_session)
    yield handle, address, node_id
    _stop_host(ray_session, handle, address)


@pytest.fixture
def client(host: tuple[Any, Address, int]) -> Iterator[FastClient]:
    c = FastClient(host[1])
    yield c
    c.close()


def _in_memfd(address: int) -> bool:
    """Whether `address` lies in a mapping of one of our memfds."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *rest = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return "memfd:pipeline_ir" in line
    return False


# -- round trips --


def test_round_trips_plain_values(host: tuple[Any, Address, int], client: FastClient) -> None:
    node = host[2]
    values: list[Any] = [0, -7, 2**70, 3.5, "héllo", b"\x00bytes", None, (1, [2, {"three": (4.0, None)}]), {"k": [1, 2], 3: "v"}]
    for value in values:
        assert client.call((node, value)) == value
    assert client.call((node, 5), {"mode": "echo"}) == 5
    assert client.call((node, 0, "pid")) == host[1].pid


def test_numpy_arrays_small_inline_large_zero_copy_read_only(host: tuple[Any, Address, int], client: FastClient) -> None:
    node = host[2]
    small = np.arange(10, dtype=np.int32)
    got = client.call((node, small))
    assert np.array_equal(got, small) and got.dtype == small.dtype and got.flags.writeable is False
    big = np.random.default_rng(0).random(BIG)
    got = client.call((node, big))
    assert np.array_equal(got, big) and got.flags.writeable is False
    assert _in_memfd(got.ctypes.data)  # mapped from the replica's memfd, not copied out
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    assert np.array_equal(client.call((node, fortran)), fortran)
    empty = np.empty((0, 3))
    assert client.call((node, empty)).shape == (0, 3)


def test_torch_cpu_tensors_keep_dtype_shape_strides(host: tuple[Any, Address, int], client: FastClient) -> None:
    node = host[2]
    cases = [
        torch.randn(3, 4),
        torch.randn(4, 5).to(torch.bfloat16),
        torch.tensor(2.5),
        torch.arange(12).reshape(3, 4).t(),
        torch.arange(20.0).reshape(4, 5)[:, ::2],
        torch.ones(3, requires_grad=True),
    ]
    for t in cases:
        got = client.call((node, t))
        assert type(got) is torch.Tensor and (got.dtype, got.shape) == (t.dtype, t.shape)
        assert torch.equal(got.detach(), t.detach()) and got.requires_grad == t.requires_grad
    transposed = cases[3]
    assert client.call((node, transposed)).stride() == transposed.stride()
    big = torch.randn(2_000_000)  # 8 MB
    got = client.call((node, big))
    assert torch.equal(got, big) and _in_memfd(got.data_ptr())


def test_many_buffers_and_a_large_nested_payload(host: tuple[Any, Address, int], client: FastClient) -> None:
    node = host[2]
    payload = {"arrays": [np.full(1000, i) for i in range(100)], "big": [np.ones(BIG // 4) * i for i in range(3)]}
    got = client.call((node, payload))
    assert all(np.array_equal(a, b) for a, b in zip(got["arrays"], payload["arrays"]))
    assert all(np.array_equal(a, b) for a, b in zip(got["big"], payload["big"]))


def test_a_live_result_is_never_overwritten_and_a_released_segment_is_reused(host: tuple[Any, Address, int], client: FastClient) -> None:
    node = host[2]
    first = client.call((node, np.full(BIG, 1.0)))
    second = client.call((node, np.full(BIG, 2.0)))  # `first` is alive: its segment is busy
    assert (first == 1.0).all() and (second == 2.0).all()
    address = first.ctypes.data
    del first, second
    client.call((node, 0))  # carries the release notices to the replica
    third = client.call((node, np.full(BIG, 3.0)))
    assert (third == 3.0).all()
    assert third.ctypes.data == address  # the same segment, filled again, over the mapping kept here


def _pass_new_segment(outbox: Any, inbox: Any, data: Any) -> int:
    """Place `data` in a new segment of `outbox` and have `inbox` map it, as
    a frame would; the segment's id."""
    segment, fd = outbox.place(memoryview(data))
    assert fd is not None
    inbox.learn(segment, fd)
    os.close(fd)
    return int(segment)


def test_segments_are_reused_released_and_dropped_over_the_cache_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_ir.backends import fast_segments

    outbox, inbox = fast_segments.Outbox(), fast_segments.Inbox()
    data = np.arange(300_000, dtype=np.uint8)
    first = _pass_new_segment(outbox, inbox, data)
    view = inbox.buffer(first, data.nbytes)
    assert np.array_equal(view, data) and view.flags.writeable is False
    again, fd = outbox.place(memoryview(data))  # `first` is busy: a new segment
    assert again != first and fd is not None
    os.close(fd)
    assert inbox.notices() == []
    del view
    assert inbox.notices() == [first]  # the last array over it is gone
    outbox.released(first)
    assert outbox.place(memoryview(data[:1000])) == (first, None)  # reused, no fd: the peer maps it already
    monkeypatch.setattr(fast_segments, "CACHE_BYTES", 0)
    outbox.released(first)
    assert outbox.notices() == [first | fast_segments.DROP]  # over the cache limit: closed, the peer told
    inbox.forget(first)
    outbox.close()
    inbox.close()


def test_segments_over_the_cache_limit_are_closed_on_both_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_ir.backends import fast_segments

    monkeypatch.setattr(fast_segments, "CACHE_BYTES", 0)  # every released segment is dropped
    server = FastServer(lambda x: x, [os.getpid()])
    client = FastClient(server.start())
    try:
        for i in range(10):
            sent = np.full(300_000 + 1000 * i, float(i))  # a new size each time: no reuse
            got = client.call((sent,))
            assert np.array_equal(got, sent)
            del got
        mapped = sum("memfd:pipeline_ir" in line for line in open("/proc/self/maps"))
        assert mapped <= 8  # both ends, this process: not one per call
    finally:
        client.close()
        server.close()


def _memfd_inode(address: int) -> int | None:
    """The inode of the memfd mapped at `address` (None: not one of ours)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _, _, _, inode, *name = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return int(inode) if "memfd:pipeline_ir" in " ".join(name) else None
    return None


def _memfd_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum("memfd:pipeline_ir" in line for line in maps)


@contextlib.contextmanager
def _relay(handler_b: Any) -> Iterator[tuple[FastClient, FastClient]]:
    """Two replicas in this process: A makes arrays, B gets them from this
    caller, which relays (as a pipeline's caller does between steps)."""
    a = FastServer(lambda n, v: np.arange(n, dtype=np.float64) + v, [os.getpid()])
    b = FastServer(handler_b, [os.getpid()])
    to_a, to_b = FastClient(a.start()), FastClient(b.start())
    try:
        yield to_a, to_b
    finally:
        to_a.close()
        to_b.close()
        a.close()
        b.close()


def test_a_value_relayed_between_replicas_is_forwarded_in_its_segment_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_ir.backends import fast_segments

    copies: list[int] = []
    place = fast_segments.Outbox.place

    def counted(self: Any, raw: memoryview) -> Any:
        copies.append(raw.nbytes)
        return place(self, raw)

    monkeypatch.setattr(fast_segments.Outbox, "place", counted)
    with _relay(lambda x: (_memfd_inode(x.ctypes.data), float(x[0]), float(x[-1]), x.flags.writeable)) as (to_a, to_b):
        x = to_a.call((BIG, 7.0))
        inode, first, last, writeable = to_b.call((x,))
        assert (first, last, writeable) == (7.0, BIG - 1 + 7.0, False)
        assert inode is not None and inode == _memfd_inode(x.ctypes.data)  # B maps the very segment A filled
        assert copies == [BIG * 8]  # A's one copy into its segment; none in the relay
        part = x[100_000:200_000]  # 800 KB from byte 800,000: the same segment, at an offset
        inode, first, last, _ = to_b.call((part,))
        assert inode == _memfd_inode(x.ctypes.data) and (first, last) == (100_007.0, 200_006.0)
        assert copies == [BIG * 8]


def test_a_forwarded_value_a_replica_keeps_is_never_overwritten() -> None:
    """The caller holds a forwarded buffer (so the segment it came in)
    until the receiver lets go: its first owner cannot fill it again."""
    kept: list[Any] = []
    with _relay(lambda x: kept.append(x)) as (to_a, to_b):
        for i in range(6):
            x = to_a.call((BIG, float(i)))
            to_b.call((x,))
            del x  # only B holds it now
        assert [float(k[0]) for k in kept] == [float(i) for i in range(6)]
        assert all(np.array_equal(k, np.arange(BIG, dtype=np.float64) + i) for i, k in enumerate(kept))


def test_released_forwards_let_the_segment_be_filled_again() -> None:
    """Once the receiver is done, the release travels back through the
    caller to the first owner, which reuses its segment: the memfds do not
    pile up, nor do the receiver's mappings."""
    from pipeline_ir.backends import fast_segments

    kept = len(fast_segments._mapped)
    with _relay(lambda x: float(x.sum())) as (to_a, to_b):
        for i in range(20):
            x = to_a.call((BIG, 1.0))
            assert to_b.call((x,)) == float(BIG * (BIG + 1) // 2)
            del x
        assert _memfd_mappings() <= 6  # A's segment, the caller's and B's mappings of it (and one spare each)
    deadline = time.monotonic() + 5
    while len(fast_segments._mapped) > kept and time.monotonic() < deadline:  # the servers' threads end
        time.sleep(0.01)
    assert len(fast_segments._mapped) == kept  # the connections closed: no mapping kept for forwarding


def test_only_a_segment_still_mapped_here_is_forwarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward names a segment by where it is mapped: once its inbox
    lets go of the mapping, that address may come to hold anything, and
    must not be sent as that segment."""
    from pipeline_ir.backends import fast_segments

    outbox, inbox, onward = fast_segments.Outbox(), fast_segments.Inbox(), fast_segments.Outbox()
    data = np.arange(300_000, dtype=np.uint8)
    segment = _pass_new_segment(outbox, inbox, data)
    view = inbox.buffer(segment, data.nbytes)
    address = view.ctypes.data
    kept = fast_segments._mapped[address][1]  # the fd kept for forwarding
    forwarded = onward.forward(memoryview(view)[10:])
    assert forwarded is not None and forwarded[2] == 10
    os.close(forwarded[1])
    onward.unplace([forwarded[:2]])
    del forwarded
    inbox.forget(segment)  # the peer dropped it: forwarded no more, though `view` keeps it mapped
    assert fast_segments._find(address, 1) is None
    del view
    with contextlib.suppress(OSError):  # closed (or, by now, another file's)
        assert not os.readlink(f"/proc/self/fd/{kept}").startswith("/memfd:pipeline_ir")
    monkeypatch.setattr(fast_segments, "MAX_KEPT_FDS", 0)  # past the cap: a copy, as before
    segment = _pass_new_segment(outbox, inbox, data)  # a new segment: the first is still busy
    assert onward.forward(memoryview(inbox.buffer(segment, data.nbytes))) is None
    for end in (outbox, inbox, onward):
        end.close()


def test_async_calls_from_asyncio(host: tuple[Any, Address, int], client: FastClient) -> None:
    node = host[2]

    async def main() -> list[Any]:
        one = await client.call_async((node, "one"))
        many = await asyncio.gather(*(client.call_async((node, i)) for i in range(200)))
        return [one, *many]

    assert asyncio.run(main()) == ["one", *range(200)]
    # The connections outlive that loop: another loop and threads reuse them.
    assert asyncio.run(main()) == ["one", *range(200)]
    assert client.call((node, 1)) == 1


# -- errors --


def test_a_step_exception_is_the_workers_step_error(host: tuple[Any, Address, int], client: FastClient) -> None:
    node = host[2]
    with pytest.raises(StepError, match=r"step 'work' \(node %\d+\) raised ValueError: bad input 7") as info:
        client.call((node, 7, "raise"))
    assert info.value.step_name == "work" and info.value.node_id == node
    assert isinstance(info.value.__cause__, ValueError)
    assert "remote traceback" in "".join(getattr(info.value.__cause__, "__notes__", []))
    assert client.call((node, 8)) == 8  # still usable


def test_an_unpicklable_result_is_a_step_error(host: tuple[Any, Address, int], client: FastClient) -> None:
    node = host[2]
    with pytest.raises(StepError, match="cannot pickle") as info:
        client.call((node, 0, "lock"))
    assert info.value.step_name == "work" and isinstance(info.value.__cause__, TypeError)
    assert client.call((node, 9)) == 9


def test_unpicklable_arguments_fail_in_the_caller(host: tuple[Any, Address, int], client: FastClient) -> None:
    with pytest.raises(TypeError, match="pickle"):
        client.call((host[2], threading.Lock()))
    assert client.call((host[2], 10)) == 10

    async def from_asyncio() -> list[object]:
        # asend pickles once it holds a connection: the failure hands it
        # back (or the right to open one), and the connections stay whole.
        for _ in range(2 * client.max_connections):
            with pytest.raises(TypeError, match="pickle"):
                await client.call_async((host[2], threading.Lock()))
        return list(await asyncio.gather(*(client.call_async((host[2], i)) for i in range(3 * client.max_connections))))

    assert asyncio.run(from_asyncio()) == list(range(3 * client.max_connections))
    assert client._open <= client.max_connections and client._open == len(client._idle)


def test_calls_waiting_for_a_connection_hold_no_pickled_arguments(host: tuple[Any, Address, int], tmp_path: Path) -> None:
    """A flood of call_async beyond the connections: the arguments of the
    calls still waiting for one are not pickled yet (the driver's memory
    under a flood, docs/benchmarks.md)."""
    client = FastClient(host[1], max_connections=2)
    node, pickled = host[2], []
    real = fr.dumps

    def counting(value: object, gpus: frozenset[str] = frozenset()) -> fr.Pickled:
        pickled.append(value)
        return real(value, gpus)

    async def flood() -> list[object]:
        marker = tmp_path / "busy"
        first = asyncio.ensure_future(client.call_async((node, 0.5, "sleep", str(marker))))
        second = asyncio.ensure_future(client.call_async((node, 0.5, "sleep", str(marker))))
        rest = [asyncio.ensure_future(client.call_async((node, i))) for i in range(20)]
        await asyncio.sleep(0.2)  # both connections busy: the 20 wait for one
        waiting_pickled = len(pickled)
        results = await asyncio.gather(first, second, *rest)
        assert waiting_pickled == 2, waiting_pickled
        return list(results[2:])

    try:
        fr.dumps = counting  # type: ignore[assignment]
        assert asyncio.run(flood()) == list(range(20))
    finally:
        fr.dumps = real  # type: ignore[assignment]
        client.close()


def test_a_server_without_a_hook_reports_unpicklable_results_as_remote_failure() -> None:
    server = FastServer(lambda: threading.Lock(), [os.getpid()])
    client = FastClient(server.start())
    try:
        with pytest.raises(RemoteFailure, match="could not be pickled back"):
            client.call(())
    finally:
        client.close()
        server.close()
    assert client.address.path and not os.path.exists(os.path.dirname(client.address.path))


def test_timeouts_raise_and_the_client_stays_usable(host: tuple[Any, Address, int], client: FastClient, tmp_path: Path) -> None:
    node = host[2]
    with pytest.raises(CallTimeout, match="did not answer within 0.2 s"):
        client.call((node, 5.0, "sleep", str(tmp_path / "a")), timeout=0.2)

    async def late() -> None:
        await client.call_async((node, 5.0, "sleep", str(tmp_path / "b")), timeout=0.2)

    with pytest.raises(CallTimeout):
        asyncio.run(late())
    assert client.gone is None
    assert client.call((node, 11), timeout=30) == 11


def test_callers_on_many_threads(host: tuple[Any, Address, int]) -> None:
    node = host[2]
    client = FastClient(host[1], max_connections=4)
    results: dict[int, list[Any]] = {}

    def worker(k: int) -> None:
        results[k] = [client.call((node, (k, i)), timeout=60) for i in range(40)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert results == {k: [(k, i) for i in range(40)] for k in range(16)}
        assert client._open <= 4
    finally:
        client.close()


# -- files left by killed servers --

_SERVE_UNTIL_KILLED = """
import sys, time
from pipeline_ir.backends.fast_server import FastServer
server = FastServer(lambda x: x, [1])
print(server.start().path, flush=True)
time.sleep(600)
"""


def test_the_files_of_a_killed_server_are_swept_by_the_next_one() -> None:
    """SIGKILL (ray.kill, a driver's actors ended with it) leaves a server's
    socket and directory behind; the next server started on the machine
    removes them, and leaves a live server's alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _SERVE_UNTIL_KILLED], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        paths = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
        assert all(os.path.exists(path) for path in paths), paths
        procs[0].kill()
        procs[0].wait(10)
        assert os.path.exists(paths[0])  # nobody removed it
        server = FastServer(lambda x: x, [os.getpid()])
        server.start()
        server.close()
        assert not os.path.exists(os.path.dirname(paths[0]))  # swept
        assert os.path.exists(paths[1])  # alive: kept
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        for path in paths:
            with contextlib.suppress(ValueError):
                FastClient(Address(path, 0, "")).close(remove_server_files=True)


def test_a_replica_on_another_node_than_its_caller_starts_no_server() -> None:
    """The caller could not reach it, and its files would outlive a kill
    on a node the caller cannot clean."""
    compiled = pipeline.compile(work(pipeline.INPUT), backend="actors", optimize=False)
    node = next(n for n in compiled.graph.nodes if isinstance(n, Call))
    unit = Unit.of(compiled.graph, node, compiled.bindings)
    elsewhere = Replica(unit, (os.getpid(), "another-node", ()))
    assert elsewhere._serve_fast() is None and elsewhere.server is None
    here = Replica(unit, (os.getpid(), this_node(), ()))
    address = here._serve_fast()
    try:
        assert address is not None and os.path.exists(address.path)
    finally:
        assert here.server is not None
        here.server.close()


# -- security --


def test_socket_is_private(host: tuple[Any, Address, int]) -> None:
    path = host[1].path
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600


_FOREIGN = r"""
import os, pickle, socket, struct, sys
path, marker = sys.argv[1], sys.argv[2]

class Evil:
    def __reduce__(self):
        return (os.mkdir, (marker,))

body = pickle.dumps(((Evil(),), {}), protocol=5)
frame = struct.pack("<BBHHxxQ", 1, 1, 0, 0, len(body)) + body
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(path)
try:
    s.sendall(frame)
except OSError:
    pass
got = b""
while True:
    try:
        chunk = s.recv(100)
    except OSError:
        break
    if not chunk:
        break
    got += chunk
print(got.decode())
"""


def test_a_foreign_process_is_refused_unread(host: tuple[Any, Address, int], client: FastClient, tmp_path: Path) -> None:
    handle, address, node = host
    import ray

    before = ray.get(handle.refused.remote())
    marker = tmp_path / "unpickled"
    proc = subprocess.run([sys.executable, "-c", _FOREIGN, address.path, str(marker)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "PIRFNO!!"  # told "refused", then disconnected
    assert not marker.exists()  # its pickle was never loaded
    assert ray.get(handle.refused.remote()) == before + 1
    assert client.call((node, "still served")) == "still served"


def test_the_client_checks_who_serves_the_socket(host: tuple[Any, Address, int]) -> None:
    impostor = Address(host[1].path, host[1].pid + 1, host[1].node)
    with pytest.raises(Unreachable, match="not by the replica's process"):
        FastClient(impostor).call((host[2], 1))


def test_a_client_not_allowed_is_refused() -> None:
    server = FastServer(lambda x: x, allowed_pids=[os.getpid() + 1])
    client = FastClient(server.start())
    try:
        with pytest.raises(Unreachable, match="refused this process"):
            client.call((1,))
        server.allow(os.getpid())
        assert client.call((1,)) == 1
        assert server.refused == 1
    finally:
        client.close()
        server.close()


def test_same_node(host: tuple[Any, Address, int]) -> None:
    address = host[1]
    assert same_node(address)
    assert not same_node(Address(address.path, address.pid, "another-node"))


# -- the replica's end going away --


def test_server_close_fails_calls_with_peer_gone(ray_session: Any) -> None:
    handle, address, node = _start_host(ray_session)
    client = FastClient(address)
    try:
        assert client.call((node, 1)) == 1
        ray_session.get(handle.close_server.remote())
        with pytest.raises(PeerGone):
            client.call((node, 2))
        assert not os.path.exists(address.path)
    finally:
        client.close()
        _stop_host(ray_session, handle, address)


def test_a_killed_replica_fails_the_call_in_flight(ray_session: Any, tmp_path: Path) -> None:
    handle, address, node = _start_host(ray_session)
    client = FastClient(address)
    marker = tmp_path / "running"
    outcome: list[BaseException] = []

    def pending() -> None:
        try:
            client.call((node, 600.0, "sleep", str(marker)), timeout=120)
        except BaseException as e:
            outcome.append(e)

    try:
        assert client.call((node, 1)) == 1
        caller = threading.Thread(target=pending)
        caller.start()
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists()
        os.kill(address.pid, signal.SIGKILL)
        caller.join(60)
        assert not caller.is_alive()
        # Well before its 120 s timeout: the peer's death ended the call.
        assert len(outcome) == 1 and isinstance(outcome[0], PeerGone), outcome
        with pytest.raises(PeerGone):  # later calls fail at once
            client.call((node, 2))
    finally:
        client.close(remove_server_files=True)
        _stop_host(ray_session, handle, address)
    assert not os.path.exists(os.path.dirname(address.path))
