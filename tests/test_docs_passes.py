"""docs/passes.md shows what the passes really print: its generated
blocks equal what docs/gen_passes.py produces now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_passes_doc_is_up_to_date() -> None:
    out = subprocess.run([sys.executable, str(DOCS / "gen_passes.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
