"""The background indexer: engine change events in, searchable cubes out.

::

    engine writer thread ──listener──▶ SimpleQueue ──▶ worker thread
        (after the ack; only a put)                     take events (wait <= batch_wait_s)
                                                        read each touched item's latest version
                                                        embed new texts of all cubes together
                                                          (batch_size per call)
                                                        update BM25 + faiss per cube
                                                        indexed_lsn = last event's LSN; notify
                                                        snapshot when due

Writes never wait for embedding: the listener only enqueues.  Processing an
event is *reconciling* its item against the engine's latest state (index the
latest active version, or remove the item) rather than replaying a diff, so it
is idempotent and order-insensitive within a batch, and replaying events the
index already reflects costs an LMDB read, not an embedding.

Start-up (in the worker, so ``start()`` returns at once):

1. load the snapshot (:mod:`memosd.index.snapshot`); cubes whose files fail
   their checksums are rebuilt from the engine;
2. no usable snapshot at all, or an engine without ``changes_since`` - every
   cube is rebuilt from ``engine.list_items`` (progress in the log and in
   :meth:`Indexer.status`); ``indexed_lsn`` becomes the engine's applied LSN
   read before the rebuild began (the listener was attached before, so later
   changes are queued, and earlier ones are in what the rebuild reads);
3. otherwise catch up with ``engine.changes_since(snapshot_lsn)``, page by
   page - only items changed since the snapshot are read and re-embedded;
4. reconcile the set of cubes with the engine's, then serve queued events
   (those at or below ``indexed_lsn`` are skipped).

After each durable snapshot the indexer calls
``engine.set_consumer_lsn("index", lsn)`` so the engine may prune its change
log below it.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import structlog

from memosd.embed import Embedder
from memosd.errors import Conflict, MemosError, NotFound, Unavailable
from memosd.index.cube import CubeIndex, FormText, embedding_mismatch, indexed_text
from memosd.index.dense import DenseIndex
from memosd.index.settings import IndexSettings
from memosd.index.snapshot import LoadedSnapshot, load_snapshot, write_snapshot
from memosd.memcube import versioning
from memosd.memcube.model import MemoryItem

__all__ = ["CONSUMER_NAME", "Indexer"]

#: Texts per embedding worker below which a backlog is not split.
_MIN_SPLIT: Final = 32

_log = structlog.get_logger("memosd.index")

CONSUMER_NAME: Final = "index"
_ITEM_EVENTS: Final = frozenset({"item_written", "item_deleted", "item_purged"})
_REBUILD_PAGE: Final = 512
_CATCH_UP_PAGE: Final = 10_000
# (cube, item id, version, indexed text, provenance session)
_Job = tuple[CubeIndex, str, int, str, str | None]
_PROGRESS_EVERY_S: Final = 5.0


class Indexer:
    """Keeps every cube's :class:`CubeIndex` in step with the engine."""

    def __init__(
        self,
        engine: Any,
        root: Path,
        embedder: Embedder,
        settings: IndexSettings,
        form_text: FormText | None = None,
    ) -> None:
        self.engine = engine
        self.root = root
        self.embedder = embedder
        self.settings = settings
        self.form_text = form_text
        self._dense_settings = settings.dense_settings()
        self.cubes: dict[str, CubeIndex] = {}
        self._cubes_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self.indexed_lsn = 0
        self._startup_lsn = 0
        self.state = "stopped"
        self.progress: dict[str, Any] = {}
        self.last_error: str | None = None
        self._accepting = False
        self._listening = False
        self._stop = threading.Event()
        self._snapshot_requested = threading.Event()
        self._snapshot_done = threading.Condition()
        self._snapshot_generation = 0
        self._thread: threading.Thread | None = None
        self._entries: dict[str, dict[str, Any]] = {}
        self.snapshot_lsn: int | None = None
        self.snapshot_seconds: float | None = None
        self._last_snapshot = time.monotonic()
        self._changes_since_snapshot = 0
        self.embed_calls = 0
        self.texts_embedded = 0
        self._stats_lock = threading.Lock()
        self._embed_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.events_processed = 0
        self.texts_unchanged = 0

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting = True
        if not self._listening:
            self.engine.add_listener(self._on_change)
            self._listening = True
        self.state = "starting"
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memosd-indexer", daemon=True)
        self._thread.start()

    def stop(self, *, snapshot: bool = True) -> None:
        """Process what is queued, stop the worker, then write a final snapshot."""
        thread = self._thread
        if thread is None:
            return
        self._accepting = False
        self._stop.set()
        thread.join()
        self._thread = None
        if self._embed_pool is not None:
            self._embed_pool.shutdown()
            self._embed_pool = None
        if snapshot and self.state != "error":
            self._write_snapshot()
        self.state = "stopped"
        with self._cond:
            self._cond.notify_all()

    def _on_change(self, event: Any) -> None:
        # Runs on the engine's writer thread: enqueue only.
        if self._accepting:
            self._queue.put(event)

    # --- waiting ------------------------------------------------------------------

    def wait_indexed(self, lsn: int, timeout: float | None) -> bool:
        """Block until every change up to ``lsn`` is searchable; False on timeout."""
        with self._cond:
            return (
                self._cond.wait_for(
                    lambda: self.indexed_lsn >= lsn or self.state in ("stopped", "error"),
                    timeout,
                )
                and self.indexed_lsn >= lsn
            )

    def wait_ready(self, timeout: float | None) -> bool:
        with self._cond:
            return (
                self._cond.wait_for(lambda: self.state in ("ready", "stopped", "error"), timeout)
                and self.state == "ready"
            )

    def _advance(self, lsn: int) -> None:
        with self._cond:
            self.indexed_lsn = max(self.indexed_lsn, lsn)
            self._cond.notify_all()

    def _set_state(self, state: str) -> None:
        with self._cond:
            self.state = state
            self._cond.notify_all()

    # --- the worker -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._startup()
            self._startup_lsn = self.indexed_lsn
            self._set_state("ready")
            self._serve()
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            _log.exception("indexer stopped by an error")
            self._set_state("error")

    def engine_lsn(self) -> int:
        lsn = getattr(self.engine, "applied_lsn", None)
        if isinstance(lsn, int):
            return lsn
        return int(self.engine.status()["applied_lsn"])

    def _startup(self) -> None:
        started = time.monotonic()
        self._set_state("loading")
        snap = load_snapshot(
            self.root,
            model=self.embedder.model_name,
            dim=self.embedder.dim,
            dense_settings=self._dense_settings,
        )
        if snap is not None and snap.lsn > self.engine_lsn():
            _log.warning(
                "index snapshot is ahead of the engine (restored data?); full rebuild",
                snapshot_lsn=snap.lsn,
                engine_lsn=self.engine_lsn(),
            )
            snap = None
        if snap is not None and hasattr(self.engine, "changes_since"):
            try:
                self._load_and_catch_up(snap)
            except Conflict as exc:
                if exc.reason != "changes_pruned":
                    raise
                _log.warning(
                    "engine change log no longer reaches the index snapshot; full rebuild",
                    snapshot_lsn=snap.lsn,
                )
                with self._cubes_lock:
                    self.cubes.clear()
                self._entries = {}
                snap = None
        if snap is None or not hasattr(self.engine, "changes_since"):
            self._rebuild_all()
        self._reconcile_cube_set()
        self.progress = {}
        _log.info(
            "index ready",
            indexed_lsn=self.indexed_lsn,
            cubes=len(self.cubes),
            seconds=round(time.monotonic() - started, 3),
        )

    def _rebuild_all(self) -> None:
        start_lsn = self.engine_lsn()
        self._set_state("rebuilding")
        names = [c.name for c in self.engine.list_cubes()]
        _log.info("index rebuild from the engine", cubes=len(names), lsn=start_lsn)
        for i, name in enumerate(names):
            self._rebuild_cube(name, cubes_left=len(names) - i - 1)
        with self._cond:
            self.indexed_lsn = start_lsn
            self._cond.notify_all()

    def _load_and_catch_up(self, snap: LoadedSnapshot) -> None:
        with self._cubes_lock:
            self.cubes.update(snap.cubes)
        self._entries = dict(snap.entries)
        self.snapshot_lsn = snap.lsn
        self._advance(snap.lsn)
        for cube in snap.cubes.values():
            self._check_config(cube)
        # Fail early (before rebuilding anything) if the log was pruned.
        self.engine.changes_since(snap.lsn, limit=1)
        if snap.failed:
            self._set_state("rebuilding")
            for i, name in enumerate(snap.failed):
                self._rebuild_cube(name, cubes_left=len(snap.failed) - i - 1)
        self._set_state("catching_up")
        replayed = 0
        while True:
            events = self.engine.changes_since(self.indexed_lsn, limit=_CATCH_UP_PAGE)
            if not events:
                break
            self._apply(events)
            replayed += len(events)
            self._advance(events[-1].lsn)
        _log.info(
            "index loaded from snapshot",
            snapshot_lsn=snap.lsn,
            replayed_events=replayed,
            rebuilt_cubes=len(snap.failed),
            texts_embedded=self.texts_embedded,
        )

    def _serve(self) -> None:
        wait = self.settings.batch_wait_s
        max_events = self.settings.batch_size * 16
        while True:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return
                self._maybe_snapshot()
                continue
            batch = [first]
            deadline = time.monotonic() + wait
            while len(batch) < max_events:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            # Events up to the start-up LSN were seen by the catch-up or the
            # rebuild (queued meanwhile); later ones are all new.  Not compared
            # with indexed_lsn: one atomic write may carry several events with
            # the same LSN, and a batch boundary may fall between them.
            fresh = [e for e in batch if e.lsn > self._startup_lsn]
            if fresh:
                self._apply_retrying(fresh)
                self._advance(max(e.lsn for e in fresh))
            self._maybe_snapshot()

    def _apply_retrying(self, events: list[Any]) -> None:
        delay = 0.1
        while True:
            try:
                self._apply(events)
                self.last_error = None
                return
            except Unavailable:
                if self._stop.is_set():
                    return
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                _log.exception("indexing a batch failed; retrying", events=len(events))
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 5.0)

    # --- applying changes -----------------------------------------------------------

    def _apply(self, events: Sequence[Any]) -> None:
        pending: dict[tuple[str, str], None] = {}
        for event in events:
            if event.kind in _ITEM_EVENTS and event.cube and event.item_id:
                pending[(event.cube, event.item_id)] = None
            elif event.kind == "cube_dropped" and event.cube:
                self._flush(pending)
                with self._cubes_lock:
                    self.cubes.pop(event.cube, None)
            elif event.kind == "cube_created" and event.cube:
                self._flush(pending)
                self._ensure_cube(event.cube)
        self._flush(pending)
        self.events_processed += len(events)
        self._changes_since_snapshot += len(events)

    def _new_cube_index(self, name: str) -> CubeIndex | None:
        try:
            cube = self.engine.get_cube(name)
        except NotFound:
            return None
        mismatch = embedding_mismatch(
            name,
            cube.config.embedding_model,
            cube.config.embedding_dim,
            self.embedder.model_name,
            self.embedder.dim,
        )
        if mismatch is not None:
            _log.warning("cube embedding config differs from the embedder", cube=name)
            return CubeIndex(name, dense=None, mismatch=mismatch)
        return CubeIndex(name, dense=DenseIndex(self.embedder.dim, **self._dense_settings))

    def _check_config(self, cube: CubeIndex) -> None:
        """Align a snapshot-loaded cube with its current config (mismatch or not)."""
        fresh = self._new_cube_index(cube.name)
        if fresh is None:
            return
        if fresh.mismatch is not None:
            cube.mismatch = fresh.mismatch
            cube.dense = None

    def _ensure_cube(self, name: str) -> CubeIndex | None:
        with self._cubes_lock:
            found = self.cubes.get(name)
        if found is not None:
            return found
        created = self._new_cube_index(name)
        if created is not None:
            with self._cubes_lock:
                self.cubes[name] = created
        return created

    def _flush(self, pending: dict[tuple[str, str], None]) -> None:
        if not pending:
            return
        jobs: list[_Job] = []
        for cube_name, item_id in pending:
            cube = self._ensure_cube(cube_name)
            if cube is None:
                continue
            try:
                item = self.engine.get(cube_name, item_id)
            except NotFound:
                cube.remove(item_id)
                continue
            text = self._text(item) if item.status == "active" else None
            if text is None:
                cube.remove(item_id)
                continue
            if cube.version_of(item_id) == item.version:
                continue
            session = self._session(cube, item)
            if cube.advance(item_id, item.version, text, session):
                self.texts_unchanged += 1  # a tier move or metadata update: no re-embedding
                continue
            jobs.append((cube, item_id, item.version, text, session))
        pending.clear()
        self._index_jobs(jobs)

    def _session(self, cube: CubeIndex, item: MemoryItem) -> str | None:
        """The conversation ``item`` belongs to (see :class:`CubeIndex`).

        A version written outside any session keeps an indexed item where it
        is; an item the index does not hold (a rebuild, a reactivated item)
        takes the latest session its history names.
        """
        session = item.provenance.session
        if session is not None or item.version == 1 or cube.version_of(item.id) is not None:
            return session
        try:
            return versioning.conversation(self.engine.history(cube.name, item.id))
        except NotFound:
            return None

    def _text(self, item: MemoryItem) -> str | None:
        return indexed_text(item, self.settings.context_key, self.form_text)

    def _embed(self, texts: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
        """Embed ``texts`` in length-sorted batches, over ``embed_workers`` threads.

        A batch is padded to its longest text, so batches are cut from the
        texts sorted by length (tokens, if the embedder counts them): in
        arrival order, LoCoMo turns in batches of 64 are 58% padding tokens
        (17% when sorted by characters, ~1% by tokens), and sorted batches
        embed about twice as many texts per CPU-second.  The batches go to the workers one
        at a time (whichever is free takes the next), and each vector is
        written back to its text's row, so the result keeps the input's
        order.  Only a backlog of at least ``_MIN_SPLIT`` texts per worker is
        split: below that the second model instance costs more than it saves.
        """
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        size = self.settings.batch_size
        lengths = self._lengths(texts)
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        out = np.empty((len(texts), self.embedder.dim), dtype=np.float32)
        workers = min(self.settings.embed_workers, len(texts) // _MIN_SPLIT, len(batches))
        if workers <= 1:
            for rows in batches:
                out[rows] = self._embed_batch([texts[i] for i in rows])
            return out
        taken = iter(batches)
        take_lock = threading.Lock()
        failed = threading.Event()

        def work() -> None:
            while not failed.is_set():
                with take_lock:
                    rows = next(taken, None)
                if rows is None:
                    return
                try:
                    out[rows] = self._embed_batch([texts[i] for i in rows])
                except BaseException:
                    failed.set()  # the other workers stop taking batches
                    raise

        pool = self._embed_pool
        if pool is None:
            pool = self._embed_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.settings.embed_workers - 1,
                thread_name_prefix="memosd-embed",
            )
        # The indexer's thread is one of the workers.
        futures = [pool.submit(work) for _ in range(workers - 1)]
        try:
            work()
        finally:
            for future in futures:
                future.result()
        return out

    def _lengths(self, texts: list[str]) -> list[int]:
        """Sort keys for batching: the embedder's token counts if it has them, else characters."""
        if len(texts) > 1:
            token_counts = getattr(self.embedder, "token_counts", None)
            if token_counts is not None:
                counts: list[int] = token_counts(texts)
                return counts
        return [len(t) for t in texts]

    def _embed_batch(self, texts: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
        vectors = self.embedder.embed(texts)
        with self._stats_lock:
            self.embed_calls += 1
            self.texts_embedded += len(texts)
        return vectors

    def _index_jobs(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        need = [j for j in jobs if j[0].dense is not None]
        vectors = self._embed([j[3] for j in need])
        row = {id(j): i for i, j in enumerate(need)}
        by_cube: dict[
            str, tuple[CubeIndex, list[tuple[str, int, str]], list[int], list[str | None]]
        ] = {}
        for job in jobs:
            cube, item_id, version, text, session = job
            entry = by_cube.setdefault(cube.name, (cube, [], [], []))
            entry[1].append((item_id, version, text))
            entry[3].append(session)
            if id(job) in row:
                entry[2].append(row[id(job)])
        for cube, entries, rows, sessions in by_cube.values():
            cube.upsert_many(entries, vectors[rows] if cube.dense is not None else None, sessions)

    def _rebuild_cube(self, name: str, *, cubes_left: int = 0) -> None:
        fresh = self._new_cube_index(name)
        if fresh is None:
            with self._cubes_lock:
                self.cubes.pop(name, None)
            return
        try:
            total = int(self.engine.count_items(name).get("active", 0))
        except NotFound:
            return
        started = last_log = time.monotonic()
        done = 0
        after: str | None = None
        self.progress = {"cube": name, "done": 0, "total": total, "cubes_left": cubes_left}
        while True:
            try:
                page = self.engine.list_items(
                    name, status="active", limit=_REBUILD_PAGE, after=after
                )
            except NotFound:
                return  # dropped meanwhile; its drop event follows
            jobs = [
                (fresh, it.id, it.version, text, self._session(fresh, it))
                for it in page
                if fresh.version_of(it.id) != it.version and (text := self._text(it)) is not None
            ]
            self._index_jobs(jobs)
            done += len(page)
            self.progress = {"cube": name, "done": done, "total": total, "cubes_left": cubes_left}
            now = time.monotonic()
            if now - last_log >= _PROGRESS_EVERY_S:
                last_log = now
                _log.info("index rebuild progress", cube=name, done=done, total=total)
            if len(page) < _REBUILD_PAGE:
                break
            after = page[-1].id
        with self._cubes_lock:
            self.cubes[name] = fresh
        _log.info(
            "index rebuilt",
            cube=name,
            items=len(fresh),
            seconds=round(time.monotonic() - started, 3),
        )

    def _reconcile_cube_set(self) -> None:
        names = {c.name for c in self.engine.list_cubes()}
        with self._cubes_lock:
            extra = set(self.cubes) - names
            for name in extra:
                del self.cubes[name]
            missing = names - set(self.cubes)
        for name in sorted(missing):
            self._rebuild_cube(name)

    # --- snapshots ----------------------------------------------------------------

    def request_snapshot(self, timeout: float | None = None) -> bool:
        """Ask the worker for a snapshot now and wait for it; False on timeout."""
        if self._thread is None:
            self._write_snapshot()
            return True
        with self._snapshot_done:
            generation = self._snapshot_generation
            self._snapshot_requested.set()
            return self._snapshot_done.wait_for(
                lambda: self._snapshot_generation > generation or self._thread is None, timeout
            )

    def _maybe_snapshot(self) -> None:
        if self._snapshot_requested.is_set():
            self._snapshot_requested.clear()
            self._write_snapshot()
            return
        interval = self.settings.snapshot_interval_s
        if interval <= 0 or time.monotonic() - self._last_snapshot < interval:
            return
        if self._changes_since_snapshot >= self.settings.snapshot_min_changes:
            self._write_snapshot()

    def _write_snapshot(self) -> None:
        started = time.monotonic()
        lsn = self.indexed_lsn
        with self._cubes_lock:
            cubes = dict(self.cubes)
        try:
            self._entries = write_snapshot(
                self.root,
                cubes,
                lsn=lsn,
                model=self.embedder.model_name,
                dim=self.embedder.dim,
                previous=self._entries,
            )
        except OSError as exc:
            self.last_error = f"snapshot failed: {exc}"
            _log.error("index snapshot failed", error=str(exc))
            return
        finally:
            self._last_snapshot = time.monotonic()
        self._changes_since_snapshot = 0
        self.snapshot_lsn = lsn
        self.snapshot_seconds = round(time.monotonic() - started, 3)
        set_consumer = getattr(self.engine, "set_consumer_lsn", None)
        if set_consumer is not None:
            try:
                set_consumer(CONSUMER_NAME, lsn)
            except MemosError as exc:
                _log.warning("could not record the index consumer LSN", error=str(exc))
        _log.info(
            "index snapshot written", lsn=lsn, cubes=len(cubes), seconds=self.snapshot_seconds
        )
        with self._snapshot_done:
            self._snapshot_generation += 1
            self._snapshot_done.notify_all()

    # --- status -------------------------------------------------------------------

    def cube(self, name: str) -> CubeIndex | None:
        with self._cubes_lock:
            return self.cubes.get(name)

    def status(self) -> dict[str, Any]:
        with self._cubes_lock:
            cubes = dict(self.cubes)
        return {
            "state": self.state,
            "indexed_lsn": self.indexed_lsn,
            "queued_events": self._queue.qsize(),
            "rebuild": dict(self.progress) if self.progress else None,
            "snapshot_lsn": self.snapshot_lsn,
            "snapshot_seconds": self.snapshot_seconds,
            "embed_calls": self.embed_calls,
            "texts_embedded": self.texts_embedded,
            "events_processed": self.events_processed,
            "texts_unchanged": self.texts_unchanged,
            "last_error": self.last_error,
            "cubes": {name: cube.stats() for name, cube in sorted(cubes.items())},
        }
