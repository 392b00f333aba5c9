"""Colocation never costs liveness, on a real 3-node Ray cluster.

tests/cluster_colocation.py builds the cluster with
`ray.cluster_utils.Cluster` in a subprocess (one Ray per process: the
session's Ray is separate), runs both scenarios once, in about 30 s, and
prints what it saw; the tests here read it. Bounded by a timeout; the
subprocess's process group is killed if it overruns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

SCRIPT = Path(__file__).with_name("cluster_colocation.py")
TIMEOUT_S = 150


@cache
def seen() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_IR_BACKEND", "RAY_ADDRESS")}
    # Its own Ray temp dir: `Cluster` writes its address to
    # RAY_TMPDIR/ray/ray_current_cluster, where any other process's plain
    # ray.init() on this machine would find it and join this cluster.
    tmp = tempfile.mkdtemp(prefix="pir")
    env["RAY_TMPDIR"] = tmp
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT)], cwd=SCRIPT.parent.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the 3-node cluster scenario did not finish in {TIMEOUT_S} s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the 3-node cluster scenario failed (exit {proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def test_tasks_preferring_a_busy_node_run_elsewhere_at_once() -> None:
    r = seen()
    assert "colocate=c1" in r["dump"].splitlines()[1] and "colocate=c1" in r["dump"].splitlines()[4]
    prep_node, model_node, filler_node, post_node = r["busy"]
    # The scenario of the issue: the GPU node's CPUs are all held by the
    # replicas colocated there ...
    assert model_node == filler_node == r["gpu_node"]
    # ... and the tasks colocated with them ran elsewhere, on the first
    # call (with soft node affinity they waited for a CPU there forever).
    assert r["gpu_node"] not in (prep_node, post_node)
    assert "step 'Model' (%2): 1 replica x CPU=1, GPU=1 -> " in r["explain"]


def test_after_the_node_is_lost_the_label_follows_the_new_replica() -> None:
    r = seen()
    assert r["label_node"] == r["new_node"] != r["gpu_node"]
    prep_node, model_node, _filler, _post = r["after_loss"]
    assert model_node == r["new_node"] and r["gpu_node"] not in r["after_loss"]
    # The new GPU node has a CPU free: the first task follows the label there.
    assert prep_node == r["new_node"]
