"""Storage engine benchmark (issue 2): durability at speed.

Prints, in one run:

* the physical floor: raw ``write + fdatasync`` of 1 KB records per second
  (appending, and overwriting a zero-filled file as the WAL does);
* acknowledged writes/s of ``Engine.add`` (1 KB text) with 1, 16 and 64
  concurrent writer threads, with p50/p99 acknowledge latency; one writer
  runs in at least 5 pairs with the floor (floor, zero-filled floor, engine),
  and its ratio to the floor is the median of the per-pair ratios;
* the same with 64 adds in flight from one thread through completion
  callbacks (``Engine.add_nowait``), the way the daemon's event loop writes;
* the CPU per acknowledged add with ``fdatasync`` stubbed out (1 and 64
  writers): a load-insensitive view of the Python work per write;
* recovery time after a power loss of a store holding N records of which M
  were written after the last checkpoint (LMDB rolls back to the checkpoint,
  the M records are replayed from the WAL).

Sizes come from the environment so CI-sized smoke runs stay short:
``BENCH_WRITES`` (writes per concurrency level, default 20000),
``BENCH_RECOVERY_RECORDS`` (default 1000000), ``BENCH_RECOVERY_WAL`` (default
100000), ``BENCH_REPEATS`` (default 3, the median is reported).

Run: ``.venv/bin/python bench/storage_bench.py``
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from memosd.engine import Engine, EngineSettings
from memosd.wal.fileio import OsFileIO

# Tables go to stdout; logs to stderr.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

WRITES = int(os.environ.get("BENCH_WRITES", "20000"))
RECOVERY_RECORDS = int(os.environ.get("BENCH_RECOVERY_RECORDS", "1000000"))
RECOVERY_WAL = int(os.environ.get("BENCH_RECOVERY_WAL", "100000"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
TEXT = "m" * 1000


def raw_fdatasync_rate(directory: Path, n: int = 3000, *, prefilled: bool = False) -> float:
    """1 KB ``write`` + ``fdatasync`` per second: appends, or overwrites of zeros.

    ``prefilled`` writes into a file already zero-filled and synced to its
    final size (what the WAL does), so no fdatasync changes the file size.
    """
    path = directory / "raw.bin"
    buf = b"x" * 1024
    if prefilled:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, bytes(n * len(buf)))
        os.fdatasync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(n):
            os.write(fd, buf)
            os.fdatasync(fd)
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


def engine_rate(directory: Path, writers: int, total: int) -> tuple[float, float, float]:
    per_writer = max(1, total // writers)
    latencies: list[list[float]] = [[] for _ in range(writers)]
    settings = EngineSettings(checkpoint_interval_s=3600, checkpoint_wal_bytes=1 << 40)
    with Engine.open(directory, settings=settings) as engine:
        engine.create_cube("bench", owner="uid:0")
        barrier = threading.Barrier(writers + 1)

        def work(slot: int) -> None:
            lat = latencies[slot]
            barrier.wait()
            for _ in range(per_writer):
                t0 = time.perf_counter()
                engine.add("bench", TEXT)
                lat.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    flat = [x for lat in latencies for x in lat]
    return (len(flat) / elapsed, *_p50_p99_ms(flat))


def _p50_p99_ms(latencies: list[float]) -> tuple[float, float]:
    """Median and 99th percentile of latencies in seconds, in milliseconds."""
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1e3
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3
    return p50, p99


def _medians(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The median rate, p50 and p99 over repeated ``(rate, p50, p99)`` runs."""
    rates, p50s, p99s = zip(*runs, strict=True)
    return statistics.median(rates), statistics.median(p50s), statistics.median(p99s)


