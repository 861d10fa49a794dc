"""Fixtures for the scheduler tests: an engine on an injected clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from memosd.engine import Engine

T0_US = 1_700_000_000_000_000  # a fixed start of simulated time


class FakeClock:
    """Simulated microseconds, shared by engine and runner.

    Moves when told to, plus 1 us per reading: the engine clamps its own
    time to be strictly increasing, so a clock that never moved would fall
    behind the engine's timestamps (and jobs due "now" would never be due).
    """

    def __init__(self, start_us: int = T0_US) -> None:
        self.now_us = start_us
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.now_us += 1
            return self.now_us

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now_us += int(seconds * 1_000_000)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(tmp_path: Path, clock: FakeClock) -> Iterator[Engine]:
    with Engine.open(tmp_path / "data", clock=clock) as eng:
        eng.create_cube("c", owner="uid:0")
        yield eng
