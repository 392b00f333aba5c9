"""Checking on processes by pid, for the tests that prove replicas end."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie has exited, so it does not)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        # Reaped between the two looks (reading a reaped pid's stat raises
        # ESRCH): it has exited.
        return False


def wait_gone(pids: Iterable[int], timeout_s: float = 10.0) -> list[int]:
    """Wait up to `timeout_s` for the processes to exit; the pids still alive."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left
