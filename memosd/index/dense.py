"""Dense vectors per cube: exact while small, HNSW past a size, switched without downtime.

Vectors are unit length, so inner product is cosine similarity.  They are
stored as float16 by default (``storage="float16"``: faiss's fp16 scalar
quantizer, half the memory of float32 - 768 instead of 1,536 bytes per 384-d
vector; queries stay float32 and distances are computed in float32 from the
decoded components; measured recall@10 vs exact float32 search 0.99+ at 100k
and 1M, docs/bench-notes/retrieval.md) or as float32 (``storage="float32"``).
An index read from a snapshot keeps the storage it was written with until
its next rebuild.

* **flat** - ``IndexIDMap2(IndexFlatIP)`` (float16: ``IndexScalarQuantizer``
  with ``QT_fp16``): exact over the stored vectors; removal is real
  (``remove_ids``).  A single 384-d query costs about 0.07 ms per 1k vectors
  on this machine (7 ms at 100k), an HNSW one 0.1-0.3 ms, so past
  ``hnsw_threshold`` (4k by default) live vectors we switch.
* **hnsw** - ``IndexIDMap2(IndexHNSWFlat(M))`` (float16: ``IndexHNSWSQ`` with
  ``QT_fp16``): approximate, sub-millisecond;
  faiss's HNSW cannot delete, so a removed label becomes a *tombstone*: it
  stays in the graph and is filtered out of results (searches over-fetch).
  When tombstones pass ``rebuild_ratio`` of the graph, a fresh graph is built
  from the live vectors.

Switching (flat -> hnsw, or hnsw -> fresh hnsw) never blocks searches: a
background thread copies the live vectors, builds the new graph without the
lock, while every ``add``/``remove`` meanwhile is applied to the current index
*and* logged; under the lock the log is replayed onto the new graph and the
two are swapped.  Labels are never reused for a different vector (the cube
allocates a new label per item version), so a stale tombstone cannot alias a
live item.

Thread safety: one lock per index around every faiss call (faiss indexes are
not safe for concurrent add and search); faiss releases the GIL while
searching, so searches in different cubes run in parallel.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import faiss
import numpy as np
import numpy.typing as npt
import structlog

from memosd.errors import BadRequest, CorruptionError

__all__ = ["DenseIndex", "WouldBlock"]

_log = structlog.get_logger("memosd.index.dense")

Labels = npt.NDArray[np.int64]
_FLAT: Final = "flat"
_HNSW: Final = "hnsw"
#: Vectors added during a background build that are replayed onto the new
#: graph under the lock, with the swap; larger backlogs are replayed before
#: it, in at most _REPLAY_ROUNDS rounds.
_REPLAY_UNDER_LOCK: Final = 512
_REPLAY_ROUNDS: Final = 8
#: Vector storage choices (``DenseIndex(storage=...)``).
STORAGES: Final = ("float16", "float32")


class WouldBlock(Exception):
    """A non-blocking search found an index lock held (by the indexer or a swap).

    Raised only when the caller asked for ``blocking=False`` (a search on the
    daemon's event loop, which must not wait): it retries in a worker thread.
    """


def _replay(index: Any, pending: list[tuple[str, Labels, npt.NDArray[np.float32] | None]]) -> int:
    """Apply logged adds to ``index``; removes are tombstones (the live set has them)."""
    for op, ids, vecs in pending:
        if op == "add":
            index.add_with_ids(vecs, ids)
    return len(pending)


def _as_labels(labels: Iterable[int] | npt.NDArray[Any]) -> Labels:
    return np.ascontiguousarray(np.fromiter(labels, dtype=np.int64), dtype=np.int64)


class DenseIndex:
    """One cube's vectors.  See the module docstring."""

    def __init__(
        self,
        dim: int,
        *,
        hnsw_threshold: int = 4_000,
        hnsw_m: int = 32,
        ef_construction: int = 128,
        ef_search: int = 128,
        rebuild_ratio: float = 0.25,
        build_threads: int = 1,
        background: bool = True,
        storage: str = "float16",
    ) -> None:
        if storage not in STORAGES:
            raise ValueError(f"vector storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.rebuild_ratio = rebuild_ratio
        self.build_threads = build_threads
        self.background = background
        self._lock = threading.Lock()
        self._index: Any = faiss.IndexIDMap2(self._new_flat())
        self._kind = _FLAT
        self._live: set[int] = set()
        self._builder: threading.Thread | None = None
        self._pending: list[tuple[str, Labels, npt.NDArray[np.float32] | None]] | None = None
        self.builds = 0
        self.last_build_s: float | None = None

    # --- properties -------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self._kind

    def __len__(self) -> int:
        return len(self._live)

    @property
    def tombstones(self) -> int:
        return int(self._index.ntotal) - len(self._live)

    @property
    def building(self) -> bool:
        return self._builder is not None

    def __contains__(self, label: object) -> bool:
        return label in self._live

    # --- mutation -----------------------------------------------------------------------

    def _check_vectors(self, vectors: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise BadRequest(
                f"vectors of shape {tuple(vectors.shape)} do not fit this cube's "
                f"{self.dim}-dimensional index",
                reason="embedding_mismatch",
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def add(self, labels: Iterable[int], vectors: npt.NDArray[Any]) -> None:
        """Add vectors under new labels (a label already live is replaced)."""
        ids = _as_labels(labels)
        vecs = self._check_vectors(vectors)
        if len(ids) != len(vecs):
            raise ValueError("labels and vectors differ in length")
        if not len(ids):
            return
        with self._lock:
            replaced = [int(x) for x in ids if int(x) in self._live]
            if replaced:
                self._remove_locked(_as_labels(replaced))
            self._index.add_with_ids(vecs, ids)
            self._live.update(int(x) for x in ids)
            if self._pending is not None:
                self._pending.append(("add", ids, vecs))
            self._maybe_rebuild_locked()

    def remove(self, labels: Iterable[int]) -> int:
        """Forget labels; returns how many were live."""
        with self._lock:
            ids = _as_labels(x for x in labels if x in self._live)
            if not len(ids):
                return 0
            self._remove_locked(ids)
            self._maybe_rebuild_locked()
            return len(ids)

    def _remove_locked(self, ids: Labels) -> None:
        self._live.difference_update(int(x) for x in ids)
        if self._kind == _FLAT:
            self._index.remove_ids(ids)
        if self._pending is not None:
            self._pending.append(("remove", ids, None))

    # --- switching ----------------------------------------------------------------------

    def _maybe_rebuild_locked(self) -> None:
        if self._builder is not None:
            return
        if self._kind == _FLAT:
            due = len(self._live) >= self.hnsw_threshold
        else:
            total = int(self._index.ntotal)
            due = total > 0 and self.tombstones > self.rebuild_ratio * total
        if not due:
            return
        labels, vectors = self._live_vectors_locked()
        self._pending = []
        if self.background:
            self._builder = threading.Thread(
                target=self._build_and_swap,
                args=(labels, vectors),
                name="memosd-hnsw-build",
                daemon=True,
            )
            self._builder.start()
        else:
            self._builder = threading.current_thread()
            self._lock.release()
            try:
                self._build_and_swap(labels, vectors)
            finally:
                self._lock.acquire()

    def _live_vectors_locked(self) -> tuple[Labels, npt.NDArray[np.float32]]:
        total = int(self._index.ntotal)
        if total == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, total)
        live = self._live
        keep = np.fromiter((x in live for x in ids.tolist()), dtype=bool, count=len(ids))
        if keep.all():  # the usual flat -> HNSW switch: no second copy of every vector
            return np.ascontiguousarray(ids), np.ascontiguousarray(vectors, dtype=np.float32)
        return np.ascontiguousarray(ids[keep]), np.ascontiguousarray(vectors[keep])

    def _new_flat(self) -> Any:
        if self.storage == "float16":
            return faiss.IndexScalarQuantizer(
                self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
        return faiss.IndexFlatIP(self.dim)

    def _new_hnsw(self) -> Any:
        inner: Any
        if self.storage == "float16":
            inner = faiss.IndexHNSWSQ(  # the stubs say ScalarQuantizer; faiss takes the qtype
                self.dim,
                faiss.ScalarQuantizer.QT_fp16,  # type: ignore[arg-type]
                self.hnsw_m,
                faiss.METRIC_INNER_PRODUCT,
            )
        else:
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.ef_construction
        inner.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(inner)

    def _build_and_swap(self, labels: Labels, vectors: npt.NDArray[np.float32]) -> None:
        started = time.monotonic()
        try:
            faiss.omp_set_num_threads(max(1, self.build_threads))
            fresh = self._new_hnsw()
            if len(labels):
                fresh.add_with_ids(vectors, labels)
        except Exception:
            self._abandon_build()
            return
        # Writes that arrived during the build are replayed onto the new graph.
        # A long build collects many (a 1M-item build takes minutes): replay them
        # in rounds outside the lock, searches going on, until one round is
        # short enough to finish under the lock together with the swap.
        replayed = 0
        for round_ in itertools.count():
            with self._lock:
                pending = self._pending or []
                self._pending = []
                backlog = sum(len(ids) for op, ids, _ in pending if op == "add")
                # (A writer outpacing the replay cannot hold the swap off for long.)
                if backlog <= _REPLAY_UNDER_LOCK or round_ >= _REPLAY_ROUNDS:
                    replayed += _replay(fresh, pending)
                    self._swap_locked(fresh, started)
                    break
            try:
                replayed += _replay(fresh, pending)
            except Exception:
                self._abandon_build()
                return
        _log.info(
            "dense index switched to HNSW",
            vectors=len(labels),
            replayed_ops=replayed,
            seconds=self.last_build_s,
        )

    def _abandon_build(self) -> None:
        """A failed build: log it, stop logging writes for it, keep the current index."""
        _log.exception("HNSW build failed; staying on the current index")
        with self._lock:
            self._pending = None
            self._builder = None

    def _swap_locked(self, fresh: Any, started: float) -> None:
        self._index = fresh
        self._kind = _HNSW
        self._pending = None
        self._builder = None
        self.builds += 1
        self.last_build_s = round(time.monotonic() - started, 3)

    def wait_build(self, timeout: float | None = None) -> bool:
        """Block until no background build runs; False on timeout."""
        builder = self._builder
        if builder is None or builder is threading.current_thread():
            return True
        builder.join(timeout)
        return not builder.is_alive()

    def vectors(self, labels: Sequence[int]) -> dict[int, npt.NDArray[np.float32]]:
        """The stored vectors of those ``labels`` that are live (float16 storage: decoded)."""
        with self._lock:
            live = [label for label in labels if label in self._live]
            if not live:
                return {}
            out = self._index.reconstruct_batch(np.asarray(live, dtype=np.int64))
        rows = np.ascontiguousarray(out, dtype=np.float32)
        return dict(zip(live, rows, strict=True))

    # --- search -------------------------------------------------------------------------

    def search(
        self, query: npt.NDArray[Any], k: int, *, blocking: bool = True
    ) -> list[tuple[int, float]]:
        """The best ``k`` live ``(label, similarity)`` for one query vector, best first.

        ``blocking=False``: :class:`WouldBlock` instead of waiting for the lock.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise BadRequest(
                f"query vector has {q.shape[1]} dimensions, this cube's index {self.dim}",
                reason="embedding_mismatch",
            )
        faiss.omp_set_num_threads(1)
        if not self._lock.acquire(blocking=blocking):
            raise WouldBlock(self.dim)
        try:
            return self._search_locked(q, k)
        finally:
            self._lock.release()

    def _search_locked(self, q: npt.NDArray[np.float32], k: int) -> list[tuple[int, float]]:
        total = int(self._index.ntotal)
        if total == 0 or k <= 0:
            return []
        if self._kind == _FLAT:
            fetch = min(total, k)  # removes are real in a flat index: no tombstones
        else:
            # The graph still holds the tombstones of removed labels: ask for
            # enough to expect k live ones (plus a margin), and more below if
            # that falls short.  Asking for far more than k would also raise
            # efSearch, which is what a search costs.
            dead = min(0.9, (total - len(self._live)) / total)
            fetch = min(total, int(k / (1.0 - dead)) + 16)
        while True:
            if self._kind == _HNSW:
                params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                    efSearch=max(self.ef_search, fetch)
                )
                sims, ids = self._index.search(q, fetch, params=params)
            else:
                sims, ids = self._index.search(q, fetch)
            live = self._live
            out = [
                (i, s)
                for s, i in zip(sims[0].tolist(), ids[0].tolist(), strict=True)
                if i >= 0 and i in live
            ]
            if len(out) >= k or fetch >= total:
                return out[:k]
            fetch = min(total, fetch * 4)

    # --- persistence (used by memosd.index.snapshot) ------------------------------------

    def write(self, path: str) -> None:
        """Write the faiss index to ``path`` (the caller fsyncs and renames).

        Only the index's single writer may call this (the indexer's worker,
        between batches): the index is then only read meanwhile, so it is
        written without the lock and searches go on (a 1M-item index takes
        seconds).  A background build swapping in a new graph meanwhile
        leaves this one intact and complete.
        """
        with self._lock:
            index = self._index
        faiss.write_index(index, path)

    def live_labels(self) -> Labels:
        with self._lock:
            return _as_labels(sorted(self._live))

    @classmethod
    def load(cls, path: str, live: Iterable[int], **settings: Any) -> DenseIndex:
        """An index read from ``path`` whose live labels are ``live`` (others: tombstones)."""
        index: Any = faiss.read_index(path)
        if not isinstance(index, faiss.IndexIDMap2):
            raise CorruptionError(f"{path} does not hold an IndexIDMap2")
        inner: Any = faiss.downcast_index(index.index)
        dense = cls(int(index.d), **settings)
        dense._index = index
        dense._kind = _HNSW if isinstance(inner, faiss.IndexHNSW) else _FLAT
        if dense._kind == _HNSW:
            inner.hnsw.efSearch = dense.ef_search
        dense._live = {int(x) for x in live}
        with dense._lock:
            dense._maybe_rebuild_locked()
        return dense
