"""The fast path (backends/fast_transport.py, fast_client.py, fast_server.py) against Ray's ways of calling
one actor that runs a whole 3-stage chain (each stage returns its input).

Side by side in one run:

- latency, p50 and p99 of sequential calls with a tiny payload (an int):
  (a) a plain Ray actor call, (b) a Ray Compiled Graph over the same kind
  of actor (`experimental_compile()`), (c) the fast path, from a thread
  and from asyncio. (a) and (c) take turns in blocks of calls, so that
  they share whatever load the machine has; (b) comes after them, in turns
  with (c) again: a compiled graph's actor spins on a core from the moment
  it is compiled, which slows its neighbours on a small machine;
- throughput with 500 calls in flight: plain Ray actor tasks (500
  submitted, then fetched) vs the fast path (500 `call_async` gathered);
- idle CPU, in % of one core, of an idle actor: one hosting a FastServer
  (after calls, its connections open), a Compiled Graph actor (compiled,
  no call in flight), a plain actor; from /proc/PID/stat (utime + stime)
  over the same IDLE_S seconds. Latency and idle CPU are measured in a
  child process with its own Ray, as in bench_anchors.py: a compiled
  graph's teardown can hang on this kind of machine;
- large buffers, a numpy array of 1 MB and 100 MB sent to the actor, which
  reads one byte per page and answers a number: the fast path with the
  buffer in a shared-memory segment (what it does over THRESHOLD), reused
  as in steady state and new (a new connection: a fresh memfd whose pages
  the kernel must allocate, zero and map), and inline through the socket;
  Ray's object store as a carrier (`ray.put` in the caller plus the
  zero-copy `ray.get` in the actor, timed there: the transfer alone,
  without the actor call around it); and a plain Ray actor call with the
  array as argument, for reference.

`python -m benchmarks fastpath`, or `python -m benchmarks.bench_fastpath
[--smoke]` alone (--smoke: few calls, no child and no Compiled Graph;
checks that it runs, not what it measures).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CALLS = 1000
WARMUP = 100
IN_FLIGHT = 500
ROUNDS = 3
IDLE_S = 3.0
SIZES = {"1MB": 1 << 20, "100MB": 100 << 20}
REPEATS = {"1MB": 20, "100MB": 5}
CHILD_TIMEOUT_S = 120


class Chain:
    """One actor running the three stages; optionally serving them over the
    fast path too."""

    def __init__(self) -> None:
        self.server: Any = None

    @staticmethod
    def stage(x: object) -> object:
        return x

    def run(self, x: object) -> object:
        return self.stage(self.stage(self.stage(x)))

    def pid(self) -> int:
        return os.getpid()

    def serve(self, caller_pid: int, spin_s: float | None = None) -> Any:
        from pipeline_ir.backends.fast_server import FastServer
        from pipeline_ir.backends.fast_transport import SPIN_S

        self.server = FastServer(self.dispatch, [caller_pid], spin_s=SPIN_S if spin_s is None else spin_s)
        return self.server.start()

    def dispatch(self, op: str, x: Any) -> object:
        return self.run(x) if op == "run" else self.consume(x)

    def consume(self, x: Any) -> float:
        """Read one byte per page, as any reader of the buffer would."""
        return float(np.asarray(x).view(np.uint8)[::4096].sum())

    def get_timed(self, refs: list[Any]) -> float:
        """Seconds for the zero-copy ray.get of refs[0], read as consume() reads."""
        import ray

        start = time.perf_counter()
        self.consume(ray.get(refs[0]))
        return time.perf_counter() - start


def stage_a(x: object) -> object:
    return x


def stage_b(x: object) -> object:
    return x


def stage_c(x: object) -> object:
    return x


def deploy_chain(fast_path: bool = True) -> Any:
    """The same 3-stage chain as pipeline_ir ACTORS steps, default compile
    (colocate_actors puts the three in one actor), deployed."""
    import pipeline_ir as pipeline

    steps = [pipeline.step(f, execution_mode="actors") for f in (stage_a, stage_b, stage_c)]
    node = steps[2](steps[1](steps[0](pipeline.INPUT)))
    return pipeline.compile(node).deploy(fast_path=fast_path)


def replica_pids(deployed: Any) -> list[int]:
    pools = deployed._program.launchers["actors"].pools.values()
    return [s.pid for p in pools for s in p.slots if s.pid is not None]


def sequential(call: Callable[[], object]) -> Callable[[int], list[float]]:
    """A block of n calls, one after another: the seconds each took."""

    def block(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return samples

    return block


def on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> Callable[[int], list[float]]:
    """`sequential` for a coroutine function, on `loop`."""

    async def timed(n: int) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await call()
            samples.append(time.perf_counter() - start)
        return samples

    return lambda n: loop.run_until_complete(timed(n))


def latency_rows(blocks: dict[str, Callable[[int], list[float]]], calls: int, warmup: int) -> dict[str, float]:
    """p50 and p99 in us of `calls` calls of each variant, run in
    interleaved blocks so that all see the same load on a shared machine."""
    for block in blocks.values():
        block(warmup)
    samples: dict[str, list[float]] = {label: [] for label in blocks}
    size = max(1, calls // 4)  # long enough that what one way leaves behind (threads Ray wakes) fades
    for _ in range(calls // size):
        for label, block in blocks.items():
            samples[label] += block(size)
    rows = {}
    for label, taken in samples.items():
        taken.sort()
        rows[f"p50 us: {label}"] = taken[len(taken) // 2] * 1e6
        rows[f"p99 us: {label}"] = taken[min(len(taken) - 1, int(len(taken) * 0.99))] * 1e6
    return rows


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_percent(pids: dict[str, int | list[int]], seconds: float) -> dict[str, float]:
    """% of one core each process (or group of processes, summed) used
    over the same `seconds`, idle."""

    def used(pid: int | list[int]) -> float:
        return sum(cpu_seconds(p) for p in ([pid] if isinstance(pid, int) else pid))

    before = {name: used(pid) for name, pid in pids.items()}
    start = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - start
    return {name: (used(pid) - before[name]) / wall * 100 for name, pid in pids.items()}


def _ray() -> Any:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS if set, else a Ray of its own: never another user's
        # `ray start` cluster that happens to run on this machine.
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    return ray


def _actor(ray: Any) -> Any:
    from pipeline_ir.backends import ray_runtime

    ray_runtime.ship_code([Chain])  # workers may not import this module by name
    return ray.remote(num_cpus=0)(Chain).remote()


def throughput(submit_round: Callable[[], object], rounds: int) -> float:
    """Calls per second over `rounds` rounds of IN_FLIGHT calls (the best round)."""
    submit_round()  # warm-up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        submit_round()
        best = max(best, IN_FLIGHT / (time.perf_counter() - start))
    return best


def latency_and_idle(ray: Any, calls: int, warmup: int, idle_s: float, compiled_graph: bool) -> dict[str, float]:
    """Latency of each way to call a Chain actor (interleaved), then the
    idle CPU of each actor over the same `idle_s` seconds. Actors are
    killed at the end; a compiled graph is torn down."""
    from pipeline_ir.backends.fast_client import FastClient

    plain, hosting, sleeper = _actor(ray), _actor(ray), _actor(ray)
    fast = FastClient(ray.get(hosting.serve.remote(os.getpid())))
    # The same transport with neither side polling before it blocks
    # (docs/design.md, "Spin, then block").
    unpolled = FastClient(ray.get(sleeper.serve.remote(os.getpid(), 0.0)), spin_s=0.0)
    deployed = deploy_chain()
    pids: dict[str, int | list[int]] = {
        "plain actor": ray.get(plain.pid.remote()),
        "fast-path actor (server, connections open)": ray.get(hosting.pid.remote()),
        "deployed pipeline_ir chain (its replica)": replica_pids(deployed),
    }
    loop = asyncio.new_event_loop()
    blocks = {
        "ray actor call": sequential(lambda: ray.get(plain.run.remote(1))),
        "fast path, thread": sequential(lambda: fast.call(("run", 1))),
        "fast path, thread, no polling": sequential(lambda: unpolled.call(("run", 1))),
        "fast path, asyncio": on_loop(loop, lambda: fast.call_async(("run", 1))),
        "pipeline_ir chain, default deploy: call": sequential(lambda: deployed.call(1)),
        "pipeline_ir chain, default deploy: call_async": on_loop(loop, lambda: deployed.call_async(1)),
    }
    compiled = None
    try:
        rows = latency_rows(blocks, calls, warmup)
        if compiled_graph:
            # Measured after the others, not between them: a compiled
            # graph's actor spins on a core even between calls, which
            # slows whatever shares the machine (the second row shows how
            # much, for the fast path).
            from ray.dag import DAGContext, InputNode

            DAGContext.get_current().teardown_timeout = 5
            graph_actor = _actor(ray)
            pids["compiled graph actor"] = ray.get(graph_actor.pid.remote())
            with InputNode() as inp:
                dag = graph_actor.run.bind(inp)
            compiled = dag.experimental_compile()
            beside = {
                "ray compiled graph": sequential(lambda: ray.get(compiled.execute(1))),
                "fast path, thread, beside an idle compiled graph": blocks["fast path, thread"],
                "pipeline_ir chain, default deploy: call, beside an idle compiled graph": blocks["pipeline_ir chain, default deploy: call"],
            }
            rows.update(latency_rows(beside, calls, warmup))
        loop.close()
        # This process too: with the pipeline deployed, its health monitor
        # runs here (beside Ray's own driver threads).
        pids["the caller (Ray driver, pipeline health monitor)"] = os.getpid()
        for label, value in idle_percent(pids, idle_s).items():
            rows[f"idle % of a core: {label}"] = value
        return rows
    finally:
        deployed.shutdown()
        fast.close(remove_server_files=True)
        unpolled.close(remove_server_files=True)
        ray.kill(plain)
        ray.kill(hosting)
        ray.kill(sleeper)
        if compiled is not None:
            compiled.teardown(kill_actors=True)


def throughput_rows(ray: Any, plain: Any, fast: Any, deployed: Any, rounds: int) -> dict[str, float]:
    def ray_round() -> None:
        ray.get([plain.run.remote(i) for i in range(IN_FLIGHT)])

    async def gather() -> None:
        await asyncio.gather(*(fast.call_async(("run", i)) for i in range(IN_FLIGHT)))

    async def gather_pipeline() -> None:
        await asyncio.gather(*(deployed.call_async(i) for i in range(IN_FLIGHT)))

    return {
        f"calls/s, {IN_FLIGHT} in flight: ray actor calls": throughput(ray_round, rounds),
        f"calls/s, {IN_FLIGHT} in flight: fast path (asyncio)": throughput(lambda: asyncio.run(gather()), rounds),
        f"calls/s, {IN_FLIGHT} in flight: pipeline_ir chain, default deploy (call_async)": throughput(
            lambda: asyncio.run(gather_pipeline()), rounds
        ),
    }


def buffer_rows(ray: Any, plain: Any, fast: Any, repeats: dict[str, int]) -> dict[str, float]:
    """ms to get an array of each size to the actor and read it there."""
    from pipeline_ir.backends.fast_client import FastClient

    rows: dict[str, float] = {}
    threshold = fast.threshold
    for name, size in SIZES.items():
        x = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
        times: dict[str, list[float]] = {}

        def timed(label: str, fn: Callable[[], object]) -> None:
            start = time.perf_counter()
            fn()
            times.setdefault(label, []).append(time.perf_counter() - start)

        def via_store() -> float:
            start = time.perf_counter()
            ref = ray.put(x)
            put = time.perf_counter() - start
            return put + float(ray.get(plain.get_timed.remote([ref])))

        def fast_with(limit: int) -> None:
            fast.threshold = limit
            fast.call(("consume", x))

        def fresh() -> None:
            client = FastClient(fast.address)
            client.call(("consume", x))
            client.close()

        for _ in range(repeats[name] + 1):  # interleaved, the first round a warm-up
            timed("fast path, segment (reused)", lambda: fast_with(threshold))
            timed("fast path, segment (new connection: first use)", fresh)
            timed("fast path, inline", lambda: fast_with(2 * size))
            times.setdefault("object store: ray.put + zero-copy ray.get", []).append(via_store())
            timed("ray actor call", lambda: ray.get(plain.consume.remote(x)))
        fast.threshold = threshold
        for label, samples in times.items():
            rows[f"{name} ms: {label}"] = statistics.median(samples[1:]) * 1e3
    return rows


def latency_child(calls: int, warmup: int) -> None:
    """In the child process: `latency_and_idle` with a compiled graph,
    printed as JSON before anything is torn down."""
    ray = _ray()
    print("@@" + json.dumps(latency_and_idle(ray, calls, warmup, IDLE_S, compiled_graph=True)), flush=True)
    ray.shutdown()


def latency_rows_in_child(calls: int, warmup: int) -> tuple[dict[str, float], str]:
    """Run `latency_child` in a subprocess with its own Ray; its rows, or
    why none."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.bench_fastpath", "--latency-child", str(calls), str(warmup)]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        out, note = proc.stdout, "" if proc.returncode == 0 else f"the latency child exited with status {proc.returncode} (after printing its figures, if any)"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        note = f"the latency child did not finish within {CHILD_TIMEOUT_S} s (killed)"
    for line in out.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:]), note
    return {}, note or "the latency child printed no figures"


