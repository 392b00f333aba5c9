"""What HTTP through Ray Serve adds to a pipeline call.

A trivial pipeline (one step returning its input, a small dict), as a LOCAL
step and as an ACTORS step: p50 and p99 of sequential `p.call(x)` in this
process, against sequential POSTs of the same value as JSON to the same
pipeline served by `pipeline_ir.serve.app` (one ingress replica, a
keep-alive http.client connection on 127.0.0.1). The HTTP path is client
-> Serve's proxy actor -> the ingress replica (which runs LOCAL steps
itself and calls the actor for ACTORS steps) -> back, so the difference is
Serve's two hops plus JSON decoding and encoding. The anchor, a bare Serve
deployment that answers the body it receives, shows what Serve alone costs;
the rest is pipeline_ir.serve's and the pipeline's.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import pipeline_ir as pipeline

CALLS = 200  # per candidate, measured
WARMUP = 20
ROUNDS = 4  # the calls are split into interleaved rounds, so load drift hits all alike
# Serve's replicas ask for 1 CPU by default: three would not fit the 2-core
# machine the figures come from, beside the benchmarks' own actors.
NO_CPU = {"num_cpus": 0}
PAYLOAD = {"id": 7, "text": "hello", "scores": [0.1, 0.2, 0.3]}
# run(smoke=True): a few calls, the ACTORS pipeline and the anchor only (each
# Serve application starts a replica): checks that it runs
SMOKE_CALLS, SMOKE_WARMUP, SMOKE_ROUNDS = 4, 1, 1


def echo(x: object) -> object:
    return x


class Echo:
    def __call__(self, x: object) -> object:
        return x


async def plain_echo(request: Any) -> Any:
    """The anchor: a bare Serve deployment that answers the body it gets."""
    from starlette.responses import Response

    return Response(await request.body(), media_type="application/json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _poster(port: int, route: str) -> tuple[Callable[[], object], Callable[[], None]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps(PAYLOAD).encode()

    def post() -> object:
        conn.request("POST", route, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {route}: {response.status} {data!r}")
        return json.loads(data)

    return post, conn.close


def _sample(fns: dict[str, Callable[[], object]], calls: int = CALLS, warmup: int = WARMUP, rounds: int = ROUNDS) -> dict[str, list[float]]:
    """Seconds per call of each candidate, interleaved by rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            assert fn() == PAYLOAD
    samples: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            for _ in range(calls // rounds):
                start = time.perf_counter()
                fn()
                samples[label].append(time.perf_counter() - start)
    return samples


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if q < 100 else max(values)


def run(smoke: bool = False) -> dict[str, Any]:
    calls, warmup, rounds = (SMOKE_CALLS, SMOKE_WARMUP, SMOKE_ROUNDS) if smoke else (CALLS, WARMUP, ROUNDS)
    try:
        from ray import serve

        from pipeline_ir.serve import app
    except ImportError as e:
        reason = f"needs the serve extra ({e})"
        return {"name": "http", "title": "HTTP through Ray Serve vs p.call()", "unit": "ms", "rows": [], "ratios": {}, "notes": "", "skipped": {"all": reason}}

    nodes = {
        "local": pipeline.step(echo)(pipeline.INPUT),
        "actors": pipeline.step(Echo, execution_mode="actors")()(pipeline.INPUT),
    }
    skipped = {}
    if smoke:
        del nodes["local"]
        skipped["local: p.call(x) and HTTP POST"] = "smoke run: one Serve application fewer to start"
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    fns: dict[str, Callable[[], object]] = {}
    closers: list[Callable[[], None]] = []
    try:
        for mode, node in nodes.items():
            p = node.deploy()
            closers.append(p.shutdown)
            fns[f"{mode}: p.call(x)"] = lambda p=p: p.call(PAYLOAD)
            serve.run(app(node, name=f"bench_{mode}", ray_actor_options=NO_CPU), name=f"bench_{mode}", route_prefix=f"/{mode}")
            post, close = _poster(port, f"/{mode}")
            closers.append(close)
            fns[f"{mode}: HTTP POST"] = post
        serve.run(serve.deployment(plain_echo, ray_actor_options=NO_CPU).bind(), name="bench_plain", route_prefix="/plain")
        post, close = _poster(port, "/plain")
        closers.append(close)
        fns["bare Serve deployment (anchor): HTTP POST"] = post
        samples = _sample(fns, calls, warmup, rounds)
    finally:
        for close in closers:
            close()
        serve.shutdown()

    rows = []
    p50 = {}
    for label, values in samples.items():
        p50[label] = statistics.median(values) * 1e3
        rows.append({"label": f"{label}, p50", "value": p50[label]})
        rows.append({"label": f"{label}, p99", "value": _p(values, 99) * 1e3})
    bare = p50["bare Serve deployment (anchor): HTTP POST"]
    ratios = {}
    for mode in nodes:
        ratios[f"{mode}: HTTP p50 - call() p50 (ms)"] = p50[f"{mode}: HTTP POST"] - p50[f"{mode}: p.call(x)"]
        ratios[f"{mode}: HTTP p50 - bare Serve p50 (ms)"] = p50[f"{mode}: HTTP POST"] - bare
    ratios["actors: HTTP / call() (p50)"] = p50["actors: HTTP POST"] / p50["actors: p.call(x)"]
    return {
        "name": "http",
        "title": "A one-step pipeline (returns its input, a small dict): p.call(x) vs HTTP POST through Ray Serve",
        "unit": "ms per call",
        "rows": rows,
        "ratios": ratios,
        "skipped": skipped,
        "notes": f"{calls} sequential calls per candidate after {warmup} warm-up calls, in {rounds} interleaved rounds; "
        "HTTP over one keep-alive http.client connection to Serve's proxy on 127.0.0.1, one ingress replica (num_cpus=0). The '(ms)' entries are differences of p50s, not ratios.",
    }
