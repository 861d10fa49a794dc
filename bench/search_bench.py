"""Search speed: SearchService vs bare faiss on the same index, plus ingest and RSS.

    .venv/bin/python bench/search_bench.py                    # 10k and 100k items
    MEMOSD_BENCH_1M=1 .venv/bin/python bench/search_bench.py  # also 1M (slow: build ~minutes)
    MEMOSD_BENCH_SIZES=10000 .venv/bin/python bench/search_bench.py
    MEMOSD_BENCH_EMBED_WORKERS=1 ...  # the MiniLM ingest with one embedding worker (default 2)
    MEMOSD_BENCH_MEMORY=1 MEMOSD_BENCH_SIZES=100000 .venv/bin/python bench/search_bench.py
                                      # index memory per component (one size per process)

For each size N: N items with synthetic texts are written through the engine
(concurrent writers, group commit) into one cube; their 384-d vectors are
precomputed (clustered random unit vectors) and served by a lookup
"embedder", so ingest skips the model.  Then, single-threaded, k=10:

* ``faiss``        - the cube's own faiss index, searched directly;
* ``dense``        - ``SearchService.search(mode="dense")`` (faiss + id maps
                     + engine reads of the hits + hit recording);
* ``hybrid``       - ``SearchService.search()`` (also BM25 and fusion);
* ``hybrid+embed`` - hybrid with a fresh MiniLM query embedding (cache miss)
                     (only with the real model: the 'embedded' section);

with the recall@10 of the dense search against exact (brute-force) search.
Separately: ingest throughput with MiniLM embedding (write + index), RSS.

Memory mode (``MEMOSD_BENCH_MEMORY=1``): no engine, no model, no corpus held.
A ``CubeIndex`` with the daemon's default index settings is fed N items
(real ULID item ids, the same synthetic texts, a session per 20 items, the
vectors generated chunk by chunk and dropped), as the indexer does (batches
of 256, HNSW built in the background).  After the build and the benchmark
queries (so the BM25 weight caches exist: the steady state), the process RSS
is read; then the components are freed one at a time (glibc ``malloc_trim``
after each) and each RSS drop is that component's share: dense (faiss
vectors + HNSW graph + id maps + live set), BM25, the cube's id/session maps.
Search latency of the cube's own dense/lexical paths and the dense recall@10
against exact search (recomputed from the regenerated corpus, after the
memory was read) are reported too.  Run one size per process.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384
K = 10
QUERIES = 300
WORDS = (  # noqa: SIM905
    "apple river music garden doctor travel winter coffee paint school friend dog city "
    "movie summer guitar beach family project market recipe camera mountain book piano "
    "soccer yoga bakery library museum festival concert hiking garden ocean forest "
    "island bridge castle train flight hotel dinner lunch breakfast birthday wedding"
).split()


def timed(fn: Any) -> list[float]:
    """Seconds taken by ``fn(qi)`` for each query index ``qi`` in ``range(QUERIES)``."""
    out = []
    for qi in range(QUERIES):
        t = time.perf_counter()
        fn(qi)
        out.append(time.perf_counter() - t)
    return out


def clustered(n: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)]
    x = x + 0.25 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


class LookupEmbedder:
    """Texts "d<n> ..." / "q<n> ..." map to precomputed rows (no model)."""

    def __init__(self, docs: np.ndarray, queries: np.ndarray) -> None:
        self.docs = docs
        self.queries = queries

    @property
    def model_name(self) -> str:
        return "synthetic-384"

    @property
    def dim(self) -> int:
        return DIM

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            head = text.split(" ", 1)[0]
            table = self.docs if head[0] == "d" else self.queries
            rows.append(table[int(head[1:])])
        return np.stack(rows)


def text_for(i: int, rng: np.random.Generator) -> str:
    return f"d{i} " + " ".join(rng.choice(WORDS, 12))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered) * 1000, p99 * 1000


def write_items(engine: Any, cube: str, n: int, writers: int = 8) -> float:
    started = time.monotonic()

    def run(w: int) -> None:
        rng = np.random.default_rng(w)
        for i in range(w, n, writers):
            engine.add(cube, text_for(i, rng))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - started


def bench_size(n: int, rows: list[dict[str, Any]]) -> None:
    import faiss

    from memosd.engine import Engine
    from memosd.index import IndexSettings, SearchService

    rng = np.random.default_rng(n)
    centres = rng.standard_normal((max(64, n // 500), DIM)).astype(np.float32)
    docs = clustered(n, 1, centres)
    queries = clustered(QUERIES, 2, centres)
    with tempfile.TemporaryDirectory(prefix="searchbench-") as tmp:
        engine = Engine.open(tmp)
        svc = SearchService(
            engine,
            tmp,
            embedder=LookupEmbedder(docs, queries),
            settings=IndexSettings(snapshot_interval_s=0, batch_size=256),
        )
        svc.start()
        engine.create_cube("big", owner="uid:0", config=svc.cube_config())
        write_s = write_items(engine, "big", n)
        svc.wait_indexed(engine.applied_lsn, timeout=3600)
        cube = svc.indexer.cube("big")
        assert cube is not None
        assert cube.dense is not None
        build_started = time.monotonic()
        cube.dense.wait_build()
        index_s = time.monotonic() - build_started
        dense = cube.dense
        faiss.omp_set_num_threads(1)
        # Exact neighbours by brute force, in item-label space.
        labels = np.array(sorted(dense.live_labels()))
        label_to_row = {}
        for item_id, (label, _, _) in cube.by_item.items():
            item = engine.get("big", item_id)
            label_to_row[label] = int(item.text.split(" ", 1)[0][1:])
        row_of = np.array([label_to_row[int(x)] for x in labels])
        exact = (docs[row_of] @ queries.T).T

        inner = dense._index  # the same faiss object the service searches
        params: Any = None
        if dense.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=dense.ef_search)  # type: ignore[attr-defined]

        def bare(qi: int) -> None:
            inner.search(queries[qi : qi + 1], K, params=params)

        recall = []
        for qi in range(QUERIES):
            got = {lab for lab, _ in dense.search(queries[qi], K)}
            truth = {int(labels[j]) for j in np.argsort(-exact[qi])[:K]}
            recall.append(len(got & truth) / K)
        stats = {
            "faiss": timed(bare),
            "dense": timed(lambda qi: svc.search(["big"], f"q{qi} x", k=K, mode="dense")),
            "hybrid": timed(
                lambda qi: svc.search(
                    ["big"], f"q{qi} " + " ".join(WORDS[qi % len(WORDS) : qi % len(WORDS) + 3]), k=K
                )
            ),
        }
        for name, samples in stats.items():
            p50, p99 = percentiles(samples)
            rows.append(
                {
                    "items": n,
                    "path": name,
                    "kind": dense.kind,
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "recall@10": float(np.mean(recall)) if name != "hybrid" else None,
                }
            )
        rows.append(
            {
                "items": n,
                "path": "(ingest)",
                "kind": dense.kind,
                "note": f"write {n / write_s:.0f} items/s (8 writers); "
                f"HNSW finished {index_s:.1f} s after the last write; RSS {rss_mb():.0f} MB",
            }
        )
        svc.close()
        engine.close()


SESSION_SPAN = 20  # items per synthetic conversation session (memory mode)


def vmstat(field: str = "VmRSS") -> float:
    """A /proc/self/status size in MB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trimmed_rss() -> float:
    """RSS in MB after a full collection and returning free heap pages to the OS."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return vmstat("VmRSS")


def faiss_bytes(index: Any) -> dict[str, int]:
    """Bytes of a DenseIndex's faiss object by part (vectors, HNSW graph, id map)."""
    import faiss

    inner = faiss.downcast_index(index.index)
    out = {"id_map": int(index.id_map.size()) * 8}
    if isinstance(inner, faiss.IndexHNSW):
        storage = faiss.downcast_index(inner.storage)
        out["vectors"] = int(storage.codes.size())
        hnsw = inner.hnsw
        out["hnsw_graph"] = (
            int(hnsw.neighbors.size()) * 4
            + int(hnsw.offsets.size()) * 8
            + int(hnsw.levels.size()) * 4
        )
    else:
        out["vectors"] = int(inner.codes.size())
        out["hnsw_graph"] = 0
    return out


