"""LMDB environment adapter: map growth, reader exclusion, pinned checkpoints.

This is the only module that talks to ``lmdb`` directly.  It translates LMDB
and OS errors into the memosd error tree at its edge:

* ``MapFullError`` never reaches a caller: the writer aborts, grows the map
  (doubling) with every reader excluded, and retries its batch.
* ``ENOSPC`` becomes :class:`~memosd.errors.DiskFullError`.

The checkpoint pin and meta-page rollback that make ``sync=False`` safe on
power loss are explained in the ``memosd.store`` docstring.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import lmdb
import msgpack
import structlog

from memosd.errors import CorruptionError, DiskFullError, StorageError

__all__ = [
    "DB_NAMES",
    "CheckpointState",
    "LmdbEnv",
    "PendingCheckpoint",
    "current_boot_id",
    "read_checkpoint_state",
]

DB_NAMES: Final = (
    "meta",
    "cubes",
    "versions",
    "latest",
    "purges",
    "grants",
    "tokens",
    "tokenhash",
    "usage",
    "blobrefs",
    "changes",
    "jobs",
    "openjobs",
    "classes",
)

_META_MAGIC: Final = 0xBEEFC0DE
_PAGE_HEADER: Final = 16  # pgno u64, pad u16, flags u16, lower/upper u16 x2
_TXNID_OFFSET: Final = _PAGE_HEADER + 128  # mm_txnid in MDB_meta (64-bit build)
_CHECKPOINT_FORMAT: Final = 1

_log = structlog.get_logger("memosd.store")

# Zero fill ahead of LMDB (see LmdbEnv._fill_ahead): keep this many bytes of
# data.mdb written past LMDB's last page, writing at most one step per commit.
_FILL_AHEAD: Final = 8 << 20
_FILL_STEP: Final = 256 << 10
_ZEROS: Final = bytes(_FILL_STEP)


def current_boot_id() -> str:
    """The kernel's boot id: it changes on every reboot (and power loss)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class CheckpointState:
    """What the ``checkpoint`` file says about the last checkpoint."""

    applied_lsn: int
    txnid: int
    boot_id: str
    clean_shutdown: bool
    page_size: int
    meta_pages: bytes  # both LMDB meta pages, as synced at the checkpoint


@dataclass(frozen=True, slots=True)
class PendingCheckpoint:
    """A captured snapshot on its way to becoming the checkpoint (see begin_checkpoint)."""

    state: CheckpointState
    pin: lmdb.Transaction | None


def read_checkpoint_state(path: Path) -> CheckpointState | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = msgpack.unpackb(raw, raw=False, max_bin_len=1 << 20, max_str_len=4096)
        if doc.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {doc.get('format')!r}")
        return CheckpointState(
            applied_lsn=int(doc["applied_lsn"]),
            txnid=int(doc["txnid"]),
            boot_id=str(doc["boot_id"]),
            clean_shutdown=bool(doc["clean"]),
            page_size=int(doc["page_size"]),
            meta_pages=bytes(doc["meta_pages"]),
        )
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptionError(f"checkpoint file {path} is unreadable: {exc}") from exc


def _meta_txnid(page: bytes) -> int:
    magic = struct.unpack_from("<I", page, _PAGE_HEADER)[0]
    if magic != _META_MAGIC:
        raise CorruptionError("LMDB meta page has a bad magic number")
    return int(struct.unpack_from("<Q", page, _TXNID_OFFSET)[0])


def _write_zeros(fd: int, size: int, offset: int) -> int:
    """``size`` (at most ``_FILL_STEP``) zero bytes at ``offset``; bytes written."""
    return os.pwrite(fd, memoryview(_ZEROS)[:size], offset)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(exc)


