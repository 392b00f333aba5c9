"""Spin, then block: the fast path's waits poll the socket for a moment
before blocking (fast_transport.SPIN_S). Answers that come during the spin
and after it must read the same, failures must surface the same, and a
client or server whose peer keeps answering late must stop burning CPU.

The server runs in this process (its handler in a thread): what is tested
is the transport, not Ray."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline_ir.backends.fast_client import FastClient
from pipeline_ir.backends.fast_server import FastServer
from pipeline_ir.backends.fast_transport import CallTimeout, PeerGone


def handler(x: object, delay: float = 0.0, mode: str = "echo") -> object:
    if delay:
        time.sleep(delay)
    if mode == "raise":
        raise ValueError(f"bad input {x!r}")
    if mode == "array":
        assert isinstance(x, int)
        return np.full(x, 7, dtype=np.uint8)
    return x


def pair(client_spin: float, server_spin: float) -> tuple[FastServer, FastClient]:
    server = FastServer(handler, [os.getpid()], spin_s=server_spin)
    return server, FastClient(server.start(), spin_s=client_spin)


@pytest.fixture(params=[(0.0, 0.0), (5.0, 5.0), (1e-4, 1e-4)], ids=["no-spin", "answers-within-the-spin", "default-spin"])
def spun(request: pytest.FixtureRequest) -> Iterator[tuple[FastServer, FastClient]]:
    server, client = pair(*request.param)
    yield server, client
    client.close()
    server.close()


def test_answers_read_the_same_whether_they_come_during_the_spin_or_after(spun: tuple[FastServer, FastClient]) -> None:
    _, client = spun
    assert client.call(({"a": [1, 2.5, "x"]},)) == {"a": [1, 2.5, "x"]}
    assert client.call(("late", 0.05)) == "late"  # past the default spin: read blocking
    # 1 MB answers ride in shared-memory segments: the first one's fd comes
    # with the frame's first bytes, which the spinning read must take.
    for _ in range(3):
        got = client.call((1 << 20, 0.0, "array"))
        assert isinstance(got, np.ndarray) and got.nbytes == 1 << 20 and int(got[-1]) == 7
    with pytest.raises(ValueError, match="bad input 3"):
        client.call((3, 0.0, "raise"))
    assert [client.call((i,)) for i in range(50)] == list(range(50))


def test_a_timeout_shorter_than_the_spin_still_raises_on_time_and_the_client_stays_usable() -> None:
    server, client = pair(5.0, 5.0)
    try:
        start = time.monotonic()
        with pytest.raises(CallTimeout, match="did not answer within 0.2 s"):
            client.call(("slow", 1.0), timeout=0.2)
        assert time.monotonic() - start < 0.9
        assert client.call(("next",), timeout=10) == "next"
    finally:
        client.close()
        server.close()


def test_a_server_closed_while_the_caller_spins_ends_the_call_with_peer_gone() -> None:
    server, client = pair(30.0, 30.0)
    try:
        assert client.call((1,)) == 1
        threading.Timer(0.2, server.close).start()
        start = time.monotonic()
        with pytest.raises(PeerGone):
            client.call(("never read", 2.0))
        assert time.monotonic() - start < 10
    finally:
        client.close()
        server.close()


def test_a_client_whose_answers_come_late_stops_spinning() -> None:
    server, client = pair(0.05, 0.0)
    try:
        for _ in range(4):  # each spins its 50 ms, then blocks for the answer
            assert client.call(("slow", 0.1)) == "slow"
        cpu = time.thread_time()
        for _ in range(4):
            assert client.call(("slow", 0.1)) == "slow"
        # Still spinning, these four would cost 4 x 50 ms of this thread's CPU.
        assert time.thread_time() - cpu < 0.1
        # A probe now and then finds the answers quick again, and spinning resumes.
        for i in range(40):
            assert client.call((i,)) == i
        assert client.late == 0
    finally:
        client.close()
        server.close()


def test_a_server_whose_calls_come_late_stops_spinning() -> None:
    server, client = pair(0.0, 0.05)
    try:
        def calls_apart(n: int) -> None:
            for i in range(n):
                assert client.call((i,)) == i
                time.sleep(0.1)  # the server spins 50 ms for the next call, which comes later

        calls_apart(5)
        cpu = time.process_time()
        calls_apart(4)
        # The client thread sleeps; still spinning, the server would cost 4 x 50 ms.
        assert time.process_time() - cpu < 0.1
    finally:
        client.close()
        server.close()


def test_one_thread_of_a_process_spins_at_a_time_and_all_answers_arrive() -> None:
    server, client = pair(0.01, 0.01)
    results: dict[int, list[object]] = {}

    def worker(k: int) -> None:
        results[k] = [client.call(((k, i), 0.001 * (i % 3)), timeout=60) for i in range(30)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {k: [(k, i) for i in range(30)] for k in range(8)}
    finally:
        client.close()
        server.close()


def test_a_client_polls_only_while_polling_measures_faster_than_blocking() -> None:
    server, client = pair(1e-4, 1e-4)
    try:
        assert client.call((0,)) == 0

        def ways(n: int) -> list[bool]:
            """Whether each of the next n calls polls (and so asks the server to)."""
            return [client._polls() for _ in range(n)]

        # Polling measured slower (a busy machine: the poller takes the CPU
        # its peer needs): blocking wins, polling is tried 2 calls in 16.
        for _ in range(9):
            client._measured(True, 80e-6)
            client._measured(False, 30e-6)
        assert not client.poll_pays and sum(ways(160)) == 20
        # A rare slow call does not flip the choice back (medians, not means) ...
        client._measured(False, 5e-3)
        assert not client.poll_pays
        # ... but polling measured faster does, and then blocking is the one tried.
        for _ in range(9):
            client._measured(True, 20e-6)
        assert client.poll_pays and sum(ways(160)) == 140
        assert [client.call((i,)) for i in range(40)] == list(range(40))
    finally:
        client.close()
        server.close()
