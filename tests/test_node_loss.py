"""Node loss on a multi-node Ray cluster (`ray.cluster_utils.Cluster`: a
head and worker nodes, all processes on this machine).

Each test runs a script in a subprocess with a cluster of its own (one Ray
per process), bounded in time, and asserts on the JSON line it prints last:
what every call returned, and what the pool looked like after the loss.
No timing assertions: the subprocess timeout only catches hangs, and the
times the scripts print are figures for docs/operations.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
_TIMEOUT_S = 150  # per script; a script that hangs fails its test

# Shared by the scripts: start a cluster without taking over this machine's
# "current cluster" file, through which another process's plain ray.init()
# would join ours (other tests and tools run on this machine meanwhile).
PRELUDE = textwrap.dedent(
    """
    import collections, json, os, sys, threading, time
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster
    import pipeline_ir as pipeline

    def start_cluster(head_cpus, *workers):
        path = get_ray_address_file(None)
        before = open(path).read() if os.path.exists(path) else None
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
        nodes = [cluster.add_node(**w) for w in workers]
        if before is None:
            if os.path.exists(path):  # another test's cluster may have removed it meanwhile
                os.remove(path)
        else:
            open(path, "w").write(before)
        ray.init(address=cluster.address, log_to_driver=False)
        return cluster, nodes

    def node_of(cluster_node):
        return cluster_node.node_id

    def pool_of(p, key):
        return p._program.closers[0].__self__.pools[key]

    def outcome(x):
        return "ok" if not isinstance(x, BaseException) else type(x).__name__ + ": " + str(x)

    SERVING = dict(health_check_period_s=0.5, health_check_timeout_s=5.0, abandon_grace_s=1.0)
    """
)

REPLICA_NODE_LOST = textwrap.dedent(
    """
    IDEMPOTENT = sys.argv[1] == "idempotent"

    @pipeline.step(execution_mode="actors", num_replicas=2, num_cpus=1, idempotent=IDEMPOTENT)
    def square(x):
        time.sleep(0.02)
        return x * x

    # 3 CPUs for 2 replicas: at least one replica is on a worker, and
    # after losing that worker the remaining nodes have room for one more.
    cluster, workers = start_cluster(1, dict(num_cpus=1), dict(num_cpus=1))
    N = 300
    with square(pipeline.INPUT).deploy(**SERVING) as p:
        pool = pool_of(p, "square")
        before = [s.node for s in pool.slots]
        victim = next(w for w in workers if w.node_id in before)
        got, done = [], threading.Event()

        def run():
            got.extend(p.map(range(N), max_in_flight=4, return_exceptions=True))
            done.set()

        threading.Thread(target=run, daemon=True).start()
        while p.stats()["square"]["calls"] < 40:
            time.sleep(0.05)
        removed = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)
        # Back to two replicas up, on the nodes left (while the load runs).
        while not all(s.actor_id and not s.dead and s.node != victim.node_id for s in pool.slots):
            time.sleep(0.05)
        recovered_s = time.monotonic() - removed
        done.wait()
        load_s = time.monotonic() - removed
        assert p.call(3) == 9
        after = [s.node for s in pool.slots]
        errors = [outcome(g) for g in got if isinstance(g, BaseException)]
        report = dict(
            items=len(got), right=sum(g == i * i for i, g in enumerate(got)), errors=errors,
            victim=victim.node_id, before=before, after=after, load_s=load_s, recovered_s=recovered_s,
        )
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report))
    """
)

GPU_NODE_LOST = textwrap.dedent(
    """
    @pipeline.step(execution_mode="actors", num_gpus=1)
    def on_gpu(x):
        time.sleep(0.02)
        return x + 1

    cluster, (cpu, gpu) = start_cluster(0, dict(num_cpus=1), dict(num_cpus=1, num_gpus=1))
    TIMEOUT = 3.0
    with on_gpu(pipeline.INPUT).deploy(**SERVING) as p:
        pool = pool_of(p, "on_gpu")
        during = []  # (seconds, outcome) of each call made while the node goes

        def caller():
            for i in range(20):
                start = time.monotonic()
                try:
                    p.call(i, timeout=TIMEOUT)
                    what = "ok"
                except Exception as e:
                    what = outcome(e)
                during.append((time.monotonic() - start, what))

        threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        removed = time.monotonic()
        cluster.remove_node(gpu, allow_graceful=False)
        for t in threads:
            t.join()
        # Once the pool knows no node can host its replica, calls with or
        # without a deadline fail at once.
        while pool.unplaced is None:
            time.sleep(0.1)
        known_s = time.monotonic() - removed
        later = []
        for i in range(5):
            start = time.monotonic()
            what, kind = "ok", None
            try:
                p.call(i, timeout=TIMEOUT if i % 2 else None)
            except Exception as e:
                what, kind = outcome(e), type(e).__name__
            later.append((time.monotonic() - start, what, kind))
        added = time.monotonic()
        cluster.add_node(num_cpus=1, num_gpus=1)
        joined_s = time.monotonic() - added
        while True:
            try:
                value = p.call(1, timeout=TIMEOUT)
                break
            except Exception:
                time.sleep(0.2)
        back_s = time.monotonic() - added
        # The pool records a replica's id when Ray reports its ready() on
        # the callback thread, which may come a moment after its first call.
        settle = time.monotonic() + 10
        while not all(s.actor_id is not None for s in pool.slots) and time.monotonic() < settle:
            time.sleep(0.05)
        report = dict(
            timeout=TIMEOUT, during=during, later=later, value=value, known_s=known_s, joined_s=joined_s,
            back_s=back_s, slots=[(s.actor_id is not None, s.dead) for s in pool.slots],
        )
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report))
    """
)


def run_script(body: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", PRELUDE + body, *args],
            capture_output=True, text=True, timeout=_TIMEOUT_S, env=env, cwd=ROOT,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the script hung past {_TIMEOUT_S} s; its output ended with:\n{str(e.stdout)[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, f"rc {done.returncode}:\n{done.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    print(json.dumps(result))  # the figures, for `pytest -s`
    return result


@pytest.mark.timeout(_TIMEOUT_S + 30)
@pytest.mark.parametrize("kind", ["idempotent", "plain"])
def test_losing_a_replicas_node_mid_load(kind: str) -> None:
    r = run_script(REPLICA_NODE_LOST, kind)
    assert r["items"] == 300  # map accounted for every item: none hung
    assert r["right"] + len(r["errors"]) == 300
    if kind == "idempotent":
        assert r["errors"] == []  # calls lost with the replica ran again elsewhere
    else:
        for e in r["errors"]:
            assert e.startswith("StepError: step 'square' (node %1)"), e
    # The pool is back to two replicas, none on the lost node.
    assert r["victim"] in r["before"] and r["victim"] not in r["after"]
    assert len(r["after"]) == 2 and all(r["after"])


@pytest.mark.timeout(_TIMEOUT_S + 30)
def test_losing_the_only_gpu_node_fails_calls_until_one_joins() -> None:
    r = run_script(GPU_NODE_LOST)
    during = r["during"]
    assert len(during) == 80
    # Each call ended by its deadline, give or take scheduling on a busy machine.
    assert all(seconds < r["timeout"] + 5 for seconds, _ in during), during
    for _, what in during:
        assert what == "ok" or "on_gpu" in what, what
    # Later calls, with a deadline or without, fail at once with the reason.
    for _, what, kind in r["later"]:
        assert kind == "StepError", what
        assert what.startswith("StepError: step 'on_gpu' (node %1): no alive node of the Ray cluster can host")
        assert "needs CPU=1, GPU=1" in what and "until a node with CPU=1, GPU=1 joins" in what
    # A new GPU node: the pool starts its replica there and serves again.
    assert r["value"] == 2
    assert r["slots"] == [[True, False]]