def engine_rate_in_flight(
    directory: Path, in_flight: int, total: int
) -> tuple[float, float, float]:
    """Acknowledged adds/s with ``in_flight`` writes outstanding from one thread.

    The daemon's way of writing: its event loop submits each client's add
    with ``Engine.add_nowait`` (other writes with ``atomic_nowait``) and
    answers from the completion callback, so no thread blocks per write.
    Here one thread keeps ``in_flight`` adds submitted (a semaphore slot per
    write, released by its callback).
    """
    settings = EngineSettings(checkpoint_interval_s=3600, checkpoint_wal_bytes=1 << 40)
    latencies: list[float] = []
    with Engine.open(directory, settings=settings) as engine:
        engine.create_cube("bench", owner="uid:0")
        slots = threading.Semaphore(in_flight)
        finished = threading.Event()
        remaining = [total]

        def done(started: float, sub: Any) -> None:
            sub.outcome()  # raises if the write failed
            latencies.append(time.perf_counter() - started)
            slots.release()
            remaining[0] -= 1  # callbacks run in the one committing thread
            if remaining[0] == 0:
                finished.set()

        start = time.perf_counter()
        for _ in range(total):
            slots.acquire()
            engine.add_nowait("bench", TEXT, {}, functools.partial(done, time.perf_counter()))
        finished.wait()
        elapsed = time.perf_counter() - start
    return (total / elapsed, *_p50_p99_ms(latencies))


class _NoSyncIO(OsFileIO):
    """The real files with ``fdatasync`` stubbed out: what is left is the CPU path.

    The write-out hint goes too: it starts the device I/O that the fdatasync
    would otherwise start, so it belongs with it.
    """

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        pass

    def fdatasync(self, fd: int) -> None:
        pass


