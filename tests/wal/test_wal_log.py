"""WriteAheadLog on the real filesystem: recovery, rotation, checkpoints, failures."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memosd.errors import (
    CorruptionError,
    DiskFullError,
    MemosError,
    TooLarge,
    WalCorruptionError,
    WalFailedError,
)
from memosd.wal import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    CountingFileIO,
    FaultyFileIO,
    OsFileIO,
    WalRecord,
    WriteAheadLog,
    encode_segment_header,
    scan_segment,
    segment_name,
    verify_directory,
)


def payload_for(lsn: int) -> bytes:
    return f"record-{lsn}-".encode() * (1 + lsn % 5)


def fill(wal: WriteAheadLog, count: int) -> list[int]:
    return [
        wal.append(lsn % 7, payload_for(lsn))
        for lsn in range(wal.last_lsn + 1, wal.last_lsn + 1 + count)
    ]


def append_until_failure(wal: WriteAheadLog, acknowledged: list[int]) -> None:
    """Append until an append raises, collecting the acknowledged LSNs."""
    for _ in range(50):
        acknowledged.append(wal.append(1, payload_for(wal.last_lsn + 1)))


def lsns(wal: WriteAheadLog, after: int = 0) -> list[int]:
    return [record.lsn for record in wal.replay(after)]


def first_segment(directory: Path) -> Path:
    return directory / segment_name(1)


def records_only(segment: Path) -> bytes:
    """The segment's bytes without the zero fill the log keeps ahead of its records."""
    data = segment.read_bytes()
    return data[: scan_segment(data, expected_first_lsn=None, is_last_segment=True).valid_end]


