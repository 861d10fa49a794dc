"""Search speed: SearchService vs bare faiss on the same index, plus ingest and RSS.

    .venv/bin/python bench/search_bench.py                    # 10k and 100k items
    MEMOSD_BENCH_1M=1 .venv/bin/python bench/search_bench.py  # also 1M (slow: build ~minutes)
    MEMOSD_BENCH_SIZES=10000 .venv/bin/python bench/search_bench.py
    MEMOSD_BENCH_EMBED_WORKERS=1 ...  # the MiniLM ingest with one embedding worker (default 2)

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
        for item_id, (label, _) in cube.by_item.items():
            item = engine.get("big", item_id)
            label_to_row[label] = int(item.text.split(" ", 1)[0][1:])
        row_of = np.array([label_to_row[int(x)] for x in labels])
        exact = (docs[row_of] @ queries.T).T

        def timed(fn: Any) -> list[float]:
            out = []
            for qi in range(QUERIES):
                t = time.perf_counter()
                fn(qi)
                out.append(time.perf_counter() - t)
            return out

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