def cpu_per_write(directory: Path, writers: int, total: int) -> tuple[float, float]:
    """(process CPU us per acknowledged add, adds/s) with fdatasync stubbed out.

    Not a durable rate: it measures the Python work per write (planning,
    codecs, LMDB, WAL framing, group commit hand-over), which is what bounds
    the durable rates above once fdatasync is fast.  Checkpoints are off so
    every run measures the same thing; the best of ``REPEATS`` is reported
    (CPU time is inflated by other load, never deflated).
    """
    settings = EngineSettings(
        checkpoint_interval_s=3600, checkpoint_wal_bytes=1 << 40, checkpoint_txns=1 << 40
    )
    best = (float("inf"), 0.0)
    with Engine.open(directory, settings=settings, wal_io=_NoSyncIO()) as engine:
        engine.create_cube("bench", owner="uid:0")
        per_writer = max(1, total // writers)

        def work() -> None:
            for _ in range(per_writer):
                engine.add("bench", TEXT)

        work()  # warm-up
        for _ in range(REPEATS):
            threads = [threading.Thread(target=work) for _ in range(writers)]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            n = per_writer * writers
            cpu_us = (time.process_time() - cpu0) / n * 1e6
            best = min(best, (cpu_us, n / (time.perf_counter() - wall0)))
            engine.checkpoint()
    return best


def recovery_time(directory: Path) -> tuple[float, int]:
    """Populate in a child process, SIGKILL it, time the recovery here."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--populate", str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().split()
    assert line, "populate child printed nothing"
    assert line[0] == "populated", line
    wal_records = int(line[1])
    child.send_signal(signal.SIGKILL)
    child.wait()
    settings = EngineSettings(checkpoint_interval_s=3600, checkpoint_wal_bytes=1 << 40)
    # kill -9 leaves LMDB's page cache intact, so nothing would be replayed.
    # Reopen as after a power loss (another boot id): LMDB rolls back to the
    # checkpoint and every record after it is replayed from the WAL.
    start = time.perf_counter()
    with Engine.open(directory, settings=settings, boot_id="after-power-loss") as engine:
        elapsed = time.perf_counter() - start
        replayed = int(engine.recovery["replayed_records"])
    assert replayed == wal_records, (replayed, wal_records)
    return elapsed, replayed


def populate(directory: Path) -> None:
    # No automatic checkpoint: exactly RECOVERY_WAL records stay WAL-only.
    settings = EngineSettings(
        checkpoint_interval_s=3600, checkpoint_wal_bytes=1 << 40, checkpoint_txns=1 << 62
    )
    engine = Engine.open(directory, settings=settings)
    engine.create_cube("bench", owner="uid:0")
    _bulk_add(engine, RECOVERY_RECORDS - RECOVERY_WAL)
    engine.checkpoint()
    _bulk_add(engine, RECOVERY_WAL)
    status = engine.status()
    print("populated", status["last_lsn"] - status["checkpoint_lsn"], flush=True)
    threading.Event().wait()  # until SIGKILL: no clean shutdown


def _bulk_add(engine: Engine, n: int) -> None:
    def work(count: int) -> None:
        for _ in range(count):
            engine.add("bench", TEXT[:200])

    threads = [threading.Thread(target=work, args=(n // 64 + (i < n % 64),)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--populate":
        populate(Path(sys.argv[2]))
        return 0
    given = os.environ.get("BENCH_DIR")
    if given:
        return run(Path(given))
    # A full run leaves ~3 GB of stores behind: a temporary directory goes.
    base = Path(tempfile.mkdtemp(prefix="memosd-bench-", dir="/var/tmp"))
    try:
        return run(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base: Path) -> int:
    rows: list[tuple[str, str]] = []
    # One writer against the floor: the disk's speed drifts within minutes,
    # so each engine run sits between its own floor measurements and the
    # ratio is taken per pair (median over the pairs).
    raws, zeroes, ones, ratios, zero_ratios = [], [], [], [], []
    for r in range(max(REPEATS, 5)):
        raw_r = raw_fdatasync_rate(base, 2000)
        zero_r = raw_fdatasync_rate(base, 2000, prefilled=True)
        one = engine_rate(base / f"w1-{r}", 1, min(WRITES, 5000))
        raws.append(raw_r)
        zeroes.append(zero_r)
        ones.append(one)
        ratios.append(raw_r / one[0])
        zero_ratios.append(zero_r / one[0])
    raw, zeroed = statistics.median(raws), statistics.median(zeroes)
    rows.append(("raw write+fdatasync 1 KB (floor)", f"{raw:,.0f} /s"))
    rows.append(("  same, overwriting a zero-filled file", f"{zeroed:,.0f} /s"))
    rate, p50, p99 = _medians(ones)
    ratio = (
        f" ({statistics.median(ratios):.2f}x of floor, "
        f"{statistics.median(zero_ratios):.2f}x zero-filled; per-pair medians)"
    )
    rows.append(("acked adds, 1 writers", f"{rate:,.0f} /s{ratio}"))
    rows.append(("  ack latency p50 / p99, 1 writers", f"{p50:.2f} / {p99:.2f} ms"))
    rows.append(("  floor / 1 writer, each pair", " ".join(f"{x:.2f}" for x in ratios)))
    for writers in (16, 64):
        runs = []
        for r in range(REPEATS):
            runs.append(engine_rate(base / f"w{writers}-{r}", writers, WRITES))
        rate, p50, p99 = _medians(runs)
        rows.append((f"acked adds, {writers} writers", f"{rate:,.0f} /s"))
        rows.append((f"  ack latency p50 / p99, {writers} writers", f"{p50:.2f} / {p99:.2f} ms"))
    runs = [engine_rate_in_flight(base / f"if64-{r}", 64, WRITES) for r in range(REPEATS)]
    rate, p50, p99 = _medians(runs)
    rows.append(("acked adds, 64 in flight from one thread (callbacks)", f"{rate:,.0f} /s"))
    rows.append(("  ack latency p50 / p99, 64 in flight", f"{p50:.2f} / {p99:.2f} ms"))
    for writers in (1, 64):
        cpu_us, rate = cpu_per_write(base / f"cpu{writers}", writers, min(WRITES, 12800))
        label = f"CPU per add, {writers} writers, fdatasync stubbed"
        rows.append((label, f"{cpu_us:.1f} us ({rate:,.0f} /s)"))
    elapsed, replayed = recovery_time(base / "recovery")
    rows.append(
        (
            f"recovery: {RECOVERY_RECORDS:,} records, {replayed:,} in WAL only",
            f"{elapsed:.2f} s",
        )
    )
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print("-" * (width + 30))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
