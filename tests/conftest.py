"""Shared fixtures. Ray starts once per test session, only for tests that
ask for it (the `ray_session` fixture), with logical GPUs so that GPU
placement is tested on CPU machines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
