"""The docs say what the code does.

- The generated parts of docs/ir.md and docs/user-guide.md, and
  docs/graph.schema.json, match what `docs/gen_docs.py` produces now.
- Every ```python block of README.md, docs/user-guide.md and docs/ir.md
  runs, in order, in one namespace per file (like a session), except a
  block announced by an `<!-- not run -->` line. They run with
  PIPELINE_IR_BACKEND=local: the blocks show Ray steps, and the Ray
  backends have their own tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/user-guide.md", "docs/ir.md"]
_FENCE = re.compile(r"^(<!-- not run -->\n)?```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each block to run."""
    return [
        (text.count("\n", 0, m.start(2)) + 1, m.group(2))
        for m in _FENCE.finditer(text)
        if m.group(1) is None
    ]


def test_generated_docs_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_docs.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("page", PAGES)
def test_code_blocks_run(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_IR_BACKEND", "local")
    blocks = python_blocks((ROOT / page).read_text())
    assert blocks, f"{page} has no python block"
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in blocks:
        exec(compile(code, f"{page}:{line}", "exec"), namespace)


def test_blocks_not_run_are_marked() -> None:
    text = "x\n<!-- not run -->\n```python\nboom()\n```\n```python\nok = 1\n```\n"
    assert python_blocks(text) == [(7, "ok = 1\n")]