def run(smoke: bool = False) -> dict[str, Any]:
    from pipeline_ir.backends.fast_client import FastClient

    ray = _ray()
    calls, warmup, rounds = (50, 5, 1) if smoke else (CALLS, WARMUP, ROUNDS)
    repeats = {name: 1 for name in SIZES} if smoke else REPEATS
    rows: dict[str, float] = {}
    skipped: dict[str, str] = {}
    notes: list[str] = []
    if smoke:
        rows.update(latency_and_idle(ray, calls, warmup, 0.5, compiled_graph=False))
        skipped["ray compiled graph"] = "--smoke"
    else:
        child_rows, note = latency_rows_in_child(calls, warmup)
        rows.update(child_rows)
        if note:
            notes.append(note)
        if not child_rows:
            raise RuntimeError(f"no latency figures: {note}")
    plain, hosting = _actor(ray), _actor(ray)
    fast = FastClient(ray.get(hosting.serve.remote(os.getpid())))
    deployed = deploy_chain()
    try:
        rows.update(throughput_rows(ray, plain, fast, deployed, rounds))
        rows.update(buffer_rows(ray, plain, fast, repeats))
    finally:
        deployed.shutdown()
        fast.close(remove_server_files=True)
        ray.kill(plain)
        ray.kill(hosting)
    ratios: dict[str, float] = {}
    fast_p50 = rows["p50 us: fast path, thread"]
    chain_p50 = rows["p50 us: pipeline_ir chain, default deploy: call"]
    for anchor in ("ray compiled graph", "ray actor call"):
        if f"p50 us: {anchor}" in rows:
            ratios[f"p50 fast path / {anchor}"] = fast_p50 / rows[f"p50 us: {anchor}"]
            ratios[f"p50 pipeline_ir chain (default deploy) / {anchor}"] = chain_p50 / rows[f"p50 us: {anchor}"]
    if "p50 us: fast path, thread, no polling" in rows:
        ratios["p50 fast path / the same without polling"] = fast_p50 / rows["p50 us: fast path, thread, no polling"]
    per_s = {k: v for k, v in rows.items() if k.startswith(f"calls/s, {IN_FLIGHT} in flight: ")}
    ray_per_s = per_s[f"calls/s, {IN_FLIGHT} in flight: ray actor calls"]
    ratios["throughput fast path / ray actor calls"] = per_s[f"calls/s, {IN_FLIGHT} in flight: fast path (asyncio)"] / ray_per_s
    ratios["throughput pipeline_ir chain (default deploy) / ray actor calls"] = (
        per_s[f"calls/s, {IN_FLIGHT} in flight: pipeline_ir chain, default deploy (call_async)"] / ray_per_s
    )
    for name in SIZES:
        segment = rows[f"{name} ms: fast path, segment (reused)"]
        ratios[f"{name}: segment / object store"] = segment / rows[f"{name} ms: object store: ray.put + zero-copy ray.get"]
        ratios[f"{name}: fast path (segment) / ray actor call"] = segment / rows[f"{name} ms: ray actor call"]
    where = "in this process (--smoke)" if smoke else "with the idle CPU, in a child process with its own Ray"
    notes.append(f"latency: {calls} sequential calls of each way after {warmup} warm-up, in interleaved blocks, {where}; throughput: best of {rounds} rounds of {IN_FLIGHT}")
    notes.append("the object-store row times ray.put in the caller plus ray.get in the actor only; the fast-path and ray-actor-call rows are whole calls")
    return {
        "name": "fastpath",
        "title": "The fast path vs a Ray actor call and a Ray Compiled Graph: 3-stage chain in one actor; latency, throughput, idle CPU, large buffers",
        "unit": "(unit in each label)",
        "rows": [{"label": label, "value": value} for label, value in rows.items()],
        "ratios": ratios,
        "notes": "; ".join(notes),
        "skipped": skipped,
    }


if __name__ == "__main__":
    if "--latency-child" in sys.argv:
        i = sys.argv.index("--latency-child")
        latency_child(int(sys.argv[i + 1]), int(sys.argv[i + 2]))
    else:
        result = run(smoke="--smoke" in sys.argv)
        for row in result["rows"]:
            print(f"{row['label']:<64} {row['value']:>12.4g}")
        for key, value in result["ratios"].items():
            print(f"ratio {key}: {value:.2f}")
        print(result["notes"])
        _ray().shutdown()
