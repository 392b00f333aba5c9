"""Checking on a process by pid, on this machine."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by
    its parent, counts as gone; another user's process counts as running)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False
    except (PermissionError, OSError):
        return True