def test_empty_directory_makes_a_fresh_log_at_lsn_1(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    with WriteAheadLog.open(directory) as wal:
        assert wal.recovery.segments_scanned == 0
        assert wal.recovery.first_lsn == 1
        assert wal.last_lsn == wal.durable_lsn == 0
        assert wal.segment_paths() == [str(first_segment(directory))]
        assert first_segment(directory).read_bytes() == encode_segment_header(1)
        assert wal.append(3, b"first") == 1
        assert wal.durable_lsn == 1


def test_records_survive_reopen_and_replay_in_order(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        assert fill(wal, 10) == list(range(1, 11))
        assert wal.append_batch([(9, b"x"), (8, b"y")]) == [11, 12]
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.recovery.records == 12
        assert wal.recovery.last_lsn == 12
        assert wal.recovery.bytes_cut == 0
        records = list(wal.replay(0))
        assert records[:10] == [WalRecord(n, n % 7, payload_for(n)) for n in range(1, 11)]
        assert records[10:] == [WalRecord(11, 9, b"x"), WalRecord(12, 8, b"y")]
        assert lsns(wal, 7) == [8, 9, 10, 11, 12]
        assert wal.append(1, b"next") == 13


def test_torn_tail_at_every_byte_of_the_last_record_is_cut_and_kept(tmp_path: Path) -> None:
    source = tmp_path / "source"
    with WriteAheadLog.open(source) as wal:
        fill(wal, 3)
    full = records_only(first_segment(source))
    last_len = RECORD_HEADER_SIZE + len(payload_for(3))
    last_start = len(full) - last_len
    for cut_at in range(last_start + 1, len(full)):
        directory = tmp_path / f"cut{cut_at}"
        directory.mkdir()
        first_segment(directory).write_bytes(full[:cut_at])
        with capture_logs() as logs, WriteAheadLog.open(directory) as wal:
            report = wal.recovery
            assert lsns(wal) == [1, 2]
            assert report.bytes_cut == cut_at - last_start
            assert report.cut_path == str(
                directory / "cut" / f"{segment_name(1)}.{last_start}.torn"
            )
            assert Path(report.cut_path).read_bytes() == full[last_start:cut_at]
            assert first_segment(directory).stat().st_size == last_start
            assert wal.append(5, b"after repair") == 3
        assert any(e["event"] == "wal.torn_tail_cut" for e in logs)
        assert all("record-" not in repr(e) for e in logs)  # payloads are never logged
        with WriteAheadLog.open(directory) as wal:
            assert lsns(wal) == [1, 2, 3]
            assert wal.recovery.bytes_cut == 0


def test_appends_overwrite_a_zero_fill_written_ahead_of_them(tmp_path: Path) -> None:
    segment = first_segment(tmp_path)
    with WriteAheadLog.open(tmp_path) as wal:
        fill(wal, 4)
        records_end = len(records_only(segment))
        # The first batch extended the file with zeros, so later fdatasyncs
        # change no file size; the next batches go over those zeros.
        size = segment.stat().st_size
        assert size > records_end
        assert not segment.read_bytes()[records_end:].strip(b"\0")
        fill(wal, 3)
        assert segment.stat().st_size == size
    assert verify_directory(tmp_path).segments[0].zero_fill_bytes == size - len(
        records_only(segment)
    )
    with segment.open("ab") as f:
        f.write(bytes(4096))  # more zeros are still fill, not damage
    with WriteAheadLog.open(tmp_path) as wal:
        assert lsns(wal) == list(range(1, 8))
        assert (wal.recovery.bytes_cut, wal.recovery.cut_path) == (0, None)
        assert wal.append(1, b"after") == 8
    with WriteAheadLog.open(tmp_path) as wal:
        assert lsns(wal) == list(range(1, 9))


def test_rotation_cuts_the_zero_fill_off_the_old_segment(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=4096) as wal:
        while len(wal.segment_paths()) < 3:
            fill(wal, 5)
        paths = [Path(p) for p in wal.segment_paths()]
        for old in paths[:-1]:
            assert old.read_bytes() == records_only(old)
        assert paths[-1].stat().st_size <= 4096
    assert verify_directory(tmp_path).ok


def test_verify_reports_a_torn_tail_without_repairing_it(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as wal:
        fill(wal, 30)
        clean = wal.verify()
        assert clean.ok
        assert clean.records == 30
        assert (clean.first_lsn, clean.last_lsn) == (1, 30)
        assert [s.path for s in clean.segments] == wal.segment_paths()
        last_path = Path(wal.segment_paths()[-1])
    last_path.write_bytes(records_only(last_path) + b"\x07" * 11)
    report = verify_directory(tmp_path)
    assert report.ok
    assert report.torn_tail_bytes == 11
    assert last_path.read_bytes().endswith(b"\x07" * 11)  # read-only


def test_flipped_byte_mid_log_refuses_to_open(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        fill(wal, 5)
    data = bytearray(first_segment(tmp_path).read_bytes())
    data[SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 2] ^= 0x01  # payload of LSN 1
    first_segment(tmp_path).write_bytes(bytes(data))
    with pytest.raises(WalCorruptionError) as info:
        WriteAheadLog.open(tmp_path)
    assert info.value.details["segment"] == segment_name(1)
    assert info.value.details["lsn"] == 1
    assert not (tmp_path / "cut").exists()  # nothing was "repaired"
    assert not verify_directory(tmp_path).ok


def test_damage_in_a_non_last_segment_is_corruption(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as wal:
        fill(wal, 30)
        paths = wal.segment_paths()
    assert len(paths) >= 3
    damaged = Path(paths[0])
    damaged.write_bytes(damaged.read_bytes()[:-3])
    with pytest.raises(WalCorruptionError, match="not the last"):
        WriteAheadLog.open(tmp_path, segment_bytes=200)
    report = verify_directory(tmp_path)  # the read-only checker agrees
    assert not report.ok
    assert any("not the last" in problem for problem in report.problems)


def test_missing_middle_segment_is_corruption(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as wal:
        fill(wal, 30)
        paths = wal.segment_paths()
    os.remove(paths[1])
    with pytest.raises(WalCorruptionError, match=r"starts at LSN \d+ but the previous"):
        WriteAheadLog.open(tmp_path, segment_bytes=200)


def test_rotation_and_replay_across_segments(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        fill(wal, 40)
        batch = wal.append_batch([(1, bytes(100))] * 5)
        paths = wal.segment_paths()
        assert len(paths) > 3
        assert lsns(wal) == list(range(1, 46))
        assert lsns(wal, 17) == list(range(18, 46))
        verify = wal.verify()
        assert verify.ok
        assert verify.records == 45
    # Each segment starts where the previous one stopped; the batch is whole.
    firsts = [int(Path(p).stem) for p in paths]
    assert firsts == sorted(firsts)
    assert any(first <= batch[0] for first in firsts)
    assert not any(batch[0] < first <= batch[-1] for first in firsts)
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        assert wal.recovery.segments_scanned == len(paths)
        assert lsns(wal) == list(range(1, 46))
        assert [r.payload for r in wal.replay(44)] == [bytes(100)]


def test_records_kept_from_recovery_replay_like_the_disk(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        fill(wal, 40)
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        from_disk = list(wal.replay(12))
    io = CountingFileIO(OsFileIO())
    with WriteAheadLog.open(tmp_path, io=io, segment_bytes=256, keep_after_lsn=12) as wal:
        reads = io.calls["read_file"]
        assert list(wal.replay(12)) == from_disk  # no segment read twice
        assert io.calls["read_file"] == reads
        assert [r.lsn for r in from_disk] == list(range(13, 41))
        assert wal.append(1, b"after open") == 41
        # The kept records serve one replay; later ones read the segments.
        assert lsns(wal, 12) == list(range(13, 42))
        assert io.calls["read_file"] > reads
    with WriteAheadLog.open(tmp_path, segment_bytes=256, keep_after_lsn=30) as wal:
        assert lsns(wal, 5) == list(range(6, 42))  # another start: from disk
    with WriteAheadLog.open(tmp_path, segment_bytes=256, keep_after_lsn=41) as wal:
        assert lsns(wal, 41) == []
        assert wal.append(1, b"x") == 42
        assert lsns(wal, 41) == [42]


def test_checkpoint_deletes_applied_segments_only(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        fill(wal, 40)
        before = wal.segment_paths()
        second_first = int(Path(before[1]).stem)
        assert wal.checkpoint(second_first - 2) == 0  # segment 1 not fully applied
        assert wal.checkpoint(second_first - 1) == 1
        assert wal.segment_paths() == before[1:]
        assert not Path(before[0]).exists()
        assert lsns(wal, second_first - 1) == list(range(second_first, 41))
        with pytest.raises(CorruptionError, match="checkpointed"):
            list(wal.replay(0))
        removed = wal.checkpoint(10**9)
        assert removed == len(before) - 2
        assert wal.segment_paths() == before[-1:]  # never the active segment
        fill(wal, 2)
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        assert wal.recovery.first_lsn == int(Path(before[-1]).stem)
        assert wal.recovery.last_lsn == 42
        assert lsns(wal, 40) == [41, 42]


def test_checkpoint_rotates_a_full_applied_active_segment(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        fill(wal, 12)
        last_lsn = wal.last_lsn
        assert wal.checkpoint(last_lsn) >= 1
        # The old active segment was full: a new one was started, then the
        # old one deleted on the same call; the log keeps counting.
        assert wal.segment_paths() == [str(tmp_path / segment_name(last_lsn + 1))]
        assert wal.append(1, b"z") == last_lsn + 1
        assert lsns(wal, last_lsn) == [last_lsn + 1]


def test_append_batch_is_one_write_and_one_fdatasync(tmp_path: Path) -> None:
    io = CountingFileIO(OsFileIO())
    with WriteAheadLog.open(tmp_path, io=io) as wal:
        io.calls.clear()
        assert wal.append_batch([(1, b"a" * 10)] * 100) == list(range(1, 101))
        assert io.calls["write"] == 1
        assert io.calls["fdatasync"] == 1
        assert wal.append_batch([]) == []


class OrderIO(CountingFileIO):
    """Records the order of writes, write-out hints and fdatasyncs."""

    def __init__(self) -> None:
        super().__init__(OsFileIO())
        self.order: list[str] = []

    def _before(self, op: str) -> None:
        super()._before(op)
        if op in ("write", "start_writeback", "fdatasync"):
            self.order.append(op)


def test_while_syncing_runs_between_the_write_and_the_fdatasync(tmp_path: Path) -> None:
    io = OrderIO()
    with WriteAheadLog.open(tmp_path, io=io) as wal:
        wal.append(1, b"before")
        io.order.clear()
        seen: list[tuple[int, int]] = []

        def during(first_lsn: int) -> None:
            io.order.append("callback")
            seen.append((first_lsn, wal.durable_lsn))

        assert wal.append_batch([(1, b"a"), (1, b"b")], while_syncing=during) == [2, 3]
        assert io.order == ["write", "start_writeback", "callback", "fdatasync"]
        assert seen == [(2, 1)]  # the batch's first LSN; nothing of it durable yet
        assert wal.durable_lsn == 3
        io.order.clear()
        wal.append_batch([(1, b"c")])  # no callback: no hint either
        assert io.order == ["write", "fdatasync"]


def test_a_failing_while_syncing_still_syncs_the_batch(tmp_path: Path) -> None:
    io = OrderIO()
    with WriteAheadLog.open(tmp_path, io=io) as wal:
        io.order.clear()

        def during(first_lsn: int) -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError):
            wal.append_batch([(1, b"kept")], while_syncing=during)
        assert io.order[-1] == "fdatasync"
        assert wal.durable_lsn == 1
        assert wal.append(1, b"next") == 2  # the log is not poisoned
    with WriteAheadLog.open(tmp_path) as reopened:
        assert [r.payload for r in reopened.replay(0)] == [b"kept", b"next"]


def test_while_syncing_of_a_queued_batch_runs_before_it_is_durable(tmp_path: Path) -> None:
    class HeldSyncIO(CountingFileIO):
        def __init__(self) -> None:
            super().__init__(OsFileIO())
            self.in_sync = threading.Event()
            self.release = threading.Event()
            self.armed = False

        def fdatasync(self, fd: int) -> None:
            if self.armed:
                self.armed = False
                self.in_sync.set()
                assert self.release.wait(timeout=10)
            super().fdatasync(fd)

    io = HeldSyncIO()
    with WriteAheadLog.open(tmp_path, io=io) as wal:
        io.armed = True
        leader = threading.Thread(target=wal.append, args=(1, b"first"))
        leader.start()
        assert io.in_sync.wait(timeout=10)
        seen: list[tuple[int, int]] = []

        def during(first_lsn: int) -> None:
            seen.append((first_lsn, wal.durable_lsn))
            io.release.set()

        assert wal.append_batch([(1, b"second")], while_syncing=during) == [2]
        leader.join()
        assert seen == [(2, 0)]
        assert wal.durable_lsn == 2


def test_the_os_writeback_hint_is_harmless_and_drops_itself_where_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OsFileIO, "_sync_file_range", None)
    monkeypatch.setattr(OsFileIO, "_sync_file_range_loaded", False)
    io = OsFileIO()
    fd = io.open_write(str(tmp_path / "f"))
    try:
        assert io.write(fd, b"x" * 4096, 0) == 4096
        io.start_writeback(fd, 0, 4096)
        io.fdatasync(fd)
    finally:
        io.close(fd)
    read_end, write_end = os.pipe()
    try:
        io.start_writeback(write_end, 0, 1)  # ESPIPE (or no such call): no error
    finally:
        os.close(read_end)
        os.close(write_end)
    if OsFileIO._sync_file_range_loaded and os.uname().sysname == "Linux":
        assert OsFileIO._sync_file_range is None  # dropped after "unsupported"


def test_oversized_payload_and_bad_type_are_refused_without_using_an_lsn(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path) as wal:
        with pytest.raises(TooLarge):
            wal.append(1, bytes(64 * 2**20 + 1))
        with pytest.raises(MemosError):
            wal.append(256, b"")
        assert wal.append(1, b"ok") == 1


@pytest.mark.parametrize("fail_op", ["write", "fdatasync"])
@pytest.mark.parametrize(
    ("err", "expected"), [(errno.EIO, WalFailedError), (errno.ENOSPC, DiskFullError)]
)
@pytest.mark.parametrize("fail_at", [1, 3])
def test_io_failure_poisons_the_log_and_only_acked_records_survive(
    tmp_path: Path, fail_op: str, err: int, expected: type[MemosError], fail_at: int
) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as wal:
        fill(wal, 2)
    io = FaultyFileIO(OsFileIO(), fail_op=fail_op, fail_at_call=fail_at, errno=err)
    wal = WriteAheadLog.open(tmp_path, io=io, segment_bytes=200)
    acknowledged = [1, 2]
    with pytest.raises(expected) as info:
        append_until_failure(wal, acknowledged)
    assert io.failed
    assert info.value.details["errno"] == err
    assert type(info.value) is expected
    # Every later append fails the same way; nothing is retried.
    syncs = io.calls["fdatasync"]
    with pytest.raises(expected):
        wal.append(1, b"later")
    with pytest.raises(expected):
        wal.append_batch([(1, b"later")])
    assert io.calls["fdatasync"] == syncs
    assert wal.durable_lsn == acknowledged[-1]
    wal.close()
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as reopened:
        assert [r.lsn for r in reopened.replay(0)] == acknowledged
        assert [r.payload for r in reopened.replay(2)] == [payload_for(n) for n in acknowledged[2:]]


def test_failure_during_rotation_poisons_and_recovers(tmp_path: Path) -> None:
    io = FaultyFileIO(OsFileIO(), fail_op="fsync_dir", fail_at_call=3, errno=errno.EIO)
    # Creation fsyncs the log directory's parent, then the log directory;
    # #3 is the first rotation.
    wal = WriteAheadLog.open(tmp_path, io=io, segment_bytes=120)
    acknowledged: list[int] = []
    with pytest.raises(WalFailedError):
        append_until_failure(wal, acknowledged)
    wal.close()
    with WriteAheadLog.open(tmp_path, segment_bytes=120) as reopened:
        assert [r.lsn for r in reopened.replay(0)] == acknowledged
        assert reopened.append(1, b"x") == len(acknowledged) + 1


def test_io_failure_during_open_is_a_wal_error(tmp_path: Path) -> None:
    io = FaultyFileIO(OsFileIO(), fail_op="fdatasync", fail_at_call=1, errno=errno.ENOSPC)
    with pytest.raises(DiskFullError) as info:
        WriteAheadLog.open(tmp_path, io=io)
    assert info.value.details["op"] == "open"
    with WriteAheadLog.open(tmp_path) as wal:  # the torn first segment is repaired
        assert wal.append(1, b"x") == 1


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    wal = WriteAheadLog.open(tmp_path)
    wal.close()
    wal.close()
    with pytest.raises(WalFailedError, match="closed"):
        wal.append(1, b"x")


def test_close_lets_queued_appends_finish(tmp_path: Path) -> None:
    wal = WriteAheadLog.open(tmp_path)
    outcomes: list[int | str] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(200):
            try:
                lsn = wal.append(1, b"r")
            except WalFailedError as exc:
                with lock:
                    outcomes.append(exc.reason)
                return
            with lock:
                outcomes.append(lsn)

    workers = [threading.Thread(target=writer) for _ in range(8)]
    for worker in workers:
        worker.start()
    wal.close()
    for worker in workers:
        worker.join()
    acknowledged = sorted(o for o in outcomes if isinstance(o, int))
    assert set(outcomes) - set(acknowledged) <= {"wal_closed"}
    with WriteAheadLog.open(tmp_path) as reopened:
        assert [r.lsn for r in reopened.replay(0)] == acknowledged
        assert acknowledged == list(range(1, len(acknowledged) + 1))


class GatedSyncIO(CountingFileIO):
    """Holds each fdatasync until every live writer thread is waiting in append.

    That makes batching deterministic without sleeping: a real disk's fsync
    latency does the same job in production.
    """

    def __init__(self, writers: int) -> None:
        super().__init__(OsFileIO())
        self.cond = threading.Condition()
        self.live = writers
        self.waiting = 0
        self.armed = False  # opening the log syncs before any writer exists

    def fdatasync(self, fd: int) -> None:
        with self.cond:
            if self.armed:
                # The timeout only bounds a broken run; it never fires in a good one.
                assert self.cond.wait_for(lambda: self.waiting >= self.live, timeout=10)
        super().fdatasync(fd)

    def enter(self) -> None:
        with self.cond:
            self.waiting += 1
            self.cond.notify_all()

    def leave(self, *, finished: bool) -> None:
        with self.cond:
            self.waiting -= 1
            self.live -= finished
            self.cond.notify_all()


def test_group_commit_shares_fdatasync_across_16_threads(tmp_path: Path) -> None:
    threads_n, per_thread = 16, 40
    io = GatedSyncIO(threads_n)
    wal = WriteAheadLog.open(tmp_path, io=io)
    io.calls.clear()
    io.armed = True
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        got = []
        try:
            for i in range(per_thread):
                io.enter()
                try:
                    got.append(wal.append(index, f"{index}:{i}".encode()))
                finally:
                    io.leave(finished=i == per_thread - 1)
        except BaseException as exc:
            errors.append(exc)
        results[index] = got

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads_n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    total = threads_n * per_thread
    all_lsns = sorted(lsn for got in results.values() for lsn in got)
    assert all_lsns == list(range(1, total + 1))
    assert io.calls["fdatasync"] <= total // 4, io.calls
    for got in results.values():
        assert got == sorted(got)  # each thread's own records keep its order
    records = {r.lsn: r for r in wal.replay(0)}
    for index, got in results.items():
        assert [records[lsn].payload for lsn in got] == [
            f"{index}:{i}".encode() for i in range(per_thread)
        ]
    wal.close()
