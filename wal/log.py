"""The write-ahead log: recovery, group commit, rotation, checkpoints.

Thread-safety: every public method may be called from any thread.
``append`` and ``append_batch`` are designed for many concurrent callers
(group commit).  Exactly one thread at a time owns the file I/O (the
"leader" of a group commit, or ``checkpoint``/``close``); everyone else
waits on one condition variable.  ``replay`` and ``verify`` only read files
and never block writers.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from memosd.errors import (
    BadRequest,
    CorruptionError,
    DiskFullError,
    MemosError,
    TooLarge,
    WalCorruptionError,
    WalFailedError,
)

from .fileio import FileIO, OsFileIO
from .framing import (
    MAX_PAYLOAD_BYTES,
    MAX_RECORD_TYPE,
    SEGMENT_HEADER_SIZE,
    ScanEnd,
    WalRecord,
    encode_record,
    encode_segment_header,
    parse_segment_name,
    scan_segment,
    segment_name,
)

__all__ = [
    "CUT_DIRECTORY",
    "DEFAULT_SEGMENT_BYTES",
    "RecoveryReport",
    "SegmentReport",
    "VerifyReport",
    "WriteAheadLog",
    "verify_directory",
]

DEFAULT_SEGMENT_BYTES = 64 * 2**20
# Zero fill written ahead of the records (see "Zero-filled tail" in the package
# docs): the active segment grows by its own size, between these bounds.
PREFILL_MIN_BYTES = 64 * 2**10
PREFILL_MAX_BYTES = 2**20
CUT_DIRECTORY = "cut"
# Out-of-space errors surface as DiskFullError so callers can shed load
# instead of treating the volume as broken.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What ``WriteAheadLog.open`` found and repaired."""

    segments_scanned: int
    first_lsn: int  # LSN the oldest retained segment starts at
    last_lsn: int  # last recovered record; first_lsn - 1 when there are none
    records: int
    bytes_cut: int
    cut_path: str | None


@dataclass(frozen=True, slots=True)
class SegmentReport:
    path: str
    first_lsn: int
    last_lsn: int
    records: int
    size: int
    torn_tail_bytes: int
    zero_fill_bytes: int = 0  # prepared for future records (last segment only)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """A read-only re-scan of every segment (``memctl wal verify``)."""

    segments: tuple[SegmentReport, ...]
    records: int
    first_lsn: int | None
    last_lsn: int | None
    torn_tail_bytes: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """No corruption (a torn tail is not a problem: open() repairs it)."""
        return not self.problems


@dataclass(frozen=True, slots=True)
class _Segment:
    first_lsn: int
    path: str


@dataclass(frozen=True, slots=True)
class _Failure:
    op: str
    errno: int | None
    strerror: str


def _list_segments(io: FileIO, directory: str) -> list[_Segment]:
    found = []
    for name in io.listdir(directory):
        first_lsn = parse_segment_name(name)
        if first_lsn is not None:
            found.append(_Segment(first_lsn, os.path.join(directory, name)))
    return sorted(found, key=lambda s: s.first_lsn)


def _segment_gap_error(previous_next_lsn: int, segment: _Segment) -> WalCorruptionError:
    name = os.path.basename(segment.path)
    return WalCorruptionError(
        f"WAL segment {name} starts at LSN {segment.first_lsn} but the previous "
        f"segment ends before LSN {previous_next_lsn}",
        segment=name,
        offset=0,
        lsn=previous_next_lsn,
        problem="segment sequence gap",
    )


def _write_all(io: FileIO, fd: int, data: bytes, offset: int) -> None:
    written = io.write(fd, data, offset)
    while written < len(data):
        more = io.write(fd, data[written:], offset + written)
        if more <= 0:
            raise OSError(errno.EIO, "write made no progress")
        written += more


