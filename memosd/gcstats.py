"""Cyclic-GC pause accounting for the daemon (``memctl status`` → ``process.*``).

CPython's cyclic collector stops the whole process (it holds the GIL) for as
long as a collection runs; a full (generation 2) collection scans every
tracked object that is not frozen, so its pause grows with what the daemon
holds in memory.  :class:`GcPauses` times each collection through
``gc.callbacks`` and keeps, per generation, the count, the total and the
longest pause, plus the pauses longer than a threshold for the daemon to log.

The callback never logs itself: a collection can start inside any
allocation, including one made while a logger holds its (non-reentrant)
write lock in the same thread, and logging from there could deadlock.  The
daemon drains :meth:`GcPauses.take_long_pauses` from its periodic health
task instead.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

__all__ = ["GcPauses", "LongPause"]

_GENERATIONS: Final = 3
_KEEP_LONG: Final = 64  # long pauses kept between two drains (the oldest are dropped)


class LongPause(NamedTuple):
    """One long collection."""

    generation: int
    ms: float
    collected: int  # objects collected


class GcPauses:
    def __init__(
        self, *, long_ms: float = 100.0, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.long_ms = long_ms
        self._clock = clock
        self._started = 0.0
        self.collections = [0] * _GENERATIONS
        self.total_s = [0.0] * _GENERATIONS
        self.max_s = [0.0] * _GENERATIONS
        self.last_full_s = 0.0
        self._long: list[LongPause] = []
        self._long_total = 0
        self._lock = threading.Lock()  # take_long_pauses vs the callback in another thread
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        pause = self._clock() - self._started
        gen = int(info["generation"])
        self.collections[gen] += 1
        self.total_s[gen] += pause
        self.max_s[gen] = max(self.max_s[gen], pause)
        if gen == _GENERATIONS - 1:
            self.last_full_s = pause
        if pause * 1e3 < self.long_ms:
            return
        self._long_total += 1
        # Non-blocking: the collection may have started in the thread that
        # holds the lock (inside take_long_pauses); such a pause is only
        # counted, not listed.
        if self._lock.acquire(blocking=False):
            try:
                self._long.append(LongPause(gen, pause * 1e3, int(info["collected"])))
                del self._long[:-_KEEP_LONG]
            finally:
                self._lock.release()

    def take_long_pauses(self) -> list[LongPause]:
        """The long pauses recorded since the last call (at most the newest 64)."""
        with self._lock:
            taken, self._long = self._long, []
        return taken

    def snapshot(self) -> dict[str, Any]:
        """Counters for ``status`` (milliseconds, rounded to 0.01)."""
        return {
            "gc_collections": list(self.collections),
            "gc_pause_ms_total": [round(s * 1e3, 2) for s in self.total_s],
            "gc_pause_ms_max": [round(s * 1e3, 2) for s in self.max_s],
            "gc_full_pause_ms_last": round(self.last_full_s * 1e3, 2),
            "gc_long_pauses": self._long_total,
            "gc_tracked_young": list(gc.get_count()),
            "gc_frozen": gc.get_freeze_count(),
        }