class _ReadersWriterGate:
    """Many concurrent read transactions, or one map resize, never both.

    Readers call :meth:`enter_shared`/:meth:`exit_shared` (every ``get``
    does: plain methods, not a generator context manager, which costs more
    than the LMDB read transaction itself).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    def enter_shared(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1

    def exit_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            # Only a resize waits for the readers to leave (it set _resizing
            # under this lock before waiting); readers wait for its end.
            if self._readers == 0 and self._resizing:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._resizing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class _ReadTransaction:
    """``with env.read() as txn``: a read transaction inside the readers' gate."""

    __slots__ = ("_env", "_gate", "_txn")

    def __init__(self, env: lmdb.Environment, gate: _ReadersWriterGate) -> None:
        self._env = env
        self._gate = gate
        self._txn: lmdb.Transaction | None = None

    def __enter__(self) -> lmdb.Transaction:
        self._gate.enter_shared()
        try:
            self._txn = self._env.begin(buffers=False)
        except BaseException:
            self._gate.exit_shared()
            raise
        return self._txn

    def __exit__(self, *exc: object) -> None:
        try:
            if self._txn is not None:
                self._txn.abort()  # read-only: the same as a commit
        finally:
            self._gate.exit_shared()


class LmdbEnv:
    """The LMDB environment of one data directory.

    Write transactions are only ever opened by the engine's writer thread
    (LMDB binds a write transaction to its OS thread).  Read transactions may
    be opened from any thread through :meth:`read`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        initial_map_size: int,
        boot_id: str | None = None,
        log: object | None = None,
    ) -> None:
        self.directory = directory
        self.checkpoint_path = directory / "checkpoint"
        self.boot_id = boot_id if boot_id is not None else current_boot_id()
        self.rolled_back_to_checkpoint = False
        directory.mkdir(parents=True, exist_ok=True)
        previous = read_checkpoint_state(self.checkpoint_path)
        if (
            previous is not None
            and previous.boot_id != self.boot_id
            and not previous.clean_shutdown
        ):
            # The machine rebooted without a clean shutdown: unsynced LMDB
            # pages may be missing.  Go back to the pinned, synced snapshot.
            self._restore_meta_pages(previous)
            self.rolled_back_to_checkpoint = True
        self._gate = _ReadersWriterGate()
        self.env = self._open(max(initial_map_size, 1 << 20))
        self.dbs = {name: self.env.open_db(name.encode()) for name in DB_NAMES}
        self.env.reader_check()  # clear slots left by killed processes
        self._pin: lmdb.Transaction | None = None
        # Held from begin_checkpoint to finish_checkpoint (possibly released
        # by another thread, hence a plain Lock).
        self._checkpoint_lock = threading.Lock()
        self._page_size = int(self.env.stat()["psize"])
        self.last_checkpoint = previous
        # Zero fill ahead: our own descriptor on data.mdb (None once the fill
        # has stopped) and how far the file is known to be written (LMDB's
        # pages or our zeros).
        self._fill_fd: int | None = os.open(self.directory / "data.mdb", os.O_WRONLY | os.O_CLOEXEC)
        self._filled_end = os.fstat(self._fill_fd).st_size

    def _open(self, map_size: int) -> lmdb.Environment:
        try:
            return lmdb.open(
                str(self.directory),
                map_size=map_size,
                max_dbs=len(DB_NAMES) + 2,
                sync=False,
                metasync=False,
                readahead=False,
                max_readers=1024,
                lock=True,
            )
        except lmdb.Error as exc:
            raise StorageError(f"cannot open LMDB store in {self.directory}: {exc}") from exc

    # -- reads ------------------------------------------------------------------

    def read(self) -> _ReadTransaction:
        """A read transaction (``with store.read() as txn``), from any thread."""
        return _ReadTransaction(self.env, self._gate)

    # -- writes (writer thread only) ------------------------------------------------

    def begin_write(self) -> lmdb.Transaction:
        return self.env.begin(write=True)

    def commit(self, txn: lmdb.Transaction) -> None:
        """Commit; ``MapFullError`` passes through for the caller to grow and retry."""
        try:
            txn.commit()
        except lmdb.MapFullError:
            raise
        except lmdb.Error as exc:
            if _is_enospc(exc):
                raise DiskFullError("disk full while committing to LMDB") from exc
            raise StorageError(f"LMDB commit failed: {exc}") from exc
        if self._fill_fd is not None:
            self._fill_ahead(self._fill_fd)

    def _fill_ahead(self, fd: int) -> None:
        """Keep data.mdb written with zeros a little past LMDB's last page.

        Writer thread only, between transactions.  A commit that writes past
        the end of the file extends it, and on ext4 an extending write waits
        while a checkpoint's ``env.sync()`` flushes the file: measured here,
        ~10% of commits then took 0.5-0.8 ms instead of ~20 us, two thirds of
        all commit time (a lone writer's CPU per add 130-140 -> 65-110 us
        with the file pre-written).  Writing real zeros ahead of LMDB makes its
        page writes overwrites inside the file; ``fallocate`` does not help
        (unwritten extents still change at write-back).

        Safety: only bytes past LMDB's last page are written, and no LMDB
        write transaction is open (we are the writer, after a commit), so no
        page of any snapshot is touched; LMDB ignores the file's size.  The
        fill is an optimisation: if it fails (a full disk), it stops and
        commits extend the file as before.
        """
        info = self.env.info()
        used = self._used_bytes(int(info["last_pgno"]))
        if self._filled_end - used >= _FILL_AHEAD:
            return
        start = max(self._filled_end, used)
        size = min(_FILL_STEP, int(info["map_size"]) - start)
        if size <= 0:
            return
        try:
            written = _write_zeros(fd, size, start)
        except OSError as exc:
            # Nothing depends on the zeros: stop filling until the next open
            # and let LMDB extend the file itself (its own ENOSPC, if any,
            # comes back from its commit as DiskFullError).
            self._close_fill()
            _log.warning("zero fill ahead of LMDB stopped", error=str(exc), errno=exc.errno)
            return
        self._filled_end = start + written

    @property
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def needs_headroom(self) -> bool:
        """True when the data file uses more than 3/4 of the map."""
        info = self.env.info()
        return self._used_bytes(int(info["last_pgno"])) * 4 > int(info["map_size"]) * 3

    def _used_bytes(self, last_pgno: int) -> int:
        """Bytes of data.mdb up to LMDB's last page (``env.info()["last_pgno"]``)."""
        return (last_pgno + 1) * self._page_size

    def _close_fill(self) -> None:
        if self._fill_fd is not None:
            os.close(self._fill_fd)
            self._fill_fd = None

    def grow_map(self) -> int:
        """Double the map with every reader excluded; returns the new size.

        The checkpoint pin is a read transaction too, so growing the map
        releases it and immediately takes a fresh checkpoint (no write can
        happen in between: we are the writer thread).  A checkpoint still
        finishing in the background is waited for first.
        """
        new_size = self.map_size * 2
        with self._checkpoint_lock:
            with self._gate.exclusive():
                self._release_pin()
                self.env.set_mapsize(new_size)
            self._finish_checkpoint(self._capture_checkpoint(self.applied_lsn(), False))
        return new_size

    def applied_lsn(self) -> int:
        with self.read() as txn:
            raw = txn.get(b"applied_lsn", db=self.dbs["meta"])
        return 0 if raw is None else int.from_bytes(raw, "big")

    # -- checkpoints -----------------------------------------------------------------

    def checkpoint(self, applied_lsn: int, *, clean_shutdown: bool = False) -> CheckpointState:
        """Sync LMDB, persist the checkpoint file, move the pin to this snapshot.

        Writer thread only (no commit may run while the snapshot is captured).
        """
        with self._checkpoint_lock:
            return self._finish_checkpoint(self._capture_checkpoint(applied_lsn, clean_shutdown))

    def begin_checkpoint(self, applied_lsn: int) -> PendingCheckpoint:
        """First half of a checkpoint, in the writer thread between two commits.

        Captures the current snapshot: its txn id, both meta pages as they
        are now, and a new pin (a read txn on it).  Nothing is synced yet:
        :meth:`finish_checkpoint` does the slow part from any thread while
        the writer goes on committing.  That is safe because every page of
        the captured snapshot was written before the ``env.sync()`` there
        starts, the new pin keeps those pages from being reused, and the old
        pin (the checkpoint in force) is held until the new checkpoint file
        is durable.  Exactly one checkpoint runs at a time; call
        :meth:`finish_checkpoint` once with the result, even on failure.
        """
        self._checkpoint_lock.acquire()
        try:
            return self._capture_checkpoint(applied_lsn, False)
        except BaseException:
            self._checkpoint_lock.release()
            raise

    def finish_checkpoint(self, pending: PendingCheckpoint) -> CheckpointState:
        """Second half of :meth:`begin_checkpoint` (any thread): sync, file, pin."""
        try:
            return self._finish_checkpoint(pending)
        finally:
            self._checkpoint_lock.release()

    def _capture_checkpoint(self, applied_lsn: int, clean_shutdown: bool) -> PendingCheckpoint:
        page_size = self._page_size
        with open(self.directory / "data.mdb", "rb") as fh:
            meta_pages = fh.read(2 * page_size)
        txnid = int(self.env.info()["last_txnid"])
        newest = max(_meta_txnid(meta_pages[:page_size]), _meta_txnid(meta_pages[page_size:]))
        if newest != txnid:
            raise CorruptionError(f"LMDB meta pages show txn {newest}, expected {txnid}")
        pin = None
        if not clean_shutdown:
            pin = self.env.begin(buffers=False)
            if pin.id() != txnid:
                pin.abort()
                raise CorruptionError(f"checkpoint pin sees txn {pin.id()}, expected {txnid}")
        state = CheckpointState(
            applied_lsn=applied_lsn,
            txnid=txnid,
            boot_id=self.boot_id,
            clean_shutdown=clean_shutdown,
            page_size=page_size,
            meta_pages=meta_pages,
        )
        return PendingCheckpoint(state, pin)

    def _finish_checkpoint(self, pending: PendingCheckpoint) -> CheckpointState:
        try:
            try:
                self.env.sync(True)
            except lmdb.Error as exc:
                if _is_enospc(exc):
                    raise DiskFullError("disk full while syncing LMDB") from exc
                raise StorageError(f"LMDB sync failed: {exc}") from exc
            self._write_checkpoint_file(pending.state)
        except BaseException:
            if pending.pin is not None:
                pending.pin.abort()
            raise
        self._release_pin()
        self._pin = pending.pin
        self.last_checkpoint = pending.state
        return pending.state

    def _write_checkpoint_file(self, state: CheckpointState) -> None:
        doc = {
            "format": _CHECKPOINT_FORMAT,
            "applied_lsn": state.applied_lsn,
            "txnid": state.txnid,
            "boot_id": state.boot_id,
            "clean": state.clean_shutdown,
            "page_size": state.page_size,
            "meta_pages": state.meta_pages,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(msgpack.packb(doc, use_bin_type=True))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.checkpoint_path)
            _fsync_dir(self.directory)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError("disk full while writing the checkpoint file") from exc
            raise StorageError(f"cannot write checkpoint file: {exc}") from exc

    def _release_pin(self) -> None:
        if self._pin is not None:
            self._pin.abort()
            self._pin = None

    def _restore_meta_pages(self, state: CheckpointState) -> None:
        data_path = self.directory / "data.mdb"
        if len(state.meta_pages) != 2 * state.page_size:
            raise CorruptionError("checkpoint file holds meta pages of the wrong size")
        for slot in (0, 1):
            _meta_txnid(state.meta_pages[slot * state.page_size : (slot + 1) * state.page_size])
        fd = os.open(data_path, os.O_WRONLY)
        try:
            os.pwrite(fd, state.meta_pages, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self, applied_lsn: int | None = None) -> None:
        """Checkpoint as a clean shutdown (when ``applied_lsn`` is given), then close."""
        if applied_lsn is not None:
            self.checkpoint(applied_lsn, clean_shutdown=True)
        self._release_pin()
        self._close_fill()
        self.env.close()