def prefill_end(records_end: int, segment_bytes: int) -> int:
    """Where the zero fill written with a batch ending at ``records_end`` stops.

    The fill is as large as what the segment already holds (at least
    ``PREFILL_MIN_BYTES``, at most ``PREFILL_MAX_BYTES``), page aligned, and
    never reaches past ``segment_bytes`` (the rotation point), so a small log
    stays small and a full one extends about once per MiB.
    """
    grow = min(max(records_end, PREFILL_MIN_BYTES), PREFILL_MAX_BYTES)
    aligned = -(-(records_end + grow) // 4096) * 4096
    return max(records_end, min(aligned, segment_bytes))


def verify_directory(
    directory: str | os.PathLike[str], *, io: FileIO | None = None
) -> VerifyReport:
    """Re-scan every segment read-only and report, without repairing anything."""
    io = io if io is not None else OsFileIO()
    directory = os.fspath(directory)
    segments = _list_segments(io, directory)
    reports: list[SegmentReport] = []
    problems: list[str] = []
    records = torn = 0
    first_lsn: int | None = None
    last_lsn: int | None = None
    expected: int | None = None
    for index, segment in enumerate(segments):
        if expected is not None and segment.first_lsn != expected:
            problems.append(_segment_gap_error(expected, segment).message)
        data = io.read_file(segment.path)
        try:
            scan = scan_segment(
                data,
                expected_first_lsn=segment.first_lsn,
                is_last_segment=index == len(segments) - 1,
                segment=os.path.basename(segment.path),
            )
        except WalCorruptionError as exc:
            problems.append(exc.message)
            expected = None
            continue
        cut = len(data) - scan.valid_end if scan.end is ScanEnd.TORN_TAIL else 0
        zero_fill = len(data) - scan.valid_end if scan.end is ScanEnd.ZERO_FILL else 0
        torn += cut
        records += len(scan.records)
        first_lsn = scan.first_lsn if first_lsn is None else first_lsn
        last_lsn = scan.last_lsn
        expected = scan.next_lsn
        reports.append(
            SegmentReport(
                segment.path,
                scan.first_lsn,
                scan.last_lsn,
                len(scan.records),
                len(data),
                cut,
                zero_fill,
            )
        )
    return VerifyReport(tuple(reports), records, first_lsn, last_lsn, torn, tuple(problems))


class WriteAheadLog:
    """An append-only, checksummed, segmented log with group commit.

    Construct with :meth:`open`.  ``last_lsn`` is the highest LSN handed
    out (possibly not yet durable); ``durable_lsn`` the highest LSN that an
    fdatasync has made durable (every record up to it is acknowledged).
    """

    # Test-only: acknowledge a batch before its fdatasync (the sync is deferred
    # to the next batch).  This is the bug the power-loss test must catch; it
    # is never set outside tests.
    _ack_before_sync: ClassVar[bool] = False

    def __init__(self, directory: str, *, io: FileIO, segment_bytes: int, logger: Any) -> None:
        if segment_bytes <= SEGMENT_HEADER_SIZE:
            raise ValueError("segment_bytes must leave room for records")
        self._dir = directory
        self._io = io
        self._segment_bytes = segment_bytes
        self._log = logger
        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond:
        self._segments: list[_Segment] = []
        self._next_lsn = 1
        self._durable_lsn = 0
        self._queue: list[bytes] = []  # encoded records, LSN order, not yet written
        self._io_owned = False  # one thread at a time does file I/O
        self._failure: _Failure | None = None
        self._closed = False
        # Owned by whichever thread holds the I/O role:
        self._active_fd: int | None = None
        self._active_size = 0  # where the next record goes
        self._active_durable_size = 0
        self._active_file_size = 0  # records plus the zero fill after them
        self.recovery = RecoveryReport(0, 1, 0, 0, 0, None)
        # Records after ``keep_after_lsn`` found by the recovery scan, handed to
        # the first matching replay() so recovery reads and checks them once.
        self._kept: tuple[int, list[WalRecord]] | None = None

    # --- opening and recovery --------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        io: FileIO | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        logger: Any = None,
        keep_after_lsn: int | None = None,
    ) -> WriteAheadLog:
        """Open (creating if empty) the log in ``directory``, recovering it.

        Raises :class:`WalCorruptionError` for damage that is not a torn tail
        of the last segment; a torn tail is copied to ``cut/`` and cut off.
        With ``keep_after_lsn`` the records after that LSN, already read and
        checked by the recovery scan, are kept in memory for the first
        ``replay(keep_after_lsn)`` instead of being read from disk again.
        """
        wal = cls(
            os.fspath(directory),
            io=io if io is not None else OsFileIO(),
            segment_bytes=segment_bytes,
            logger=logger if logger is not None else structlog.get_logger("memosd.wal"),
        )
        try:
            wal._recover(keep_after_lsn)
        except OSError as exc:
            wal._close_active_quietly()
            wal._poison("open", exc)
            raise wal._failure_error() from exc
        except BaseException:
            wal._close_active_quietly()
            raise
        return wal

    def _recover(self, keep_after_lsn: int | None) -> None:
        io, directory = self._io, self._dir
        self._make_log_directory()
        segments = _list_segments(io, directory)
        if not segments:
            self._create_first_segment()
            self._log.info("wal.created", directory=directory)
            return

        records = 0
        expected: int | None = None
        scan = None
        data = b""
        kept: list[WalRecord] = []
        for index, segment in enumerate(segments):
            if expected is not None and segment.first_lsn != expected:
                raise _segment_gap_error(expected, segment)
            data = io.read_file(segment.path)
            scan = scan_segment(
                data,
                expected_first_lsn=segment.first_lsn,
                is_last_segment=index == len(segments) - 1,
                segment=os.path.basename(segment.path),
            )
            records += len(scan.records)
            expected = scan.next_lsn
            if keep_after_lsn is not None and scan.last_lsn > keep_after_lsn:
                kept.extend(r for r in scan.records if r.lsn > keep_after_lsn)
        assert scan is not None
        active = segments[-1]

        bytes_cut, cut_path = 0, None
        if scan.end is ScanEnd.TORN_TAIL:
            bytes_cut, cut_path = self._repair_torn_tail(active, data, scan.valid_end)
            if not scan.header_valid:
                self._log.warning("wal.torn_header_rewritten", segment=active.path)
        self._active_fd = io.open_write(active.path)
        self._active_size = self._active_durable_size = max(scan.valid_end, SEGMENT_HEADER_SIZE)
        self._active_file_size = len(data) if scan.end is ScanEnd.ZERO_FILL else scan.valid_end
        if not scan.header_valid:
            _write_all(io, self._active_fd, encode_segment_header(active.first_lsn), 0)
            io.fdatasync(self._active_fd)
            self._active_file_size = SEGMENT_HEADER_SIZE
        # The last segment may have been created but its directory entry never
        # synced; everything we recovered from must itself be durable.
        io.fsync_dir(directory)

        self._segments = segments
        self._next_lsn = scan.next_lsn
        self._durable_lsn = scan.last_lsn
        if keep_after_lsn is not None:
            self._kept = (keep_after_lsn, kept)
        self.recovery = RecoveryReport(
            len(segments), segments[0].first_lsn, scan.last_lsn, records, bytes_cut, cut_path
        )
        self._log.info(
            "wal.recovered",
            directory=directory,
            segments=len(segments),
            first_lsn=segments[0].first_lsn,
            last_lsn=scan.last_lsn,
            records=records,
            bytes_cut=bytes_cut,
        )

    def _make_log_directory(self) -> None:
        """Create the log directory if needed, with every new level durable."""
        io = self._io
        missing: list[str] = []
        cursor = os.path.abspath(self._dir)
        while True:
            try:
                io.listdir(cursor)
                break
            except FileNotFoundError:
                missing.append(cursor)
                parent = os.path.dirname(cursor)
                if parent == cursor:
                    break
                cursor = parent
        io.makedirs(self._dir)
        # A new directory's name lives in its parent: fsync each parent, top down.
        for created in reversed(missing):
            io.fsync_dir(os.path.dirname(created))

    def _create_first_segment(self) -> None:
        io = self._io
        segment = _Segment(1, os.path.join(self._dir, segment_name(1)))
        fd = io.create(segment.path)
        self._active_fd = fd
        _write_all(io, fd, encode_segment_header(segment.first_lsn), 0)
        io.fdatasync(fd)
        io.fsync_dir(self._dir)
        self._segments = [segment]
        self._active_size = self._active_durable_size = SEGMENT_HEADER_SIZE
        self._active_file_size = SEGMENT_HEADER_SIZE
        self.recovery = RecoveryReport(0, 1, 0, 0, 0, None)

    def _repair_torn_tail(
        self, active: _Segment, data: bytes, valid_end: int
    ) -> tuple[int, str | None]:
        """Copy the torn bytes aside (durably), then cut them off the segment."""
        io = self._io
        cut = data[valid_end:]
        cut_path = None
        if cut:
            # Keep the evidence first: if we crash after truncating, the copy
            # is already durable; if before, the next open repeats this.
            cut_dir = os.path.join(self._dir, CUT_DIRECTORY)
            io.makedirs(cut_dir)
            io.fsync_dir(self._dir)
            cut_path = os.path.join(cut_dir, f"{os.path.basename(active.path)}.{valid_end}.torn")
            fd = io.create(cut_path)
            try:
                _write_all(io, fd, cut, 0)
                io.fdatasync(fd)
            finally:
                io.close(fd)
            io.fsync_dir(cut_dir)
        io.truncate(active.path, valid_end)
        fd = io.open_write(active.path)
        try:
            io.fdatasync(fd)  # makes the new (smaller) size durable
        finally:
            io.close(fd)
        self._log.warning(
            "wal.torn_tail_cut",
            segment=os.path.basename(active.path),
            offset=valid_end,
            bytes_cut=len(cut),
            cut_path=cut_path,
        )
        return len(cut), cut_path

    # --- appending (group commit) ---------------------------------------------------

    def append(self, rtype: int, payload: bytes) -> int:
        """Append one record; return its LSN once it is durable."""
        _check_record(rtype, payload)
        with self._cond:
            self._raise_if_unusable()
            lsn = self._next_lsn
            self._next_lsn += 1
            self._queue.append(encode_record(lsn, rtype, payload))
        self._wait_durable(lsn)
        return lsn

    def append_batch(
        self,
        records: Sequence[tuple[int, bytes]],
        *,
        while_syncing: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Append ``(rtype, payload)`` records with consecutive LSNs, one fdatasync.

        Returns their LSNs once all are durable.  The batch is written in one
        write into one segment (never split), possibly together with records
        of concurrent callers.

        ``while_syncing(first_lsn)`` runs in this thread once the records are
        written and their write-out has started, before the fdatasync: work
        that needs the LSNs but not durability overlaps the device's write
        (the storage engine writes its change log there).  Nothing is
        durable, or acknowledged, while it runs.  If it raises, the batch is
        still synced and the error propagates once the records are durable.
        """
        for rtype, payload in records:
            _check_record(rtype, payload)
        if not records:
            return []
        with self._cond:
            self._raise_if_unusable()
            first = self._next_lsn
            self._next_lsn += len(records)
            data = b"".join(
                encode_record(first + i, rtype, payload)
                for i, (rtype, payload) in enumerate(records)
            )
            # Nobody writing and nothing queued (e.g. the storage engine, whose
            # batches are already group-committed): lead at once, no queue.
            lead = not self._io_owned and not self._queue
            if lead:
                self._io_owned = True
            else:
                self._queue.append(data)
        last = first + len(records) - 1
        callback_error: BaseException | None = None
        if lead:
            self._lead(data, first, last, while_syncing)
        elif while_syncing is not None:
            # Queued behind another leader: the records may not even be
            # written yet, which the callback must not rely on either way.
            try:
                while_syncing(first)
            except BaseException as exc:
                callback_error = exc
        self._wait_durable(last)
        if callback_error is not None:
            raise callback_error
        return list(range(first, last + 1))

    def _wait_durable(self, lsn: int) -> None:
        """Block until ``lsn`` is durable, leading a group commit when nobody is."""
        while True:
            with self._cond:
                while True:
                    if self._durable_lsn >= lsn:
                        return
                    if self._failure is not None:
                        raise self._failure_error()
                    if not self._io_owned and self._queue:
                        break
                    self._cond.wait()
                # Become the leader: take everything queued so far.
                batch = b"".join(self._queue)
                self._queue.clear()
                first_lsn = self._durable_lsn + 1
                last_lsn = self._next_lsn - 1
                self._io_owned = True
            self._lead(batch, first_lsn, last_lsn)

    def _lead(
        self,
        batch: bytes,
        first_lsn: int,
        last_lsn: int,
        while_syncing: Callable[[int], None] | None = None,
    ) -> None:
        callback_error: BaseException | None = None
        try:
            callback_error = self._write_batch(batch, first_lsn, last_lsn, while_syncing)
        except BaseException as exc:
            # Nothing in this batch is acknowledged; nobody ever writes again.
            self._discard_unsynced_tail()
            with self._cond:
                self._io_owned = False
                self._poison("append", exc)
                self._cond.notify_all()
            if not isinstance(exc, OSError):
                raise
            return
        with self._cond:
            self._io_owned = False
            self._durable_lsn = last_lsn
            self._cond.notify_all()
        if callback_error is not None:
            raise callback_error

    def _write_batch(
        self,
        batch: bytes,
        first_lsn: int,
        last_lsn: int,
        while_syncing: Callable[[int], None] | None,
    ) -> BaseException | None:
        """Write and sync one batch; returns what ``while_syncing`` raised, if anything."""
        assert self._active_fd is not None
        if self._active_size >= self._segment_bytes and self._active_has_records():
            self._rotate(first_lsn)
        offset = self._active_size
        end = offset + len(batch)
        if end > self._active_file_size:
            # Extend the file with zeros ahead of the records, in this same
            # write: the fdatasyncs of the next batches then change no file size.
            fill_end = prefill_end(end, self._segment_bytes)
            batch += bytes(fill_end - end)
        if self._ack_before_sync:
            # The planted bug: sync the previous batch only now, and
            # acknowledge this one without any fdatasync (below).
            self._io.fdatasync(self._active_fd)
        _write_all(self._io, self._active_fd, batch, offset)
        self._active_size = end
        self._active_file_size = max(self._active_file_size, offset + len(batch))
        callback_error: BaseException | None = None
        if while_syncing is not None:
            self._io.start_writeback(self._active_fd, offset, len(batch))
            try:
                while_syncing(first_lsn)
            except BaseException as exc:
                callback_error = exc
        if self._ack_before_sync:
            return callback_error
        self._io.fdatasync(self._active_fd)
        self._active_durable_size = end
        return callback_error

    def _active_has_records(self) -> bool:
        return self._active_size > SEGMENT_HEADER_SIZE

    def _rotate(self, first_lsn: int) -> None:
        """Start a new segment whose first record will be ``first_lsn``.

        The header is synced and the directory entry made durable before any
        record goes in, so a segment with a torn header never holds records.
        """
        io = self._io
        if self._active_file_size > self._active_size and self._segments:
            # Only the last segment may end in zero fill: cut it, durably,
            # before a later segment exists.
            assert self._active_fd is not None
            io.truncate(self._segments[-1].path, self._active_size)
            io.fdatasync(self._active_fd)
            self._active_file_size = self._active_size
        segment = _Segment(first_lsn, os.path.join(self._dir, segment_name(first_lsn)))
        fd = io.create(segment.path)
        try:
            _write_all(io, fd, encode_segment_header(first_lsn), 0)
            io.fdatasync(fd)
            io.fsync_dir(self._dir)
        except BaseException:
            io.close(fd)
            raise
        old_fd = self._active_fd
        self._active_fd = fd
        self._active_size = self._active_durable_size = SEGMENT_HEADER_SIZE
        self._active_file_size = SEGMENT_HEADER_SIZE
        with self._cond:
            self._segments.append(segment)
        if old_fd is not None:
            io.close(old_fd)
        self._log.info("wal.segment_rotated", segment=os.path.basename(segment.path))

    def _discard_unsynced_tail(self) -> None:
        """Best effort: cut bytes of the failed batch so a restart won't resurrect them.

        Callers were told these records failed.  Without a power cut the
        page cache would otherwise still hold them and recovery would replay
        them.  (After a power cut, they may or may not survive; they were
        never acknowledged, so either is allowed.)  No fsync is retried.
        """
        if self._active_size == self._active_durable_size:
            return
        try:
            self._io.truncate(self._segments[-1].path, self._active_durable_size)
        except OSError:
            self._log.warning("wal.discard_failed_batch_failed", segment=self._segments[-1].path)
        self._active_size = self._active_file_size = self._active_durable_size

    # --- failure discipline -----------------------------------------------------------

    def _poison(self, op: str, exc: BaseException) -> None:
        """Refuse all further writes (caller holds _cond).

        After a failed fdatasync the kernel may already have dropped the dirty
        pages and marked them clean, so retrying could "succeed" without the
        data ever reaching the disk: the only safe way on is a restart.
        """
        if self._failure is None:
            code = exc.errno if isinstance(exc, OSError) else None
            reason = (exc.strerror if isinstance(exc, OSError) else None) or repr(exc)
            self._failure = _Failure(op, code, reason)
            self._log.error("wal.failed", op=op, errno=code, error=reason)

    def _failure_error(self) -> MemosError:
        failure = self._failure
        assert failure is not None
        cls = DiskFullError if failure.errno in _DISK_FULL_ERRNOS else WalFailedError
        return cls(
            f"WAL {failure.op} failed ({failure.strerror}); the log refuses writes until restart",
            errno=failure.errno,
            op=failure.op,
        )

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise self._failure_error()
        if self._closed:
            raise WalFailedError("the WAL is closed", reason="wal_closed")

    def _acquire_io(self) -> None:
        with self._cond:
            while self._io_owned:
                self._cond.wait()
            self._raise_if_unusable()
            self._io_owned = True

    def _release_io(self) -> None:
        with self._cond:
            self._io_owned = False
            self._cond.notify_all()

    # --- checkpoints --------------------------------------------------------------------

    def checkpoint(self, applied_lsn: int) -> int:
        """Delete segments whose records are all <= ``applied_lsn``; return how many.

        The active segment is never deleted; if it is full and entirely
        applied, a new segment is started first so it can go.
        """
        self._acquire_io()
        removed = 0
        try:
            with self._cond:
                durable = self._durable_lsn
            active_applied = durable <= applied_lsn and self._active_has_records()
            if active_applied and self._active_size >= self._segment_bytes:
                self._rotate(durable + 1)
            while len(self._segments) > 1 and self._segments[1].first_lsn - 1 <= applied_lsn:
                # One removal per directory fsync: a crash can then only leave
                # a prefix of the old segments deleted, never a hole.
                self._io.remove(self._segments[0].path)
                self._io.fsync_dir(self._dir)
                with self._cond:
                    self._segments.pop(0)
                removed += 1
        except OSError as exc:
            with self._cond:
                self._poison("checkpoint", exc)
                raise self._failure_error() from exc
        finally:
            self._release_io()
        if removed:
            self._log.info("wal.checkpoint", applied_lsn=applied_lsn, segments_removed=removed)
        return removed

    # --- reading ------------------------------------------------------------------------

    def replay(self, after_lsn: int) -> Iterator[WalRecord]:
        """Yield every durable record with lsn > ``after_lsn``, in order."""
        with self._cond:
            segments = list(self._segments)
            durable = self._durable_lsn
            kept, self._kept = self._kept, None
        if after_lsn < durable and after_lsn + 1 < segments[0].first_lsn:
            raise CorruptionError(
                f"WAL records after LSN {after_lsn} were checkpointed away "
                f"(oldest retained LSN is {segments[0].first_lsn})",
                reason="wal_records_checkpointed",
                after_lsn=after_lsn,
                first_lsn=segments[0].first_lsn,
            )
        if kept is not None and kept[0] == after_lsn:
            # Everything recovered at open is durable; later appends follow.
            return self._replay_kept(kept[1], segments, after_lsn, durable)
        return self._replay(segments, after_lsn, durable)

    def _replay_kept(
        self, kept: list[WalRecord], segments: list[_Segment], after_lsn: int, durable: int
    ) -> Iterator[WalRecord]:
        yield from kept
        last = kept[-1].lsn if kept else after_lsn
        if last < durable:
            yield from self._replay(segments, last, durable)

    def _replay(
        self, segments: list[_Segment], after_lsn: int, durable: int
    ) -> Iterator[WalRecord]:
        for index, segment in enumerate(segments):
            is_last = index == len(segments) - 1
            segment_last = durable if is_last else segments[index + 1].first_lsn - 1
            if segment_last <= after_lsn:
                continue
            scan = scan_segment(
                self._io.read_file(segment.path),
                expected_first_lsn=segment.first_lsn,
                is_last_segment=is_last,
                segment=os.path.basename(segment.path),
            )
            for record in scan.records:
                if after_lsn < record.lsn <= durable:
                    yield record

    def verify(self) -> VerifyReport:
        """Re-scan every segment read-only (bytes being appended may show as a torn tail)."""
        return verify_directory(self._dir, io=self._io)

    # --- state ----------------------------------------------------------------------------

    @property
    def last_lsn(self) -> int:
        with self._cond:
            return self._next_lsn - 1

    @property
    def durable_lsn(self) -> int:
        with self._cond:
            return self._durable_lsn

    @property
    def directory(self) -> str:
        return self._dir

    def segment_paths(self) -> list[str]:
        with self._cond:
            return [segment.path for segment in self._segments]

    def close(self) -> None:
        """Let queued appends finish, refuse new ones, release the file.  Idempotent."""
        with self._cond:
            # Queued records already have LSNs and waiting callers: a waiter
            # will lead them to disk (unless the log is poisoned).
            while self._io_owned or (self._queue and self._failure is None):
                self._cond.wait()
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._close_active_quietly()

    def _close_active_quietly(self) -> None:
        fd, self._active_fd = self._active_fd, None
        if fd is not None:
            try:
                self._io.close(fd)
            except OSError:
                self._log.warning("wal.close_failed", directory=self._dir)

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_record(rtype: int, payload: bytes) -> None:
    if not 0 <= rtype <= MAX_RECORD_TYPE:
        raise BadRequest(f"WAL record type {rtype} is outside 0..{MAX_RECORD_TYPE}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise TooLarge(
            f"WAL payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}",
            size=len(payload),
            limit=MAX_PAYLOAD_BYTES,
        )
