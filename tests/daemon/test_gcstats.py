"""GC pause accounting: per-generation counters, long pauses drained once,
and the daemon's ``status`` reporting them to admins."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator

import pytest

from memosd.gcstats import GcPauses
from memosd.testing import DaemonHandle


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Only the test's own gc.collect() calls run (and reach the callbacks)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _clock(step_s: float) -> Iterator[float]:
    """A fake clock: every reading is ``step_s`` after the previous one."""
    return (i * step_s for i in itertools.count())


def _cycle() -> None:
    a: list[object] = []
    a.append(a)


@pytest.mark.usefixtures("no_automatic_gc")
def test_pauses_are_counted_per_generation() -> None:
    ticks = _clock(0.25)  # every collection "takes" 250 ms
    pauses = GcPauses(long_ms=1e9, clock=lambda: next(ticks))
    pauses.install()
    try:
        _cycle()
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        pauses.uninstall()
    gc.collect(2)  # not counted any more
    snap = pauses.snapshot()
    assert snap["gc_collections"] == [1, 0, 2]
    assert snap["gc_pause_ms_total"] == [250.0, 0.0, 500.0]
    assert snap["gc_pause_ms_max"] == [250.0, 0.0, 250.0]
    assert snap["gc_full_pause_ms_last"] == 250.0
    assert snap["gc_long_pauses"] == 0
    assert pauses.take_long_pauses() == []


@pytest.mark.usefixtures("no_automatic_gc")
def test_long_pauses_are_listed_once_and_bounded() -> None:
    ticks = _clock(0.25)
    pauses = GcPauses(long_ms=100.0, clock=lambda: next(ticks))
    pauses.install()
    try:
        _cycle()
        gc.collect(1)
        first = pauses.take_long_pauses()
        for _ in range(70):
            gc.collect(0)
    finally:
        pauses.uninstall()
    assert [(p.generation, p.ms) for p in first] == [(1, 250.0)]
    assert first[0].collected >= 1  # the cycle
    assert len(pauses.take_long_pauses()) == 64  # the newest 64 of 70
    assert pauses.take_long_pauses() == []
    assert pauses.snapshot()["gc_long_pauses"] == 71


def test_short_pauses_are_not_long() -> None:
    pauses = GcPauses(long_ms=100.0, clock=lambda: 0.0)
    pauses.install()
    try:
        gc.collect()
    finally:
        pauses.uninstall()
    assert pauses.take_long_pauses() == []
    assert pauses.snapshot()["gc_collections"][2] >= 1


def test_status_reports_process_memory_and_gc(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        for i in range(200):
            c.create_cube(f"cube-{i}")  # some work, some allocations
        process = c.status()["process"]
    assert process["rss_mb"] > 10
    assert process["max_rss_mb"] >= process["rss_mb"] * 0.5
    assert len(process["gc_collections"]) == 3
    assert process["gc_collections"][0] >= 1  # counted since the daemon got ready
    assert process["gc_frozen"] > 1000  # start-up state frozen out of the GC's sight
    assert all(m >= 0 for m in process["gc_pause_ms_max"])
