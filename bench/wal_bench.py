"""Micro benchmark of the WAL against the physical floor (write + fdatasync).

Usage: ``python bench/wal_bench.py``.  Environment:

* ``MEMOSD_WAL_BENCH_SECONDS``: time per scenario (default 3; 6 scenarios).
* ``MEMOSD_WAL_BENCH_DIR``: where to write (default: a temporary directory
  under the current directory, since /tmp is often tmpfs and fsyncs there
  cost nothing).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memosd.wal import WriteAheadLog

RECORD = os.urandom(1024)
SECONDS = float(os.environ.get("MEMOSD_WAL_BENCH_SECONDS", "3"))
BATCH = 100


class QuietLogger:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def raw_floor(directory: Path) -> tuple[float, list[float]]:
    """1 KiB write + fdatasync in a loop: what one thread could ever get."""
    fd = os.open(directory / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    latencies: list[float] = []
    try:
        deadline = time.perf_counter() + SECONDS
        start = time.perf_counter()
        while (now := time.perf_counter()) < deadline:
            os.write(fd, RECORD)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - now)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return len(latencies) / elapsed, latencies


def threaded(threads: int, op: Callable[[], object], per_op: int) -> tuple[float, list[float]]:
    """Run ``op`` in ``threads`` threads for SECONDS; (records/s, per-call latencies)."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    deadline = 0.0

    def worker(index: int) -> None:
        barrier.wait()
        mine = latencies[index]
        while (now := time.perf_counter()) < deadline:
            op()
            mine.append(time.perf_counter() - now)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for worker_thread in workers:
        worker_thread.start()
    deadline = time.perf_counter() + SECONDS
    start = time.perf_counter()
    barrier.wait()
    for worker_thread in workers:
        worker_thread.join()
    elapsed = time.perf_counter() - start
    flat = [x for lat in latencies for x in lat]
    return len(flat) * per_op / elapsed, flat


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def main() -> None:
    base = os.environ.get("MEMOSD_WAL_BENCH_DIR") or os.getcwd()
    with tempfile.TemporaryDirectory(prefix="wal-bench-", dir=base) as tmp:
        root = Path(tmp)
        print(f"directory: {root}  ({SECONDS:g}s per scenario, 1 KiB records)")
        rows: list[tuple[str, float, list[float], int]] = []
        rate, lat = raw_floor(root)
        rows.append(("raw write+fdatasync (1 thread)", rate, lat, 0))
        for threads in (1, 16, 64):
            with WriteAheadLog.open(root / f"t{threads}", logger=QuietLogger()) as wal:
                rate, lat = threaded(threads, functools.partial(wal.append, 1, RECORD), 1)
                rows.append((f"append, {threads} threads", rate, lat, wal.durable_lsn))
        with WriteAheadLog.open(root / "batch", logger=QuietLogger()) as wal:
            batch = [(1, RECORD)] * BATCH
            rate, lat = threaded(1, functools.partial(wal.append_batch, batch), BATCH)
            rows.append((f"append_batch of {BATCH}, 1 thread", rate, lat, wal.durable_lsn))

        print(f"{'scenario':36} {'records/s':>12} {'p50 ms':>9} {'p99 ms':>9}")
        for name, rate, lat, _records in rows:
            p50, p99 = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
            print(f"{name:36} {rate:12,.0f} {p50:9.3f} {p99:9.3f}")
        print("latency = time for one call to return (a batch call acknowledges 100 records)")


if __name__ == "__main__":
    main()
