"""The benchmark suite cannot rot: `python -m benchmarks --smoke` runs every
benchmarks/bench_*.py at tiny sizes and must exit 0.

In a subprocess, so that it has its own Ray (started once, by the first
benchmark that needs it) and never the one of this test session; no
figure is checked, only that every benchmark ran and wrote its files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A hang guard, not the expected time: about a minute on an idle 2-core
# machine, Ray's start included, more when the machine is shared.
TIMEOUT_S = 280


@pytest.mark.timeout(TIMEOUT_S + 20)
def test_every_benchmark_runs_in_smoke_mode(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("matplotlib")
    from benchmarks.__main__ import discover

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # Start a Ray of its own: without this, ray.init() joins the cluster
        # last started on this machine by `ray start` or ray.cluster_utils.
        "RAY_ADDRESS": "local",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"python -m benchmarks --smoke ran past {TIMEOUT_S} s; its output so far:\n{out[-3000:]}")
    assert proc.returncode == 0, f"python -m benchmarks --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["smoke"] is True
    results = {r["name"]: r for r in report["benchmarks"]}
    expected = {name.removeprefix("bench_") for name in discover()}
    assert set(results) == expected
    for name, result in results.items():
        assert "error" not in result, f"{name}: {result['error']}"
        # Skipping is allowed only with a reason, and a benchmark must run something.
        assert result["rows"] or result["skipped"], f"{name} ran nothing and said nothing"
        assert all(isinstance(reason, str) and reason for reason in result["skipped"].values()), name
        assert (tmp_path / f"{name}.json").is_file() and (tmp_path / f"{name}.png").is_file(), name


def test_smoke_never_writes_into_the_results_directory() -> None:
    from benchmarks.__main__ import RESULTS, main

    with pytest.raises(SystemExit) as exc:
        main(["--smoke", "--out", str(RESULTS), "local_overhead"])
    assert exc.value.code == 2  # argparse's usage error, before anything ran


def test_the_spin_experiment_runs() -> None:
    """benchmarks/spin_ab.py stays out of the suite (its busy loops would
    slow whatever runs next) but must not rot either."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.spin_ab", "--calls", "20"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    busy = min(2, os.cpu_count() or 1)
    assert [(int(r[0]), int(r[1])) for r in rows] == [(b, p) for b in range(busy + 1) for p in (0, 100)]
    assert all(float(r[2]) > 0 and float(r[3]) >= float(r[2]) for r in rows)
