"""The storage engine: WAL + LMDB behind one thread-safe API.

Write path (leader/follower group commit, one batch at a time)::

    caller threads           the leader (one of the callers, see
    ──────────────           memosd.store.group_commit)
    submit(op) ──queue──▶    take every queued op (up to max_batch)
                             open one LMDB write txn
                             for each op: plan it against the txn (reads only,
                               may fail alone) → mutations → apply to the txn
                             WAL.append_batch(all mutations)   ← one fdatasync;
                               the change log goes into the txn while the
                               device writes (between write and fdatasync)
                             commit the LMDB txn (no fsync: the WAL covers it)
    submit() returns ◀──     resolve every op, notify listeners, hand over

A write is acknowledged only once its WAL record is durable *and* readable,
so a reader never sees a write that a power loss could take back, and a
writer always reads its own acknowledged writes.  Readable means applied to
LMDB, except for *deferred adds* (``Engine.add`` without a payload): a batch
of only those skips the LMDB transaction, keeps the durable adds in a table
that reads by id consult first, and LMDB applies the table in one
transaction a few milliseconds later or before anything else needs it
(``_run_adds``, ``_apply_deferred``; docs/architecture.md).  See
``memosd.store`` for why relaxed LMDB sync is still safe on power loss, and
``memosd.wal`` for the log format.

Read path: any thread opens an LMDB read transaction; no writer lock.  Reads
by id look in the deferred-add table first; scans have it applied first.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import lmdb
import structlog

from memosd.errors import (
    BadRequest,
    Conflict,
    DiskFullError,
    MemosError,
    NotFound,
    StorageError,
    Unavailable,
    WalFailedError,
)
from memosd.memcube import versioning
from memosd.memcube.ids import MonotonicIdFactory
from memosd.memcube.model import (
    CubeConfig,
    MemCube,
    MemoryItem,
    PurgeRecord,
    Status,
    validate_cube_name,
)
from memosd.scheduler import jobs
from memosd.store.blobs import BlobStore
from memosd.store.decoded import StoreCaches
from memosd.store.group_commit import GroupCommitter, Submission
from memosd.store.lmdb_env import LmdbEnv, PendingCheckpoint
from memosd.store.planner import Planner
from memosd.store.records import (
    CubeDrop,
    CubePut,
    GrantSet,
    ItemPurge,
    ItemPut,
    JobDelete,
    JobPut,
    Mutation,
    TokenDelete,
    TokenPut,
    VersionPut,
    decode_record,
    encode_atomic,
    encode_mutation,
)
from memosd.store.view import HitCounts, StoreView, TokenRecord
from memosd.wal import WalRecord, WriteAheadLog
from memosd.wal.fileio import FileIO

__all__ = [
    "ChangeEvent",
    "CubeExport",
    "Engine",
    "EngineSettings",
    "TokenRecord",
]

_GRANT_LEVELS: Final = ("read", "write")
_REPLAY_TXN_RECORDS: Final = 2048
_FREE_SPACE_RECHECK_S: Final = 0.05
_HEADROOM_CHECK_COMMITS: Final = 16
_WRITE_KINDS: Final = frozenset({"write", "add"})
_log = structlog.get_logger("memosd.engine")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    wal_segment_bytes: int = 64 * 2**20
    checkpoint_interval_s: float = 60.0
    checkpoint_wal_bytes: int = 256 * 2**20
    initial_map_size: int = 256 * 2**20
    max_batch: int = 1024
    max_text_bytes: int = 2**20
    # Writes are refused (DiskFullError) while less than this is free on the
    # data directory's volume, so LMDB and the WAL never meet ENOSPC halfway.
    min_free_bytes: int = 64 * 2**20
    usage_flush_interval_s: float = 1.0
    # Checkpoint after this many LMDB write transactions as well.  The
    # checkpoint pin (see memosd.store) keeps LMDB from reusing pages freed
    # after it, and its free-page search slows down as that list grows:
    # commits cost ~12 us unpinned, ~50-100 us after 5,000 pinned txns.
    # A checkpoint every few thousand txns keeps them cheap; its syncs run
    # beside the writer (Engine._checkpoint_in_background).
    checkpoint_txns: int = 2000
    # Unreferenced blobs younger than this may belong to a write in flight.
    blob_gc_grace_s: float = 3600.0
    # Change-log entries removed per checkpoint (whole records): the pruning
    # runs in the writer's transaction, so after a bulk load of N items an
    # unbounded prune held every write up for all N deletes.
    prune_batch: int = 20_000
    # Deferred adds (Engine.add): acknowledged once durable in the WAL, kept
    # in memory (and served from there) until LMDB applies them in one
    # transaction: once this many are waiting, once the oldest has waited
    # deferred_add_max_s, before any other write, scan, checkpoint or close.
    # 0 turns them off (every add is applied before it is acknowledged).
    deferred_adds: int = 256
    deferred_add_max_s: float = 0.005


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    kind: str
    cube: str | None
    item_id: str | None
    version: int | None
    lsn: int
    operation: str | None = None


@dataclass(frozen=True, slots=True)
class CubeExport:
    cube: MemCube
    grants: dict[str, str]
    items: list[list[MemoryItem]]
    purges: list[PurgeRecord]


# A write request: runs against a Planner (memosd.store.planner) inside the
# batch's transaction and returns its result.
Plan = Callable[[Planner], Any]


class _Work(NamedTuple):
    """One submission to the group committer (a tuple: built once per write,
    a frozen dataclass costs ~0.4 us more)."""

    kind: str  # "write" | "add" | "side" | "flush" | "checkpoint" | "housekeeping" | "stop"
    plan: Plan | None = None
    side: Callable[[StoreView], None] | None = None
    # kind "add" (a deferrable Engine.add): (cube, text, fields); ``plan``
    # does the same add the usual way, when the batch holds other writes.
    add: tuple[str, str, dict[str, Any]] | None = None


class _DeferredAdd(NamedTuple):
    """An acknowledged add that LMDB has not applied yet (Engine._deferred)."""

    lsn: int
    item: MemoryItem
    mutation: ItemPut
    payload: bytes


_Op = Submission["_Work"]


def _wall_clock_us() -> int:
    return time.time_ns() // 1000


def _disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Engine:
    """Thread-safe storage engine over one data directory.  Use :meth:`open`."""

    def __init__(
        self,
        data_dir: Path,
        settings: EngineSettings,
        *,
        wal_io: FileIO | None,
        clock: Callable[[], int],
        boot_id: str | None,
        free_space: Callable[[], int] | None,
        on_progress: Callable[[str], None] | None,
    ) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self._clock = clock
        self._last_us = 0
        self._ids = MonotonicIdFactory()
        self._listeners: list[Callable[[ChangeEvent], None]] = []
        self._free_space = free_space or (lambda: _disk_free(data_dir))
        # statvfs per batch costs more than a small write's planning; the real
        # disk is re-checked at most every _FREE_SPACE_RECHECK_S while far
        # from the limit (an injected ``free_space`` is asked every batch).
        self._cache_free_space = free_space is None
        self._free_checked_at = -1.0
        self._free_margin = 0
        self._committer: GroupCommitter[_Work] = GroupCommitter(
            self._process_batch, max_batch=settings.max_batch
        )
        self._stop_housekeeper = threading.Event()
        # Set when deferred adds start waiting: the housekeeper has them
        # applied soon even if no further write or read comes.
        self._housekeeper_wake = threading.Event()
        # Acknowledged adds LMDB has not applied yet, in LSN order; written by
        # the leader only, read (plain dict lookups) by any reader.
        self._deferred: dict[tuple[str, str], _DeferredAdd] = {}
        self._deferred_since = 0.0
        self._deferred_last_lsn = 0
        self._leader_thread: int | None = None
        self._usage_lock = threading.Lock()
        self._caches = StoreCaches()
        self._pending_hits = HitCounts()
        self._failure: MemosError | None = None
        self._background_checkpoint: threading.Thread | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        started = time.monotonic()

        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = LmdbEnv(
            data_dir / "store", initial_map_size=settings.initial_map_size, boot_id=boot_id
        )
        applied = self.store.applied_lsn()
        # The WAL's recovery scan keeps the records after ``applied``: replay
        # reads and checks each segment once.
        self.wal = WriteAheadLog.open(
            data_dir / "wal",
            io=wal_io,
            segment_bytes=settings.wal_segment_bytes,
            keep_after_lsn=applied,
        )
        self.blobs = BlobStore(data_dir / "blobs")
        # Pin the current snapshot before replay writes anything (store docs).
        self.store.checkpoint(applied)
        replayed = self._replay(applied, on_progress)
        self._build_missing_indexes()
        self._checkpoint_now()
        self._collect_garbage_blobs(grace_s=0)
        self.recovery: dict[str, Any] = {
            "rolled_back_lmdb_to_checkpoint": self.store.rolled_back_to_checkpoint,
            "checkpoint_lsn": applied,
            "replayed_records": replayed,
            "wal": _asdict(self.wal.recovery),
            "last_lsn": self.wal.last_lsn,
            "seconds": round(time.monotonic() - started, 3),
        }
        _log.info("recovery complete", **self.recovery)
        self._last_checkpoint_time = time.monotonic()
        self._next_housekeeping = 0.0
        self._wal_bytes_since_checkpoint = 0
        self._txns_since_checkpoint = 0
        self._commits_since_headroom_check = 0
        self._housekeeper = threading.Thread(
            target=self._housekeeper_loop, name="memosd-housekeeper", daemon=True
        )
        self._housekeeper.start()

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        settings: EngineSettings | None = None,
        wal_io: FileIO | None = None,
        clock: Callable[[], int] | None = None,
        boot_id: str | None = None,
        free_space: Callable[[], int] | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> Engine:
        """Open (and recover) the engine.  ``on_progress`` hears recovery milestones."""
        return cls(
            Path(data_dir),
            settings or EngineSettings(),
            wal_io=wal_io,
            clock=clock or _wall_clock_us,
            boot_id=boot_id,
            free_space=free_space,
            on_progress=on_progress,
        )

    # ------------------------------------------------------------------ recovery

    def _build_missing_indexes(self) -> None:
        """Build, once, the indexes a store written before them lacks."""
        jobs = self._build_index_once(StoreView.open_jobs_indexed, StoreView.index_open_jobs)
        if jobs is not None:
            _log.info("indexed unfinished jobs", jobs=jobs)
        items = self._build_index_once(StoreView.classes_indexed, StoreView.index_classes)
        if items is not None:
            _log.info("indexed item classes", items=items)

    def _build_index_once(
        self, indexed: Callable[[StoreView], bool], build: Callable[[StoreView], int]
    ) -> int | None:
        """Run ``build`` (it returns the entries it made) in a write txn unless
        the store is already ``indexed``; its count, or None if it did not run."""
        with self.store.read() as txn:
            if indexed(StoreView(txn, self.store.dbs)):
                return None
        counted: list[int] = []
        self._write_txn(lambda view: counted.append(build(view)))
        return counted[-1]

    def _replay(self, applied: int, on_progress: Callable[[str], None] | None) -> int:
        replayed = 0
        records = self.wal.replay(applied)
        # Change-log entries the checkpoint after recovery would prune at once
        # (no consumer needs them) are not written at all.
        with self.store.read() as txn:
            consumers = StoreView(txn, self.store.dbs).consumer_lsns()
        prune_horizon = min([self.wal.durable_lsn, *consumers.values()])
        while True:
            chunk = [r for _, r in zip(range(_REPLAY_TXN_RECORDS), records, strict=False)]
            if not chunk:
                return replayed

            def apply_chunk(view: StoreView, chunk: list[WalRecord] = chunk) -> None:
                events = []
                for record in chunk:
                    for mutation, payload in decode_record(
                        record.rtype, record.payload, item_keys_only=True
                    ):
                        view.apply(mutation, payload)
                        events.append(_event_for(mutation, record.lsn))
                _record_logged(view, events, log_after=prune_horizon)

            self._release_blobs(self._write_txn(apply_chunk).released_blobs)
            replayed += len(chunk)
            if on_progress is not None:
                on_progress(f"replayed {replayed} WAL records (up to LSN {chunk[-1].lsn})")

    # ------------------------------------------------------------------ writer

    def _now_us(self) -> int:
        # Writer only (the batch's leader; one batch runs at a time): no lock.
        last = self._clock()
        if last <= self._last_us:
            last = self._last_us + 1
        self._last_us = last
        return last

    def _submit(self, work: _Work) -> Any:
        """Run ``work`` in a batch (blocking); its result, or its error."""
        self._check_writable()
        return self._committer.submit(work)

    def _submit_nowait(self, work: _Work, on_done: Callable[[Submission[Any]], None]) -> None:
        """Queue ``work``; ``on_done`` runs once its batch is durable or failed."""
        self._check_writable()
        self._committer.submit_nowait(work, on_done)

    def _check_writable(self) -> None:
        """Raise at once if the engine is closed or refusing writes."""
        if self._closed:
            raise Unavailable("the storage engine is closed", reason="closed")
        if self._failure is not None:
            raise _copy_error(self._failure)

    def _process_batch(self, batch: list[_Op]) -> None:
        """Run one group-commit batch (in the current leader's thread)."""
        self._leader_thread = threading.get_ident()
        try:
            self._process_batch_as_leader(batch)
        finally:
            self._leader_thread = None

    def _process_batch_as_leader(self, batch: list[_Op]) -> None:
        writes = [op for op in batch if op.payload.kind in _WRITE_KINDS]
        if writes:
            if self.settings.deferred_adds > 0 and all(op.payload.kind == "add" for op in writes):
                self._run_adds(writes)
            else:
                # Anything else may read what the deferred adds wrote.
                self._apply_deferred()
                self._run_batch(writes)
        for op in batch:
            kind = op.payload.kind
            if kind == "flush":
                self._apply_deferred()
                op.resolve(None)
            elif kind == "checkpoint":
                self._run_checkpoint_op(op)
            elif kind == "side":
                assert op.payload.side is not None
                try:
                    self._write_txn(op.payload.side)
                    op.resolve(None)
                except MemosError as exc:
                    op.fail(exc)
            elif kind == "stop":
                self._shutdown_writer()
                op.resolve(None)
        self._housekeeping()
        for op in batch:
            if op.payload.kind == "housekeeping":
                op.resolve(None)

    def _housekeeper_loop(self) -> None:
        """Give idle engines their periodic usage flush and checkpoint, and
        deferred adds their application once they have waited a while."""
        interval = max(
            0.05, min(self.settings.usage_flush_interval_s, self.settings.checkpoint_interval_s)
        )
        linger = max(0.01, 4 * self.settings.deferred_add_max_s)
        while True:
            if self._housekeeper_wake.wait(interval):
                self._housekeeper_wake.clear()
                # Deferred adds are waiting: give the writer time to apply
                # them itself (it does once they are deferred_add_max_s old).
                if self._stop_housekeeper.wait(linger):
                    return
            if self._stop_housekeeper.is_set():
                return
            try:
                self._committer.submit(_Work("housekeeping"))
            except Exception:
                _log.exception("housekeeping failed")

    def _run_adds(self, ops: list[_Op]) -> None:
        """A batch of nothing but deferrable adds: acknowledged once durable.

        Each add is planned against a read snapshot (an add only reads its
        cube, and a cube is never changed by a deferred write), logged in one
        WAL batch like any other, then kept in ``_deferred``, from which
        reads serve it, and acknowledged.  LMDB applies the deferred adds
        later, many per transaction (:meth:`_apply_deferred`): a lone
        writer's add then costs no LMDB transaction of its own, no commit,
        and a fraction of the pages a commit writes.
        """
        if not self._writes_allowed(ops):
            return
        planned: list[tuple[_Op, MemoryItem, ItemPut, int, bytes]] = []
        with self.store.read() as txn:
            view = StoreView(txn, self.store.dbs, self._caches)
            for op in ops:
                assert op.payload.add is not None
                cube, text, fields = op.payload.add
                planner = Planner(
                    view,
                    self._now_us(),
                    new_id=self._ids,
                    max_text_bytes=self.settings.max_text_bytes,
                )
                try:
                    item = planner.new_item(cube, text, **fields)
                    mutation = ItemPut(item)
                    rtype, payload = encode_mutation(mutation)
                except MemosError as exc:
                    op.fail(exc)
                    continue
                except Exception as exc:  # a bug must not kill the leader
                    _log.exception("write plan failed")
                    op.fail(StorageError(f"write failed: {exc}", reason="internal"))
                    continue
                planned.append((op, item, mutation, rtype, payload))
        if not planned:
            return
        try:
            lsns = self.wal.append_batch([(rtype, payload) for *_, rtype, payload in planned])
        except (WalFailedError, DiskFullError) as exc:
            self._poison(exc)
            for op, *_ in planned:
                op.fail(_copy_error(exc))
            return
        self._wal_bytes_since_checkpoint += sum(len(p) + 17 for *_, p in planned)
        deferred = self._deferred
        if not deferred:
            self._deferred_since = time.monotonic()
            self._housekeeper_wake.set()
        events = []
        for (_, item, mutation, _, payload), lsn in zip(planned, lsns, strict=True):
            deferred[(item.cube, item.id)] = _DeferredAdd(lsn, item, mutation, payload)
            events.append(_event_for(mutation, lsn))
        self._deferred_last_lsn = lsns[-1]
        # Listeners hear of a write once it is acknowledged, as for every
        # other write; reading it back by id is served from _deferred.
        self._resolve([(op, item) for op, item, *_ in planned], events)

    def _apply_deferred(self) -> None:
        """Apply every deferred add to LMDB in one transaction (leader only).

        They are removed from ``_deferred`` only once committed: a reader
        looks there first and then opens its snapshot, so it finds each add
        in one or the other (and compares LSNs when in both, see ``get``).
        Their change-log entries are written now (listeners heard of them
        when they were acknowledged).  On failure they stay durable in the
        WAL (recovery applies them) and the engine refuses further writes.
        """
        deferred = self._deferred
        if not deferred or self._failure is not None:
            return
        entries = list(deferred.values())
        events = [_event_for(entry.mutation, entry.lsn) for entry in entries]
        try:
            self._apply_logged([(e.mutation, e.payload) for e in entries], events)
        except MemosError as exc:
            self._poison(exc)
            return
        self._txns_since_checkpoint += 1
        for entry in entries:
            del deferred[entry.item.cube, entry.item.id]

    def _deferred_due(self) -> bool:
        return bool(self._deferred) and (
            len(self._deferred) >= self.settings.deferred_adds
            or time.monotonic() - self._deferred_since >= self.settings.deferred_add_max_s
        )

    def _flush_deferred(self) -> None:
        """Have the deferred adds applied before a scan of LMDB (blocks).

        From the leader's own thread (a listener scanning as it hears of a
        deferred add) it applies them itself: queueing would wait on itself.
        Plans never get here with adds deferred (their batch applied them).
        """
        if not self._deferred or self._failure is not None or self._closed:
            return
        if threading.get_ident() == self._leader_thread:
            self._apply_deferred()
        else:
            self._committer.submit(_Work("flush"))

    def _writes_allowed(self, ops: list[_Op]) -> bool:
        """Fail ``ops`` (False) if the engine refuses writes or the disk is nearly full."""
        if self._failure is not None:
            for op in ops:
                op.fail(_copy_error(self._failure))
            return False
        if not self._enough_free_space():
            err = DiskFullError(
                "not enough free disk space for writes "
                f"(need {self.settings.min_free_bytes} bytes free on {self.data_dir})"
            )
            for op in ops:
                op.fail(_copy_error(err))
            return False
        return True

    def _run_batch(self, ops: list[_Op]) -> None:
        if not self._writes_allowed(ops):
            return
        isolate = False
        while True:
            try:
                if self._run_batch_once(ops, isolate=isolate):
                    return
                # A plan failed after writing part of its change into the
                # shared transaction: run the batch again, isolated.
                isolate = True
            except lmdb.MapFullError:
                new_size = self.store.grow_map()
                _log.info("LMDB map grown", map_size=new_size)

    def _enough_free_space(self) -> bool:
        """Whether at least ``min_free_bytes`` are free (before anything is written)."""
        now = time.monotonic()
        if (
            self._cache_free_space
            and now - self._free_checked_at < _FREE_SPACE_RECHECK_S
            and self._free_margin > 0
        ):
            return True
        free = self._free_space()
        self._free_checked_at = now
        # Trust a cached reading only while we are far above the limit.
        self._free_margin = free - 4 * self.settings.min_free_bytes
        return free >= self.settings.min_free_bytes

    def _run_batch_once(self, ops: list[_Op], *, isolate: bool) -> bool:
        """Plan, log and commit ``ops``; False if the batch must run again isolated.

        Plans share the batch's write transaction: a plan that fails before
        it writes anything (validation, a missing item: the common failure)
        leaves nothing behind, and a one-op batch that fails is aborted
        whole.  A plan that fails *after* writing part of its change would
        leave that part in the batch, so the transaction is aborted (nothing
        is logged yet) and the batch runs again with ``isolate``: each plan in
        a child transaction that is thrown away if it fails.  Child
        transactions cost ~3 us per write, so they are only used then.
        """
        txn = self.store.begin_write()
        shared = StoreView(txn, self.store.dbs, self._caches)
        outcomes: list[tuple[_Op, Any]] = []
        logged: list[list[tuple[Mutation, int, bytes]]] = []  # per WAL record
        released: set[str] = set()
        referenced: set[str] = set()
        try:
            for op in ops:
                plan = op.payload.plan
                assert plan is not None
                child = self.store.env.begin(write=True, parent=txn) if isolate else None
                planner = Planner(
                    shared if child is None else StoreView(child, self.store.dbs, self._caches),
                    self._now_us(),
                    new_id=self._ids,
                    max_text_bytes=self.settings.max_text_bytes,
                )
                try:
                    result = plan(planner)
                except lmdb.MapFullError:
                    if child is not None:
                        child.abort()
                    raise
                except Exception as exc:
                    if child is not None:
                        child.abort()
                    elif planner.wrote and len(ops) > 1:
                        txn.abort()
                        return False
                    if not isinstance(exc, MemosError):  # a plan's bug must not kill the leader
                        _log.exception("write plan failed")
                        exc = StorageError(f"write failed: {exc}", reason="internal")
                    outcomes.append((op, exc))
                    continue
                if child is not None:
                    child.commit()
                    released |= planner.view.released_blobs
                    referenced |= planner.view.referenced_blobs_added
                outcomes.append((op, result))
                if planner.logged:
                    logged.append(planner.logged)
            released |= shared.released_blobs
            referenced |= shared.referenced_blobs_added
            if not logged:
                txn.abort()
                self._resolve(outcomes, [])
                return True
            records = [
                entries[0][1:] if len(entries) == 1 else encode_atomic([e[1:] for e in entries])
                for entries in logged
            ]
            # The change log needs the LSNs but not durability: it is written
            # into the transaction while the device writes the records
            # (``while_syncing``), which hides 10-20 us of a lone writer's add.
            # Its failure (a full map, most likely) must not lose the batch,
            # which is logged by then: the commit below starts over instead.
            overlap = _ChangeLogWrite(shared, logged)
            try:
                self.wal.append_batch(records, while_syncing=overlap)
                self._wal_bytes_since_checkpoint += sum(len(p) + 17 for _, p in records)
                self._txns_since_checkpoint += 1
            except (WalFailedError, DiskFullError) as exc:
                txn.abort()
                self._poison(exc)
                for op, _ in outcomes:
                    op.fail(_copy_error(exc))
                return True
            events = overlap.events if overlap.events is not None else overlap.make_events()
        except BaseException:
            txn.abort()
            raise
        try:
            mutations = [(m, p) for entries in logged for m, _, p in entries]
            if overlap.error is not None:
                txn.abort()
                if not isinstance(overlap.error, lmdb.MapFullError):
                    raise StorageError(
                        f"change log write failed: {overlap.error!r}", reason="internal"
                    ) from overlap.error
            usable = txn if overlap.error is None else None
            released |= self._commit_logged(usable, shared, mutations, events)
            self.blobs.unpin(referenced)
            self._release_blobs(released)
        except MemosError as exc:
            # The batch is durable in the WAL (acknowledged below); LMDB could
            # not take it.  Stop serving writes; recovery will apply it.
            self._poison(exc)
        self._resolve(outcomes, events)
        return True

    def _commit_logged(
        self,
        txn: lmdb.Transaction | None,
        view: StoreView,
        mutations: list[tuple[Mutation, bytes]],
        events: list[ChangeEvent],
    ) -> set[str]:
        """Commit a batch that is already durable in the WAL.

        Returns blobs released by a re-application (see below).

        A commit can still hit the map limit (LMDB allocates pages for its
        free list at commit), and so can the change log written while the
        WAL synced (``txn`` is then None: that transaction was aborted).  The
        batch must not be lost or re-planned: grow the map and apply the same
        logged mutations again.
        """
        if txn is None:
            view = self._reapply_logged(mutations, events)
        else:
            try:
                self.store.commit(txn)
            except lmdb.MapFullError:
                view = self._reapply_logged(mutations, events)
        # Checked every few commits (env.info() per commit is measurable); a
        # map that fills up in between is grown on MapFullError anyway.
        self._commits_since_headroom_check += 1
        if self._commits_since_headroom_check >= _HEADROOM_CHECK_COMMITS:
            self._commits_since_headroom_check = 0
            if self.store.needs_headroom():
                new_size = self.store.grow_map()
                _log.info("LMDB map grown", map_size=new_size)
        return view.released_blobs

    def _reapply_logged(
        self, mutations: list[tuple[Mutation, bytes]], events: list[ChangeEvent]
    ) -> StoreView:
        """Grow the map, then apply a logged batch in a fresh transaction (growing
        again while it does not fit)."""
        self.store.grow_map()
        return self._apply_logged(mutations, events)

    def _apply_logged(
        self, mutations: list[tuple[Mutation, bytes]], events: list[ChangeEvent]
    ) -> StoreView:
        """Apply logged mutations, their change log and applied LSN in one
        transaction (growing the map while it does not fit); its view."""

        def apply(view: StoreView) -> None:
            for mutation, payload in mutations:
                view.apply(mutation, payload)
            _record_logged(view, events)

        return self._write_txn(apply)

    def _release_blobs(self, shas: Iterable[str]) -> None:
        """Delete blob files no stored version references any more (after commit)."""
        for sha in shas:
            self.blobs.release(sha)

    def _collect_garbage_blobs(self, *, grace_s: float) -> int:
        """Remove blob files that no version references, older than ``grace_s``.

        A writer stores its blob before submitting the item that references
        it, so a young unreferenced blob may be in flight; at start-up
        (``grace_s=0``) nothing is in flight.
        """
        with self.store.read() as txn:
            referenced = StoreView(txn, self.store.dbs).referenced_blobs()
        cutoff = time.time() - grace_s
        removed = 0
        for sha, mtime in list(self.blobs.iter_blobs()):
            if sha not in referenced and mtime <= cutoff and self.blobs.delete(sha):
                removed += 1
        if removed:
            _log.info("unreferenced blobs removed", count=removed)
        return removed

    def _resolve(self, outcomes: list[tuple[_Op, Any]], events: Sequence[ChangeEvent]) -> None:
        for op, result in outcomes:
            if isinstance(result, MemosError):
                op.fail(result)
            else:
                op.resolve(result)
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    _log.exception("change listener failed", kind=event.kind)

    def _poison(self, exc: MemosError) -> None:
        if self._failure is None:
            self._failure = exc
            _log.error(
                "storage failed; refusing further writes until restart",
                error=str(exc),
                reason=exc.reason,
            )

    # ------------------------------------------------------------------ checkpoints & usage

    def _housekeeping(self) -> None:
        """Flush usage and checkpoint when due; cheap enough to call per batch."""
        if self._failure is not None:
            return
        if self._deferred_due():
            self._apply_deferred()
        now = time.monotonic()
        wal_due = (
            self._wal_bytes_since_checkpoint >= self.settings.checkpoint_wal_bytes
            or self._txns_since_checkpoint >= self.settings.checkpoint_txns
        )
        if now < self._next_housekeeping and not wal_due:
            return
        self._next_housekeeping = now + min(
            self.settings.usage_flush_interval_s, self.settings.checkpoint_interval_s
        )
        self._flush_usage()
        time_due = now - self._last_checkpoint_time >= self.settings.checkpoint_interval_s
        if (time_due or wal_due) and self._checkpoint_needed():
            self._checkpoint_in_background()

    def _checkpoint_in_background(self) -> None:
        """Start a periodic checkpoint whose syncs run beside the writer.

        The writer only prunes the change log and captures the snapshot
        (``LmdbEnv.begin_checkpoint``, microseconds); ``env.sync()``, the
        checkpoint file's fsyncs and the WAL segment deletion (tens of
        milliseconds) run in a short-lived thread while writes go on.  One
        at a time: while one runs, a due checkpoint waits for the next batch.
        """
        running = self._background_checkpoint
        if running is not None and running.is_alive():
            return
        self._apply_deferred()
        applied = self.store.applied_lsn()
        try:
            self._prune_change_log(applied)
            pending = self.store.begin_checkpoint(applied)
        except MemosError as exc:
            _log.error("checkpoint failed", error=str(exc), reason=exc.reason)
            raise
        self._last_checkpoint_time = time.monotonic()
        self._wal_bytes_since_checkpoint = 0
        self._txns_since_checkpoint = 0
        thread = threading.Thread(
            target=self._finish_background_checkpoint,
            args=(pending,),
            name="memosd-checkpoint",
            daemon=True,
        )
        self._background_checkpoint = thread
        thread.start()
        self._collect_garbage_blobs(grace_s=self.settings.blob_gc_grace_s)

    def _finish_background_checkpoint(self, pending: PendingCheckpoint) -> None:
        try:
            self.store.finish_checkpoint(pending)
            self.wal.checkpoint(pending.state.applied_lsn)
        except Exception as exc:
            # A failed LMDB sync may have dropped dirty pages: no later
            # checkpoint may claim them.  The last good checkpoint and the
            # WAL still hold everything; stop writing and recover on restart.
            _log.error("checkpoint failed", error=str(exc))
            self._poison(
                exc
                if isinstance(exc, MemosError)
                else StorageError(f"checkpoint failed: {exc}", reason="checkpoint")
            )

    def _join_checkpoint(self) -> None:
        """Wait for a background checkpoint (before any other checkpoint or close)."""
        thread = self._background_checkpoint
        if thread is not None:
            thread.join()
            self._background_checkpoint = None

    def _checkpoint_needed(self) -> bool:
        last = self.store.last_checkpoint
        return (
            last is None
            or last.applied_lsn != self.wal.last_lsn
            or len(self.wal.segment_paths()) > 1
        )

    def _checkpoint_guarded(self) -> dict[str, Any]:
        try:
            return self._checkpoint_now()
        except MemosError as exc:
            _log.error("checkpoint failed", error=str(exc), reason=exc.reason)
            raise

    def _checkpoint_now(self, *, clean: bool = False) -> dict[str, Any]:
        self._join_checkpoint()
        self._apply_deferred()
        applied = self.store.applied_lsn()
        self._prune_change_log(applied)
        state = self.store.checkpoint(applied, clean_shutdown=clean)
        removed = self.wal.checkpoint(applied)
        self._last_checkpoint_time = time.monotonic()
        self._wal_bytes_since_checkpoint = 0
        self._txns_since_checkpoint = 0
        blobs_removed = self._collect_garbage_blobs(grace_s=self.settings.blob_gc_grace_s)
        return {
            "applied_lsn": applied,
            "lmdb_txnid": state.txnid,
            "wal_segments_removed": removed,
            "blobs_removed": blobs_removed,
        }

    def _run_checkpoint_op(self, op: _Op) -> None:
        if self._failure is not None:
            op.fail(_copy_error(self._failure))
            return
        try:
            self._flush_usage()
            op.resolve(self._checkpoint_guarded())
        except MemosError as exc:
            op.fail(exc)

    def _write_txn(self, fn: Callable[[StoreView], None]) -> StoreView:
        """Run ``fn`` in one LMDB write txn and commit it; returns its view.

        On ``MapFullError`` (inside ``fn`` or at commit) the map grows and
        ``fn`` runs again in a fresh txn, so ``fn`` must only write.  Used for
        replay and for derived side data that has no WAL record (usage
        counters, change-log pruning, consumer LSNs).  Leader or recovery only.
        """
        while True:
            txn = self.store.begin_write()
            view = StoreView(txn, self.store.dbs)
            try:
                fn(view)
                self.store.commit(txn)
            except lmdb.MapFullError:
                txn.abort()
                self.store.grow_map()
                continue
            except BaseException:
                txn.abort()
                raise
            return view

    def _flush_usage(self) -> None:
        with self._usage_lock:
            pending, self._pending_hits = self._pending_hits, HitCounts()
        if not pending:
            return
        self._apply_deferred()  # hits may count deferred adds

        def write(view: StoreView) -> None:
            view.add_hits(pending, pause=_yield_gil)

        self._write_txn(write)

    def _prune_change_log(self, applied: int) -> None:
        def prune(view: StoreView) -> None:
            consumers = view.consumer_lsns()
            horizon = min([applied, *consumers.values()])
            if horizon > (view.meta_u64(b"changes_horizon") or 0):
                # Bounded: after a bulk load the log holds an entry per write, and
                # this runs in the writer's transaction, which holds every write up.
                reached = view.prune_changes(horizon, limit=self.settings.prune_batch)
                view.set_meta_u64(b"changes_horizon", reached)

        self._write_txn(prune)

    def _wal_bytes(self) -> int:
        total = 0
        for path in self.wal.segment_paths():
            with contextlib.suppress(OSError):  # removed by a concurrent checkpoint
                total += os.path.getsize(path)
        return total

    def _shutdown_writer(self) -> None:
        if self._failure is None:
            try:
                self._flush_usage()
                self._checkpoint_now(clean=True)
            except MemosError as exc:
                _log.error("final checkpoint failed", error=str(exc))

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        return self._failure is None and not self._closed

    @property
    def failure(self) -> MemosError | None:
        return self._failure

    def close(self) -> None:
        """Flush, checkpoint (marked clean), close.  Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop_housekeeper.set()
        self._housekeeper_wake.set()
        self._housekeeper.join()
        self._committer.submit(_Work("stop"))
        self._committer.close()
        self._join_checkpoint()
        self.wal.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listener(self, callback: Callable[[ChangeEvent], None]) -> None:
        self._listeners.append(callback)

    # ------------------------------------------------------------------ reads

    def _read(self, fn: Callable[[StoreView], T]) -> T:
        if self._closed:
            raise Unavailable("the storage engine is closed", reason="closed")
        with self.store.read() as txn:
            return fn(StoreView(txn, self.store.dbs, self._caches))

    def get_cube(self, name: str) -> MemCube:
        return self._read(lambda v: v.require_cube(name))

    def list_cubes(self) -> list[MemCube]:
        return self._read(lambda v: v.cubes())

    def get(
        self, cube: str, item_id: str, *, version: int | None = None, as_of_us: int | None = None
    ) -> MemoryItem:
        # Deferred adds first, then the snapshot (see _apply_deferred).
        deferred = self._deferred.get((cube, item_id)) if self._deferred else None

        def read(view: StoreView) -> MemoryItem:
            if deferred is not None and view.applied_lsn() < deferred.lsn:
                return _deferred_version(deferred.item, version, as_of_us)
            view.require_cube(cube)
            if version is not None:
                item = view.version(cube, item_id, version)
                if item is None:
                    raise NotFound(f"item {item_id} has no version {version} in cube {cube!r}")
                return item
            if as_of_us is not None:
                found = versioning.as_of(view.history(cube, item_id), as_of_us)
                if found is None:
                    raise NotFound(f"item {item_id} did not exist at {as_of_us} in cube {cube!r}")
                return found
            item = view.latest(cube, item_id)
            if item is None:
                raise view.missing_item(cube, item_id)
            if item.status == Status.DELETED:
                raise NotFound(f"item {item_id} was deleted", reason="deleted")
            return item

        return self._read(read)

    def get_many(self, cube: str, item_ids: Sequence[str]) -> list[MemoryItem | None]:
        """The latest versions of ``item_ids`` in one read transaction.

        ``None`` where an item does not exist, was purged or is deleted (and
        for every id of a cube that does not exist): the search service
        fetches its hits this way instead of one transaction per hit.
        """

        deferred: dict[str, _DeferredAdd] = {}
        if self._deferred:
            waiting = self._deferred
            for item_id in item_ids:
                entry = waiting.get((cube, item_id))
                if entry is not None:
                    deferred[item_id] = entry

        def read(view: StoreView) -> list[MemoryItem | None]:
            if not view.has_cube(cube):
                return [None] * len(item_ids)
            deleted = Status.DELETED
            out = [
                None if item is None or item.status == deleted else item
                for item in view.latest_many(cube, item_ids)
            ]
            if deferred:
                applied = view.applied_lsn()
                for index, item_id in enumerate(item_ids):
                    entry = deferred.get(item_id)
                    if entry is not None and applied < entry.lsn:
                        out[index] = entry.item
            return out

        return self._read(read)

    def history(self, cube: str, item_id: str) -> list[MemoryItem]:
        deferred = self._deferred.get((cube, item_id)) if self._deferred else None

        def read(view: StoreView) -> list[MemoryItem]:
            if deferred is not None and view.applied_lsn() < deferred.lsn:
                return [deferred.item]
            view.require_cube(cube)
            versions = view.history(cube, item_id)
            if not versions:
                raise view.missing_item(cube, item_id)
            return versions

        return self._read(read)

    def list_items(
        self,
        cube: str,
        *,
        status: str | None = "active",
        tier: str | None = None,
        form: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[MemoryItem]:
        if limit < 0:
            raise BadRequest("limit must be >= 0")
        self._flush_deferred()

        def read(view: StoreView) -> list[MemoryItem]:
            view.require_cube(cube)
            out: list[MemoryItem] = []
            if limit == 0:
                return out
            for item in view.iter_latest(cube, after, status=status, tier=tier, form=form):
                out.append(item)
                if len(out) >= limit:
                    break
            return out

        return self._read(read)

    def iter_items(
        self,
        cube: str,
        *,
        status: str | None = "active",
        tier: str | None = None,
        form: str | None = None,
        page: int = 1000,
    ) -> Iterator[MemoryItem]:
        """Every item :meth:`list_items` would list, in id order, ``page`` per read.

        For passes over what may be a whole cube: each page is one short read
        transaction, and only the caller's summary stays alive, not a list of
        every item (100k items are millions of objects for the cyclic GC).
        """
        if page < 1:
            raise BadRequest("page must be >= 1")
        after: str | None = None
        while True:
            items = self.list_items(
                cube, status=status, tier=tier, form=form, limit=page, after=after
            )
            yield from items
            if len(items) < page:
                return
            after = items[-1].id

    def count_items(self, cube: str) -> dict[str, int]:
        self._flush_deferred()

        def read(view: StoreView) -> dict[str, int]:
            view.require_cube(cube)
            counts = {str(s): 0 for s in Status}
            for item in view.iter_latest(cube):
                counts[item.status] = counts.get(item.status, 0) + 1
            return counts

        return self._read(read)

    def purges(self, cube: str) -> list[PurgeRecord]:
        return self._read(lambda v: (v.require_cube(cube), v.purges(cube))[1])

    def grants(self, cube: str) -> dict[str, str]:
        return self._read(lambda v: (v.require_cube(cube), v.grants(cube))[1])

    def tokens(self) -> list[TokenRecord]:
        return self._read(lambda v: v.tokens())

    def token_by_hash(self, token_hash: bytes) -> TokenRecord | None:
        return self._read(lambda v: v.token_by_hash(token_hash))

    def export_cube(self, name: str) -> CubeExport:
        self._flush_deferred()

        def read(view: StoreView) -> CubeExport:
            cube = view.require_cube(name)
            items = [view.history(name, it.id) for it in view.iter_latest(name)]
            return CubeExport(cube, view.grants(name), items, view.purges(name))

        return self._read(read)

    def status(self) -> dict[str, Any]:
        last = self.store.last_checkpoint
        return {
            "data_dir": str(self.data_dir),
            "healthy": self.healthy,
            "failure": None if self._failure is None else self._failure.to_wire(),
            "last_lsn": self.wal.last_lsn,
            "durable_lsn": self.wal.durable_lsn,
            "applied_lsn": self.applied_lsn,
            "lmdb_applied_lsn": self.store.applied_lsn(),
            "deferred_adds": len(self._deferred),
            "checkpoint_lsn": None if last is None else last.applied_lsn,
            "wal_segments": len(self.wal.segment_paths()),
            "wal_bytes": self._wal_bytes(),
            "lmdb_map_size": self.store.map_size,
            "cubes": len(self.list_cubes()),
            "recovery": self.recovery,
        }

    @property
    def last_lsn(self) -> int:
        """The newest LSN handed out by the WAL (covers every acknowledged write)."""
        return self.wal.last_lsn

    @property
    def applied_lsn(self) -> int:
        """Every acknowledged write up to this LSN is readable.

        Deferred adds included: LMDB itself may be behind
        (``status()["lmdb_applied_lsn"]``).
        """
        # Deferred adds first: once the table is empty, LMDB has them all.
        deferred = self._deferred_last_lsn if self._deferred else 0
        return max(self.store.applied_lsn(), deferred)

    def changes_since(self, after_lsn: int, *, limit: int = 10_000) -> list[ChangeEvent]:
        """Acknowledged changes with LSN > ``after_lsn``, oldest first.

        Conflict(reason="changes_pruned") if the log no longer reaches back
        that far: the consumer must rebuild from the current state.
        """
        self._flush_deferred()

        def read(view: StoreView) -> list[ChangeEvent]:
            horizon = view.meta_u64(b"changes_horizon") or 0
            if after_lsn < horizon:
                raise Conflict(
                    f"the change log starts after LSN {horizon}; rebuild from current state",
                    reason="changes_pruned",
                    horizon=horizon,
                )
            return [
                ChangeEvent(kind, cube, item_id, version, lsn, operation)
                for lsn, (kind, cube, item_id, version, operation) in view.changes_since(
                    after_lsn, limit
                )
            ]

        return self._read(read)

    def set_consumer_lsn(self, name: str, lsn: int) -> None:
        """Record that consumer ``name`` has durably processed every change up to ``lsn``."""
        if not name or "\x00" in name:
            raise BadRequest("consumer name must be non-empty without NUL")
        key = b"consumer:" + name.encode()
        self._committer.submit(_Work("side", side=lambda view: view.set_meta_u64(key, lsn)))

    def verify_wal(self) -> dict[str, Any]:
        return _asdict(self.wal.verify())

    # ------------------------------------------------------------------ writes

    def checkpoint(self) -> dict[str, Any]:
        if self._failure is not None:
            raise _copy_error(self._failure)
        result: dict[str, Any] = self._committer.submit(_Work("checkpoint"))
        return result

    def atomic(self, fn: Callable[[Planner], T]) -> T:
        """Run several writes as one atomic, durable step (one WAL record).

        ``fn`` gets a :class:`~memosd.store.planner.Planner` bound to the
        batch's transaction; everything it writes commits together or not at
        all.  Used by jobs so their effects and their success are one commit.
        """
        result: T = self._submit(_Work("write", fn))
        return result

    def atomic_nowait(
        self, fn: Callable[[Planner], Any], on_done: Callable[[Submission[Any]], None]
    ) -> None:
        """Like :meth:`atomic` but never blocks: ``on_done(submission)`` runs in
        the committing thread once the batch is durable (or failed);
        ``submission.outcome()`` returns the result or raises the error.

        For event loops (the daemon's server): no thread hop, no future per
        write; a standby thread leads when nobody else does.  Raises at once
        if the engine is closed or refusing writes.
        """
        self._submit_nowait(_Work("write", fn), on_done)

    def atomic_future(self, fn: Callable[[Planner], T]) -> Future[T]:
        """:meth:`atomic_nowait` with a future (resolved in the committing thread)."""
        future: Future[T] = Future()

        def done(sub: Submission[_Work]) -> None:
            try:
                future.set_result(sub.outcome())
            except BaseException as exc:  # delivered to the awaiting caller
                future.set_exception(exc)

        try:
            self.atomic_nowait(fn, done)
        except MemosError as exc:
            future.set_exception(exc)
        return future

    def create_cube(
        self,
        name: str,
        *,
        owner: str,
        config: CubeConfig | None = None,
        actor: str | None = None,
    ) -> MemCube:
        validate_cube_name(name)
        return self.atomic(lambda p: p.create_cube(name, owner=owner, config=config))

    def drop_cube(self, name: str, *, actor: str | None = None) -> int:
        return self.atomic(lambda p: p.drop_cube(name))

    def add(self, cube: str, text: str, **fields: Any) -> MemoryItem:
        """Add an item (version 1).  Keyword fields as in ``Planner.new_item``.

        Deferred (``EngineSettings.deferred_adds``) unless it carries a
        ``payload``, which may reference blobs: acknowledged once durable,
        applied to LMDB with the next few (see ``_run_adds``).
        """
        result: MemoryItem = self._submit(self._add_work(cube, text, fields))
        return result

    def add_nowait(
        self,
        cube: str,
        text: str,
        fields: dict[str, Any],
        on_done: Callable[[Submission[Any]], None],
    ) -> None:
        """:meth:`add` the way :meth:`atomic_nowait` writes (the daemon's ``add``)."""
        self._submit_nowait(self._add_work(cube, text, fields), on_done)

    def _add_work(self, cube: str, text: str, fields: dict[str, Any]) -> _Work:
        def plan(p: Planner) -> MemoryItem:
            return p.add(cube, text, **fields)

        if self.settings.deferred_adds <= 0 or "payload" in fields:
            return _Work("write", plan)
        return _Work("add", plan, add=(cube, text, fields))

    def update(self, cube: str, item_id: str, **changes: Any) -> MemoryItem:
        """Write a new version with the given fields changed (``Planner.update``)."""
        return self.atomic(lambda p: p.update(cube, item_id, **changes))

    def archive(self, cube: str, item_id: str, **fields: Any) -> MemoryItem:
        return self.atomic(lambda p: p.archive(cube, item_id, **fields))

    def rollback(
        self, cube: str, item_id: str, version: int, *, actor: str | None = None
    ) -> MemoryItem:
        return self.atomic(lambda p: p.rollback(cube, item_id, version, actor=actor))

    def delete(self, cube: str, item_id: str, *, actor: str | None = None) -> MemoryItem:
        return self.atomic(lambda p: p.delete(cube, item_id, actor=actor))

    def purge(
        self, cube: str, item_id: str, *, actor: str | None = None, reason: str | None = None
    ) -> PurgeRecord:
        return self.atomic(lambda p: p.purge(cube, item_id, actor=actor, reason=reason))

    def set_grant(
        self, cube: str, principal: str, level: str | None, *, actor: str | None = None
    ) -> None:
        self.atomic(lambda p: p.set_grant(cube, principal, level))

    def put_token(
        self, name: str, *, token_hash: bytes, principal: str, actor: str | None = None
    ) -> None:
        self.atomic(lambda p: p.put_token(name, token_hash=token_hash, principal=principal))

    def delete_token(self, name: str, *, actor: str | None = None) -> None:
        self.atomic(lambda p: p.delete_token(name))

    def import_cube(
        self,
        export: CubeExport,
        *,
        name: str | None = None,
        owner: str | None = None,
        actor: str | None = None,
    ) -> MemCube:
        """Create a cube from an export, atomically (one WAL record)."""
        target = name or export.cube.name
        validate_cube_name(target)

        def plan(p: Planner) -> MemCube:
            if p.view.has_cube(target):
                raise Conflict(f"cube {target!r} already exists")
            cube = replace(export.cube, name=target, owner=owner or export.cube.owner)
            p.emit(CubePut(cube))
            p.import_items(cube, export.items)
            for record in export.purges:
                p.emit(ItemPurge(replace(record, cube=target)))
            for principal, level in export.grants.items():
                p.set_grant(target, principal, level)
            return cube

        return self.atomic(plan)

    # -- jobs ---------------------------------------------------------------------------

    def submit_job(self, kind: str, **fields: Any) -> jobs.Job:
        """Queue a durable job (``Planner.submit_job``)."""
        return self.atomic(lambda p: p.submit_job(kind, **fields))

    def transition_job(
        self,
        job_id: str,
        change: Callable[[jobs.Job, int], jobs.Job],
        *,
        expected_revision: int | None = None,
    ) -> jobs.Job:
        """Apply a pure state transition from :mod:`memosd.scheduler.jobs`, durably."""
        return self.atomic(
            lambda p: p.transition_job(job_id, change, expected_revision=expected_revision)
        )

    def get_job(self, job_id: str) -> jobs.Job:
        def read(view: StoreView) -> jobs.Job:
            job = view.job(job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            return job

        return self._read(read)

    def list_jobs(
        self,
        *,
        state: str | None = None,
        cube: str | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[jobs.Job]:
        def read(view: StoreView) -> list[jobs.Job]:
            open_only = state in (jobs.JobState.QUEUED, jobs.JobState.RUNNING)
            out = [
                j
                for j in (view.open_jobs() if open_only else view.jobs())
                if (state is None or j.state == state)
                and (cube is None or j.cube == cube)
                and (kind is None or j.kind == kind)
            ]
            return sorted(out, key=lambda j: j.id)[-limit:] if limit else []

        return self._read(read)

    def record_hits(self, cube: str, item_ids: Iterable[str], *, now_us: int | None = None) -> None:
        """Count search hits; flushed to LMDB in batches, never one WAL record per hit."""
        at = now_us if now_us is not None else self._clock()
        with self._usage_lock:
            self._pending_hits.add(cube, item_ids, at)


def _yield_gil() -> None:
    """Let a thread waiting for the GIL run now (between slices of a long flush).

    ``time.sleep(0)`` releases the GIL for long enough (78 us here, 22 us of
    CPU) that a waiting thread (the server's event loop, with a request)
    takes it, instead of waiting out the interpreter's 5 ms switch interval.
    ``os.sched_yield()`` is cheaper but returns before the waiter wakes, and
    the waiter then starves (measured; docs/bench-notes/compare.md).
    """
    time.sleep(0)


def _deferred_version(item: MemoryItem, version: int | None, as_of_us: int | None) -> MemoryItem:
    """``Engine.get`` of a deferred add (its only version, 1)."""
    if version is not None:
        if version != item.version:
            raise NotFound(f"item {item.id} has no version {version} in cube {item.cube!r}")
        return item
    if as_of_us is not None:
        found = versioning.as_of([item], as_of_us)
        if found is None:
            raise NotFound(f"item {item.id} did not exist at {as_of_us} in cube {item.cube!r}")
        return found
    return item


def _event_for(mutation: Mutation, lsn: int) -> ChangeEvent:
    # Item puts first, matched by type only: each class pattern tried costs
    # ~0.4 us, one with positional fields (``__match_args__``) more.
    match mutation:
        case ItemPut():
            item = mutation.item
            kind = "item_deleted" if item.status == Status.DELETED else "item_written"
            return ChangeEvent(
                kind, item.cube, item.id, item.version, lsn, item.provenance.operation
            )
        case CubePut(cube):
            return ChangeEvent("cube_created", cube.name, None, None, lsn)
        case CubeDrop(name):
            return ChangeEvent("cube_dropped", name, None, None, lsn)
        case VersionPut(ref):
            kind = "item_deleted" if ref.status == Status.DELETED else "item_written"
            return ChangeEvent(kind, ref.cube, ref.id, ref.version, lsn, ref.operation)
        case ItemPurge(record):
            return ChangeEvent("item_purged", record.cube, record.id, None, lsn, "purge")
        case GrantSet(cube, _, _):
            return ChangeEvent("acl_changed", cube, None, None, lsn)
        case TokenPut() | TokenDelete():
            return ChangeEvent("acl_changed", None, None, None, lsn)
        case JobPut(job):
            return ChangeEvent("job_changed", job.cube, job.id, job.revision, lsn, job.state)
        case JobDelete(job_id, cube):
            return ChangeEvent("job_deleted", cube, job_id, None, lsn)
    raise TypeError(mutation)  # pragma: no cover


class _ChangeLogWrite:
    """A batch's change log, written into its transaction while the WAL syncs.

    Called by ``WriteAheadLog.append_batch`` with the batch's first LSN
    (the WAL numbers one record per entry of ``logged``, consecutively).
    Never raises: an error is kept in ``error`` for the committer.
    """

    __slots__ = ("_first_lsn", "error", "events", "logged", "view")

    def __init__(self, view: StoreView, logged: list[list[tuple[Mutation, int, bytes]]]) -> None:
        self.view = view
        self.logged = logged
        self.events: list[ChangeEvent] | None = None
        self.error: Exception | None = None
        self._first_lsn = 0

    def __call__(self, first_lsn: int) -> None:
        self._first_lsn = first_lsn
        try:
            self.events = self.make_events()
            _record_logged(self.view, self.events)
        except Exception as exc:
            self.error = exc

    def make_events(self) -> list[ChangeEvent]:
        first = self._first_lsn
        return [
            _event_for(mutation, first + i)
            for i, entries in enumerate(self.logged)
            for mutation, _, _ in entries
        ]


def _record_logged(view: StoreView, events: Sequence[ChangeEvent], *, log_after: int = 0) -> None:
    """Write the change log entries (of LSNs after ``log_after``) and the applied LSN of a batch."""
    entries = []
    index = previous = 0
    for event in events:
        lsn = event.lsn
        index = index + 1 if lsn == previous else 0
        previous = lsn
        if lsn > log_after:
            change = [event.kind, event.cube, event.item_id, event.version, event.operation]
            entries.append((lsn, index, change))
    view.record_changes(entries)
    view.set_applied_lsn(previous)


def _copy_error(exc: MemosError) -> MemosError:
    """A fresh instance per caller, so tracebacks do not pile up on one object."""
    return type(exc)(exc.message, reason=exc.reason, **exc.details)


def _asdict(obj: object) -> dict[str, Any]:
    if hasattr(obj, "__dataclass_fields__"):
        out: dict[str, Any] = {}
        for name in obj.__dataclass_fields__:
            value = getattr(obj, name)
            out[name] = str(value) if isinstance(value, Path) else value
        return out
    if isinstance(obj, dict):
        return dict(obj)
    return {"value": str(obj)}
