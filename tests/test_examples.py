"""The examples run as scripts, unchanged, on every backend.

Each examples/seed/*.py script is run as `python script.py` would run it
(runpy, `__name__ == "__main__"`, its folder first on sys.path), with
PIPELINE_IR_BACKEND choosing the backend. Starting Ray costs seconds, so the
scripts share two subprocesses: one runs every script (and the demo) on the
local backend, without Ray; the other starts Ray once and runs the
non-vision scripts on tasks and on actors, and the vision ones as
VISION_ON_RAY says. A script passes when it ran to its end: each one
asserts its own results and prints "NAME: ok".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed"
VISION = ("classification", "ensemble")
SCRIPTS = sorted(p.stem for p in SEED.glob("*.py"))
PLAIN = [s for s in SCRIPTS if s not in VISION]
# Each vision run deploys torch models on Ray, which costs seconds: run
# each vision script once on Ray, and ensemble.py, the larger, on both Ray
# backends (classification.py with the modes its steps declare: preprocess
# in tasks, the model in actors).
VISION_ON_RAY = [("classification", "declared"), ("ensemble", "tasks"), ("ensemble", "actors")]

# Runs the [backend, script path, *argv] jobs given as JSON in argv[1] and
# prints one result line per script. "declared" leaves PIPELINE_IR_BACKEND
# unset, so each step runs in its own execution_mode.
RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback
for backend, path, *args in json.loads(sys.argv[1]):
    if backend == "declared":
        os.environ.pop("PIPELINE_IR_BACKEND", None)
    else:
        os.environ["PIPELINE_IR_BACKEND"] = backend
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        error = None
    except BaseException:
        error = traceback.format_exc()
    finally:
        sys.path.pop(0)
    print("@@" + json.dumps({"backend": backend, "script": path, "stdout": out.getvalue(), "error": error}), flush=True)
"""


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


HAS_RAY = _has("ray")
HAS_VISION = _has("torch") and _has("torchvision") and _has("PIL")


def local_jobs() -> list[list[str]]:
    jobs = [["local", str(SEED / f"{s}.py")] for s in SCRIPTS if HAS_VISION or s not in VISION]
    if HAS_VISION:
        jobs.append(["local", str(ROOT / "examples" / "demo.py"), "local"])
    return jobs


def ray_jobs() -> list[list[str]]:
    jobs = [[b, str(SEED / f"{s}.py")] for b in ("tasks", "actors") for s in PLAIN]
    if HAS_VISION:
        jobs += [[b, str(SEED / f"{s}.py")] for s, b in VISION_ON_RAY]
    return jobs


@cache
def results(group: str) -> dict[tuple[str, str], dict[str, str | None]]:
    """Run one subprocess for `group` ("local" or "ray"); results by
    (backend, script stem)."""
    jobs = local_jobs() if group == "local" else ray_jobs()
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_IR_BACKEND"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(jobs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            r = json.loads(line[2:])
            found[(r["backend"], Path(r["script"]).stem)] = r
    if len(found) != len(jobs):
        pytest.fail(f"the runner stopped early (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return found


def check(group: str, backend: str, script: str, expect: str | None = None) -> str:
    """The script ran to its end and printed `expect` (default "NAME: ok");
    returns its output."""
    r = results(group)[(backend, script)]
    out = str(r["stdout"])
    assert r["error"] is None, f"{script}.py on {backend} failed:\n{r['error']}\nstdout:\n{out}"
    assert (expect or f"{script}: ok") in out, out
    return out


@pytest.mark.parametrize("script", [s for s in SCRIPTS if HAS_VISION or s not in VISION])
def test_seed_example_local(script: str) -> None:
    check("local", "local", script)


@pytest.mark.skipif(not HAS_VISION, reason="needs the vision extra")
def test_demo_local() -> None:
    out = check("local", "local", "demo", expect="identical on: local")
    assert "fused local" in out  # the optimized dump shows the fusion pass at work
    assert "KeyError('premium')" in out  # the switch without default


@pytest.mark.skipif(not HAS_RAY, reason="needs ray")
@pytest.mark.parametrize("backend", ["tasks", "actors"])
@pytest.mark.parametrize("script", PLAIN)
def test_seed_example_ray(script: str, backend: str) -> None:
    check("ray", backend, script)


@pytest.mark.skipif(not (HAS_RAY and HAS_VISION), reason="needs ray and the vision extra")
@pytest.mark.parametrize(("script", "backend"), VISION_ON_RAY)
def test_vision_example_ray(script: str, backend: str) -> None:
    check("ray", backend, script)
