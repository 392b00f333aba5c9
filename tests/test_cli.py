"""`python -m pipeline_ir dump` and the `pipeline-ir` console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pipeline_ir as pipeline

HERE = Path(__file__).parent


def run(*args: str, script: bool = False) -> subprocess.CompletedProcess[str]:
    exe = [str(Path(sys.executable).parent / "pipeline-ir")] if script else [sys.executable, "-m", "pipeline_ir"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, cwd=HERE)


def test_dump_text_optimized_and_raw() -> None:
    out = run("dump", "cli_target:chain")
    assert out.returncode == 0, out.stderr
    assert "fused local {" in out.stdout
    raw = run("dump", "cli_target:chain", "--raw")
    assert raw.stdout.strip() == (
        "pipeline double(%0: Any) -> int:\n  %1: int = add_one(%0)\n  %2: int = double(%1)\n  return %2"
    )


def test_dump_compiled_pipeline_json_round_trips() -> None:
    out = run("dump", "cli_target:compiled", "--format", "json")
    assert out.returncode == 0, out.stderr
    graph = pipeline.Graph.from_json(out.stdout)
    assert graph.name == "chain"
    import cli_target  # type: ignore[import-not-found]

    assert graph == cli_target.compiled.graph


def test_dump_dot_and_tuple_target_and_file_path() -> None:
    dot = run("dump", "cli_target:both", "--format", "dot")
    assert dot.returncode == 0 and dot.stdout.startswith("digraph")
    by_path = run("dump", str(HERE / "cli_target.py") + ":chain", "--raw")
    assert by_path.returncode == 0 and "add_one(%0)" in by_path.stdout


def test_console_script() -> None:
    out = run("dump", "cli_target:chain", "--raw", script=True)
    assert out.returncode == 0 and "double(%1)" in out.stdout


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("cli_target", "must be MODULE:ATTR"),
        ("no_such_module:x", "cannot import module 'no_such_module'"),
        ("cli_target:missing", "has no attribute 'missing'"),
        ("cli_target:not_a_pipeline", "is a int, not a pipeline node"),
        ("nope.py:x", "no such file: nope.py"),
    ],
)
def test_bad_targets_exit_2_with_one_line(target: str, message: str) -> None:
    out = run("dump", target)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline-ir: error:") and message in lines[0]
    assert "Traceback" not in out.stderr
