"""Spin, then block (docs/design.md): the fast path with and without polling
before a wait blocks, on an idle machine and beside busy processes.

Not part of the suite (its busy processes would disturb whatever runs
next): `python -m benchmarks.spin_ab [--calls N]`. No Ray: a FastServer in
a child process runs the 3-stage chain; this process calls it from a
thread, N sequential calls after N/10 warm-up, for each number of busy
processes (`while True: pass`, one per core at most) and each polling
window (0: block at once), and prints p50 and p99 in microseconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Any

POLLS_S = (0.0, 100e-6)


def _stage(x: object) -> object:
    return x


def _chain(x: object) -> object:
    return _stage(_stage(_stage(x)))


def _serve(queue: Any, caller: int, spin_s: float) -> None:
    from pipeline_ir.backends.fast_server import FastServer

    server = FastServer(_chain, [caller], spin_s=spin_s)
    queue.put(server.start())
    time.sleep(3600)  # killed by the parent


def _busy() -> None:
    while True:
        pass


def _percentiles(call: Any, calls: int) -> tuple[float, float]:
    for _ in range(calls // 10):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


def main() -> None:
    from pipeline_ir.backends.fast_client import FastClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{'busy processes':>15} {'poll us':>8} {'p50 us':>8} {'p99 us':>8}")
    for busy in range(min(2, os.cpu_count() or 1) + 1):
        hogs = [ctx.Process(target=_busy, daemon=True) for _ in range(busy)]
        for hog in hogs:
            hog.start()
        try:
            for spin_s in POLLS_S:
                queue = ctx.Queue()
                server = ctx.Process(target=_serve, args=(queue, os.getpid(), spin_s), daemon=True)
                server.start()
                client = FastClient(queue.get(timeout=60), spin_s=spin_s)
                try:
                    p50, p99 = _percentiles(lambda: client.call((1,)), args.calls)
                finally:
                    client.close(remove_server_files=True)
                    server.kill()
                print(f"{busy:>15} {spin_s * 1e6:>8.0f} {p50:>8.1f} {p99:>8.1f}", flush=True)
        finally:
            for hog in hogs:
                hog.kill()


if __name__ == "__main__":
    main()
