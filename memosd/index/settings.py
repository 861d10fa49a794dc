"""Settings of the search indexes (one frozen dataclass, documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memosd.errors import BadRequest

__all__ = ["IndexSettings"]


@dataclass(frozen=True, slots=True)
class IndexSettings:
    """Tuning of the per-cube indexes, the indexer and hybrid search.

    Dense index:
      ``hnsw_threshold`` (4_000) live vectors in a cube before it switches from
      exact flat search to HNSW: a flat fp16 384-d query costs ~0.07 ms per
      1k vectors here (0.29 ms at 4k, 1.2 ms at 16k), an HNSW one 0.1-0.3 ms
      at recall@10 0.99+ from 1k to 16k, so past ~4k the exact scan costs
      more than twice the graph search; ``hnsw_m`` (32) graph degree; ``ef_construction`` (128);
      ``ef_search`` (128) - recall@10 >= 0.95 of exact on clustered data at 100k;
      ``hnsw_rebuild_ratio`` (0.25) tombstones / graph size that triggers a
      fresh graph; ``build_threads`` (1) OpenMP threads of a background build;
      ``hnsw_background`` (True) build off the indexer thread (False: inline,
      for deterministic tests); ``vector_storage`` ("float16") how vectors
      are stored: "float16" (half the memory; recall@10 0.99+ of exact
      float32 search at 100k and 1M here) or "float32".

    Embedding:
      ``embed_threads`` (1) torch threads of the default MiniLM embedder.
      One thread is the default on purpose: on a busy 2-core machine torch and
      OpenMP with 2 threads collapse (measured: MiniLM 5.7 texts/s with 2
      threads vs 88 with 1 while other processes used the CPU).
      ``embed_workers`` (2) embedding calls the indexer runs at once when it
      has a backlog (each on its own model instance with one torch thread:
      independent threads, no OpenMP barrier to collapse); 1 embeds one batch
      at a time.  The embedder keeps one more instance for query embeddings.

    Indexer:
      ``batch_size`` (64) texts per embedding call (MiniLM is ~10x faster per
      text on batches); ``batch_wait_s`` (0.005) how long the worker waits to
      fill a batch; ``snapshot_interval_s`` (60.0) seconds between snapshots of
      changed cubes (0 disables periodic snapshots; close() always writes one);
      ``snapshot_min_changes`` (1) changes needed before a periodic snapshot;
      ``wait_timeout_s`` (10.0) longest a ``wait_for_lsn`` search waits.

    Search:
      ``fusion`` ("score") how hybrid search fuses the dense and lexical lists:
      "score" (weighted sum of scaled scores, see memosd.index.fusion) or
      "rrf" (reciprocal rank fusion); ``rrf_k`` (60.0) the RRF constant;
      ``dense_weight`` (0.3) and ``lexical_weight`` (0.7) the lists' weights
      in either fusion (tuned on LoCoMo; see docs/retrieval.md);
      ``context_key`` ("context") if an item's metadata holds a string under
      this key, it is indexed with the text (BM25 and embedding) but not
      returned as part of it - e.g. the previous conversation turn;
      ``neighbour_weight`` (0.3) conversation smoothing: a candidate's
      score gains this fraction of the best score among the items written
      just before and after it in the same session (``provenance.session``)
      - evidence often sits next to the turn a question matches (LoCoMo
      R@10 0.740 -> 0.755; docs/retrieval.md); 0 turns it off;
      ``candidates`` (100) candidates taken from each list before fusion
      (more are fetched if filters remove too many; a dense- or lexical-only
      search that nothing re-ranks or drops takes just k); ``max_k`` (1000);
      ``query_cache_size`` (1024) LRU query embeddings; ``history_scan_limit``
      (50_000) items an ``as_of``/non-active-status search may scan per cube.

    Daemon:
      ``inline_search_us`` (2000) a search estimated to take at most this
      long (the moving average of the CPU time of earlier searches with the
      same cubes, mode, k and filter kind, plus the query embedding unless it
      is cached) runs on the daemon's event loop instead of a worker thread,
      saving the two thread hand-offs (~0.3-0.5 ms on a busy 2-core VM); it
      never waits there (a held index lock, a ``wait_for_lsn`` not reached
      yet or a history filter send it to a thread).  Bounds how long one
      search may hold up other requests: a flat cube of ~5k 384-d vectors
      (~1 ms on the loaded VM) or an HNSW cube fits, a flat one of 20k
      (``hnsw_threshold`` raised) does not; 0 runs every search in a thread.
    """

    hnsw_threshold: int = 4_000
    hnsw_m: int = 32
    ef_construction: int = 128
    ef_search: int = 128
    hnsw_rebuild_ratio: float = 0.25
    build_threads: int = 1
    hnsw_background: bool = True
    vector_storage: str = "float16"
    embed_threads: int = 1
    embed_workers: int = 2
    batch_size: int = 64
    batch_wait_s: float = 0.005
    snapshot_interval_s: float = 60.0
    snapshot_min_changes: int = 1
    wait_timeout_s: float = 10.0
    fusion: str = "score"
    rrf_k: float = 60.0
    dense_weight: float = 0.3
    lexical_weight: float = 0.7
    context_key: str | None = "context"
    neighbour_weight: float = 0.3
    candidates: int = 100
    max_k: int = 1000
    query_cache_size: int = 1024
    history_scan_limit: int = 50_000
    inline_search_us: int = 2000

    def __post_init__(self) -> None:
        positive = ("hnsw_threshold", "hnsw_m", "ef_construction", "ef_search", "batch_size")
        for name in (*positive, "candidates", "max_k", "build_threads", "embed_workers"):
            if getattr(self, name) <= 0:
                raise BadRequest(f"index setting {name} must be positive")
        if self.inline_search_us < 0:
            raise BadRequest("index setting inline_search_us must be >= 0")
        if min(self.rrf_k, self.dense_weight, self.lexical_weight, self.neighbour_weight) < 0:
            raise BadRequest("rrf_k, fusion weights and neighbour_weight must be >= 0")
        if self.vector_storage not in ("float16", "float32"):
            raise BadRequest(
                f"index setting vector_storage must be 'float16' or 'float32', "
                f"got {self.vector_storage!r}"
            )
        if self.fusion not in ("score", "rrf"):
            raise BadRequest(f"index setting fusion must be 'score' or 'rrf', got {self.fusion!r}")

    def dense_settings(self) -> dict[str, Any]:
        """Keyword arguments for :class:`memosd.index.dense.DenseIndex`."""
        return {
            "hnsw_threshold": self.hnsw_threshold,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "rebuild_ratio": self.hnsw_rebuild_ratio,
            "build_threads": self.build_threads,
            "background": self.hnsw_background,
            "storage": self.vector_storage,
        }
