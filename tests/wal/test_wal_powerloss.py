"""Power-loss test: crash a recorded WAL run after every operation and recover.

A run of concurrent appends, batches, rotations and checkpoints is driven on a
:class:`SimulatedDisk` that records every operation.  The run is then replayed
step by step; at each step several random power-loss images are drawn
(unsynced writes dropped, kept, torn or zeroed; unsynced directory entries
kept or lost) and the WAL is reopened on each.  The checker asserts the WAL's
promise: every record acknowledged before the crash is there with its exact
payload, the recovered LSNs are one contiguous run, and nothing else is.

The checker is itself tested: a WAL with a planted bug (acknowledging before
fdatasync) must be caught.

Size: ``MEMOSD_POWERLOSS_STATES`` crash states (default 5000, a few seconds).
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from memosd.errors import MemosError, WalFailedError
from memosd.wal import FaultyFileIO, SimulatedDisk, WriteAheadLog

STATES = int(os.environ.get("MEMOSD_POWERLOSS_STATES", "5000"))
WAL_DIR = "/data/wal"
SEGMENT_BYTES = 400  # small, so runs rotate and checkpoint several segments
WRITERS = 4
ROUNDS = 18
# Every Nth crash state also crashes again during its own recovery.
DOUBLE_CRASH_EVERY = 10


class NullLogger:
    """Keeps thousands of recoveries quiet."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@dataclass
class RecordedRun:
    disk: SimulatedDisk
    # (disk step when append returned, lsn) for every acknowledged record.
    acks: list[tuple[int, int]] = field(default_factory=list)
    # What was written under each LSN (every record of the run is acknowledged).
    written: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    # (disk step when checkpoint started, applied_lsn)
    checkpoints: list[tuple[int, int]] = field(default_factory=list)


class AckBeforeSyncLog(WriteAheadLog):
    """The planted bug: acknowledges a batch before it is fdatasynced."""

    _ack_before_sync = True


def drive_run(wal_class: type[WriteAheadLog]) -> RecordedRun:
    disk = SimulatedDisk(record_history=True)
    run = RecordedRun(disk)
    wal = wal_class.open(WAL_DIR, io=disk, segment_bytes=SEGMENT_BYTES, logger=NullLogger())
    lock = threading.Lock()

    def acknowledge(lsns: list[int], records: list[tuple[int, bytes]]) -> None:
        step = disk.step
        with lock:
            for lsn, record in zip(lsns, records, strict=True):
                run.acks.append((step, lsn))
                run.written[lsn] = record

    def writer(index: int) -> None:
        for round_ in range(ROUNDS):
            payload = f"w{index}r{round_}:".encode() * (1 + (index + round_) % 4)
            if round_ % 3 == 2:
                batch = [(index, payload + bytes([k])) for k in range(3)]
                acknowledge(wal.append_batch(batch), batch)
            else:
                acknowledge([wal.append(index, payload)], [(index, payload)])
            if index == 0 and round_ % 4 == 3:
                # Pretend everything acknowledged so far, minus a little, is applied.
                applied = max(0, wal.durable_lsn - 6)
                with lock:
                    run.checkpoints.append((disk.step, applied))
                wal.checkpoint(applied)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wal.close()
    assert sorted(run.written) == list(range(1, len(run.written) + 1))
    return run


def check_recovery(
    image: SimulatedDisk,
    crash_step: int,
    run: RecordedRun,
    *,
    written: dict[int, tuple[int, bytes]] | None = None,
    must_have_lsn: int = 0,
) -> str | None:
    """Reopen the WAL on a crash image; describe the first broken promise, if any.

    ``written`` overrides the run's LSN -> record map and ``must_have_lsn``
    adds one acknowledged LSN (both for crashes during a later recovery).
    """
    written = run.written if written is None else written
    try:
        wal = WriteAheadLog.open(
            WAL_DIR, io=image, segment_bytes=SEGMENT_BYTES, logger=NullLogger()
        )
    except MemosError as exc:
        return f"recovery failed at step {crash_step}: {exc!r} {exc.details}"
    first = wal.recovery.first_lsn
    recovered = list(wal.replay(first - 1))
    last = first + len(recovered) - 1
    if [r.lsn for r in recovered] != list(range(first, last + 1)):
        return f"step {crash_step}: recovered LSNs are not contiguous"
    for record in recovered:
        if written.get(record.lsn) != (record.rtype, record.payload):
            return f"step {crash_step}: LSN {record.lsn} recovered with wrong content"
    applied = max((a for s, a in run.checkpoints if s < crash_step), default=0)
    if first - 1 > applied:
        return f"step {crash_step}: records before LSN {first} deleted but only {applied} applied"
    acknowledged = [lsn for ack_step, lsn in run.acks if ack_step <= crash_step]
    for lsn in [*acknowledged, must_have_lsn]:
        if lsn > last:
            return f"step {crash_step}: acknowledged LSN {lsn} lost (recovered up to {last})"
    wal.close()
    return None


