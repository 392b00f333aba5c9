"""Optimization passes: each a pure function Graph -> PassResult.

`default_passes()` is the order compile() runs them in.
"""

from __future__ import annotations

from pipeline_ir.passes.force_backend import force_backend
from pipeline_ir.passes.fuse_local import fuse_local
from pipeline_ir.passes.manager import Pass, PassRecord, PassResult, explain, run_passes


def default_passes() -> list[Pass]:
    """The passes compile() runs when optimize=True, in order."""
    return [fuse_local]


__all__ = ["Pass", "PassRecord", "PassResult", "default_passes", "explain", "force_backend", "fuse_local", "run_passes"]