def bench_memory(n: int) -> None:
    """Index memory for ``n`` items per component (see the module docstring)."""
    import faiss

    from memosd.index import IndexSettings
    from memosd.index.bm25 import tokenize
    from memosd.index.cube import CubeIndex
    from memosd.index.dense import DenseIndex
    from memosd.memcube.ids import MonotonicIdFactory

    settings = IndexSettings()
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((max(64, n // 500), DIM)).astype(np.float32)
    queries = clustered(QUERIES, 2, centres)
    chunk = 256

    def corpus_chunks() -> Any:
        for start in range(0, n, 16_384):
            yield start, clustered(min(16_384, n - start), 1_000_003 + start, centres)

    ids = MonotonicIdFactory()
    traced = bool(os.environ.get("MEMOSD_BENCH_TRACEMALLOC"))
    if traced:
        import tracemalloc

        tracemalloc.start(1)
    base = trimmed_rss()
    started = time.monotonic()
    cube = CubeIndex("big", dense=DenseIndex(DIM, **settings.dense_settings()))
    text_rng = np.random.default_rng(1)
    for start, block in corpus_chunks():
        for lo in range(0, len(block), chunk):
            rows = range(start + lo, start + min(lo + chunk, len(block)))
            entries = [(ids(time.time_ns() // 1000), 1, text_for(i, text_rng)) for i in rows]
            sessions = [f"s{i // SESSION_SPAN}" for i in rows]
            cube.upsert_many(entries, block[lo : lo + chunk], sessions)
        del block
    fed_s = time.monotonic() - started
    assert cube.dense is not None
    cube.dense.wait_build()
    built_s = time.monotonic() - started
    faiss.omp_set_num_threads(1)
    lexical = [
        tokenize(" ".join(WORDS[qi % len(WORDS) : qi % len(WORDS) + 3])) for qi in range(QUERIES)
    ]

    # Warm-up (builds the BM25 caches) and the dense answers, as corpus rows in a numpy
    # array (label - 1: labels are handed out in feed order): no Python objects kept
    # across the teardown below, which would pin freed memory.
    found_rows = np.zeros((QUERIES, K), dtype=np.int64)
    for qi in range(QUERIES):
        cube.search_lexical(lexical[qi], settings.candidates)
        got = [cube.by_item[item][0] - 1 for item, _ in cube.search_dense(queries[qi], K)]
        found_rows[qi, : len(got)] = got
    del got
    lat = {
        "cube dense (k=10)": timed(lambda qi, c=cube: c.search_dense(queries[qi], K)),
        f"cube dense (n={settings.candidates})": timed(
            lambda qi, c=cube: c.search_dense(queries[qi], settings.candidates)
        ),
        f"cube lexical (n={settings.candidates})": timed(
            lambda qi, c=cube: c.search_lexical(lexical[qi], settings.candidates)
        ),
    }
    steady = trimmed_rss()
    hwm = vmstat("VmHWM")
    by_file: list[tuple[str, int]] = []
    if traced:
        stats = tracemalloc.take_snapshot().statistics("filename")
        tracemalloc.stop()
        by_file = [(str(st.traceback[0].filename), st.size) for st in stats[:8]]
    parts = faiss_bytes(cube.dense._index)
    kind = cube.dense.kind
    shares: dict[str, float] = {}
    before = trimmed_rss()
    cube.dense = None
    after = trimmed_rss()
    shares["dense (faiss + live set)"] = before - after
    before, cube.bm25 = after, None  # type: ignore[assignment]
    after = trimmed_rss()
    shares["BM25"] = before - after
    before = after
    del cube
    after = trimmed_rss()
    shares["cube maps (ids, labels, sessions)"] = before - after
    shares["not returned (fragmentation)"] = after - base
    # Exact neighbours, streamed over the regenerated corpus (after the memory was read).
    best = np.full((QUERIES, K), -np.inf, dtype=np.float32)
    best_rows = np.zeros((QUERIES, K), dtype=np.int64)
    for start, block in corpus_chunks():
        sims = queries @ block.T
        top = np.argpartition(-sims, K, axis=1)[:, :K]
        cand = np.concatenate((best, np.take_along_axis(sims, top, axis=1)), axis=1)
        cand_rows = np.concatenate((best_rows, top + start), axis=1)
        keep = np.argsort(-cand, axis=1)[:, :K]
        best = np.take_along_axis(cand, keep, axis=1)
        best_rows = np.take_along_axis(cand_rows, keep, axis=1)
    recall = float(
        np.mean(
            [
                len(set(found_rows[qi].tolist()) & set(best_rows[qi].tolist())) / K
                for qi in range(QUERIES)
            ]
        )
    )
    print(f"## memory, {n} items ({kind}); fed in {fed_s:.0f} s, HNSW ready at {built_s:.0f} s")
    print(
        f"process before the index {base:.0f} MB; steady state {steady:.0f} MB; peak {hwm:.0f} MB"
    )
    print(
        f"index (steady - before): {steady - base:.0f} MB"
        f" = {(steady - base) * 2**20 / n:.0f} B/item\n"
    )
    print("| component | MB | bytes/item |")
    print("|---|---|---|")
    for name, mb in shares.items():
        print(f"| {name} | {mb:.0f} | {mb * 2**20 / n:.0f} |")
    for name, size in parts.items():
        print(f"| (faiss {name}) | {size / 2**20:.0f} | {size / n:.0f} |")
    if by_file:
        print("\nPython allocations alive at the steady state, by allocating file (tracemalloc):\n")
        print("| file | MB | bytes/item |")
        print("|---|---|---|")
        for name, size in by_file:
            short = name.split("/site-packages/")[-1].split("/wt-mem/")[-1]
            print(f"| {short} | {size / 2**20:.1f} | {size / n:.0f} |")
    print("\n| path | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, samples in lat.items():
        p50, p99 = percentiles(samples)
        print(f"| {name} | {p50:.2f} | {p99:.2f} |")
    print(f"\ndense recall@10 vs exact: {recall:.3f}")


def bench_embedded(rows: list[dict[str, Any]], n: int = 2000) -> None:
    """Ingest with MiniLM (write + embed + index) and search with query embedding."""
    from memosd.engine import Engine
    from memosd.index import IndexSettings, SearchService

    with tempfile.TemporaryDirectory(prefix="searchbench-") as tmp:
        engine = Engine.open(tmp)
        workers = int(os.environ.get("MEMOSD_BENCH_EMBED_WORKERS", "2"))
        svc = SearchService(
            engine, tmp, settings=IndexSettings(snapshot_interval_s=0, embed_workers=workers)
        )
        svc.start()
        svc.wait_ready()
        engine.create_cube("text", owner="uid:0", config=svc.cube_config())
        svc.embedder.embed(["warm up"])
        started = time.monotonic()
        write_items(engine, "text", n)
        svc.wait_indexed(engine.applied_lsn, timeout=3600)
        ingest_s = time.monotonic() - started
        rng = np.random.default_rng(7)
        queries = [f"question {i}: " + " ".join(rng.choice(WORDS, 6)) for i in range(50)]
        samples = []
        for query in queries:  # first time: cache misses, MiniLM embeds each query
            t = time.perf_counter()
            svc.search(["text"], query, k=K)
            samples.append(time.perf_counter() - t)
        cached = []
        for query in queries:  # again: the query vectors come from the LRU cache
            t = time.perf_counter()
            svc.search(["text"], query, k=K)
            cached.append(time.perf_counter() - t)
        p50, p99 = percentiles(samples)
        rows.append(
            {"items": n, "path": "hybrid+embed", "kind": "flat", "p50_ms": p50, "p99_ms": p99}
        )
        p50, p99 = percentiles(cached)
        rows.append(
            {"items": n, "path": "hybrid+cached q", "kind": "flat", "p50_ms": p50, "p99_ms": p99}
        )
        rows.append(
            {
                "items": n,
                "path": "(ingest+MiniLM)",
                "kind": "flat",
                "note": f"{n / ingest_s:.0f} items/s written and searchable "
                f"({svc.indexer.embed_calls} embed calls); RSS {rss_mb():.0f} MB",
            }
        )
        svc.close()
        engine.close()


def main() -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    sizes = [int(s) for s in os.environ.get("MEMOSD_BENCH_SIZES", "10000,100000").split(",")]
    if os.environ.get("MEMOSD_BENCH_1M"):
        sizes.append(1_000_000)
    if os.environ.get("MEMOSD_BENCH_MEMORY"):
        for n in sizes:
            bench_memory(n)
        return 0
    rows: list[dict[str, Any]] = []
    for n in sizes:
        bench_size(n, rows)
        print(f"done {n}", file=sys.stderr, flush=True)
    if not os.environ.get("MEMOSD_BENCH_NO_MODEL"):
        bench_embedded(rows)
    print("| items | path | index | p50 ms | p99 ms | recall@10 vs exact | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p50 = f"{r['p50_ms']:.2f}" if "p50_ms" in r else ""
        p99 = f"{r['p99_ms']:.2f}" if "p99_ms" in r else ""
        rec = f"{r['recall@10']:.3f}" if r.get("recall@10") is not None else ""
        print(
            f"| {r['items']} | {r['path']} | {r['kind']} | {p50} | {p99} | {rec} | "
            f"{r.get('note', '')} |"
        )
    print(f"\nmax RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