def check_double_crash(
    image: SimulatedDisk, crash_step: int, run: RecordedRun, rng: random.Random
) -> str | None:
    """Crash again at every step of the recovery (and one append) on ``image``."""
    start = image.crash_image(rng, record_history=True)  # same content, recording
    try:
        wal = WriteAheadLog.open(
            WAL_DIR, io=start, segment_bytes=SEGMENT_BYTES, logger=NullLogger()
        )
    except MemosError as exc:
        return f"recovery failed at step {crash_step}: {exc!r} {exc.details}"
    extra = (1, b"after recovery")
    extra_lsn = wal.append(*extra)
    acked_at = start.step
    wal.close()
    # The extra record takes an LSN that the crash cut; it replaces that one.
    written = {lsn: r for lsn, r in run.written.items() if lsn < extra_lsn}
    written[extra_lsn] = extra
    for step, disk in start.all_crash_points():
        problem = check_recovery(
            disk.crash_image(rng),
            crash_step,
            run,
            written=written,
            must_have_lsn=extra_lsn if step >= acked_at else 0,
        )
        if problem is not None:
            return f"crash at step {step} of the recovery of: {problem}"
    return None


def find_broken_promises(run: RecordedRun, states: int, *, stop_at_first: bool) -> list[str]:
    points = list(range(run.disk.step + 1))
    per_step = max(1, -(-states // len(points)))
    rng = random.Random(1234)
    problems: list[str] = []
    checked = 0
    for step, disk in run.disk.all_crash_points():
        for _ in range(per_step):
            image = disk.crash_image(rng)
            checked += 1
            problem = check_recovery(image, step, run)
            if problem is None and checked % DOUBLE_CRASH_EVERY == 0:
                problem = check_double_crash(disk.crash_image(rng), step, run, rng)
            if problem is not None:
                problems.append(problem)
                if stop_at_first:
                    return problems
    assert checked >= states
    return problems


def test_power_loss_at_every_step_never_loses_an_acknowledged_record() -> None:
    run = drive_run(WriteAheadLog)
    assert len(run.checkpoints) >= 2
    assert run.disk.step > 100
    assert find_broken_promises(run, STATES, stop_at_first=False) == []


def test_the_checker_catches_acknowledging_before_fdatasync() -> None:
    run = drive_run(AckBeforeSyncLog)
    problems = find_broken_promises(run, STATES, stop_at_first=True)
    assert problems, "the planted ack-before-sync bug went unnoticed"
    assert "acknowledged LSN" in problems[0]


@pytest.mark.parametrize(("fail_op", "fail_at"), [("fdatasync", 4), ("write", 7), ("fdatasync", 9)])
def test_power_loss_after_a_failed_fsync_keeps_every_acknowledged_record(
    fail_op: str, fail_at: int
) -> None:
    disk = SimulatedDisk(record_history=True)
    run = RecordedRun(disk)
    io = FaultyFileIO(disk, fail_op=fail_op, fail_at_call=fail_at, errno=errno.EIO)
    wal = WriteAheadLog.open(WAL_DIR, io=io, segment_bytes=SEGMENT_BYTES, logger=NullLogger())
    for n in range(1, 40):
        record = (n % 5, f"single-{n}:".encode() * (1 + n % 3))
        # One writer: the record will get the next LSN, acknowledged or not.
        run.written[wal.last_lsn + 1] = record
        try:
            lsn = wal.append(*record)
        except WalFailedError:
            break
        run.acks.append((disk.step, lsn))
    else:
        pytest.fail("the injected failure never happened")
    wal.close()
    assert find_broken_promises(run, max(200, STATES // 10), stop_at_first=False) == []
