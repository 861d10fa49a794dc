"""Search latency while a consolidation job runs, versus idle.

Builds one cube of ``--turns`` conversation turns (topics drawn from a small
vocabulary), evicts them to the mid tier with the plaintext policy (which
queues a consolidation job in the same commit), then:

1. **idle** - ``--queries`` hybrid searches through ``SearchService`` while
   no job runs (200 distinct queries, cycled; their embeddings are cached
   by a warm-up pass, so both phases time the index, fusion and reads);
2. **consolidating** - the same searches while the ``tiers.consolidate``
   job (every hot segment in one job) runs in the runner's worker thread;

and prints p50/p95/p99/max per phase plus the job's duration and result.
Embedder: ``--embedder hashing`` (default; pure Python, holds the GIL - the
worst case for the request path) or ``minilm`` (the daemon's default).

    .venv/bin/python bench/scheduler_bench.py [--turns 3000] [--queries 400]

``--adds N``: instead, what tiering costs a chat-like writer through a real
daemon: one client adds ``N`` turns to one session, one at a time, with
tier policies off, on with ``evict_delay_s = 0`` and on with the default
delay (1 s); prints adds/s, the WAL records beyond the adds (job
transitions and migrations) and the jobs run.  Search indexes use the
hashing embedder (``--embedder minilm`` for MiniLM).

    .venv/bin/python bench/scheduler_bench.py --adds 300

``--evict N``: CPU of one ``tiers.evict`` job over ``N`` short turns of one
session once the search index holds them, with the policy embedding every
evicted turn itself, and taking the index's vectors (the daemon's wiring:
``SearchService.known_vectors``).

    .venv/bin/python bench/scheduler_bench.py --evict 2000 --embedder minilm
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

TOPICS = [
    "garden greenhouse seedlings mulch pruning compost tomatoes roses",
    "travel passport itinerary airport lounge suitcase visa ferry",
    "kitchen recipe sauce spices skillet sourdough pasta curry",
    "office spreadsheet sprint payroll invoice budget deadline client",
    "music guitar concert rehearsal album chords melody drums",
    "fitness running marathon stretching gym protein cycling swim",
    "family birthday cousins reunion holidays grandparents picnic",
    "books novel library chapter author poetry bookstore reading",
]
FILLER = [
    "yesterday",
    "today",
    "tomorrow",
    "really",
    "quite",
    "maybe",
    "morning",
    "evening",
    "weekend",
]


def turn_text(rng: random.Random, i: int) -> str:
    words = TOPICS[rng.randrange(len(TOPICS))].split()
    pick = rng.sample(words, 5) + rng.sample(FILLER, 2)
    return f"Alice: Turn {i} about {' '.join(pick)}. I noted {pick[0]} and {pick[1]} carefully."


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "n": len(ordered),
        "p50": at(0.50),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": ordered[-1] * 1000,
        "mean": statistics.fmean(ordered) * 1000,
    }


def _in_process_embedder(name: str) -> Any:
    """The embedder of the in-process modes (logs to stderr): MiniLM or hashing."""
    import structlog

    from memosd.embed import HashingEmbedder

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if name == "minilm":
        from memosd.embed import MiniLMEmbedder

        return MiniLMEmbedder()
    return HashingEmbedder(384)


@contextlib.contextmanager
def _indexed_engine(embedder: Any) -> Iterator[tuple[Any, Any]]:
    """An engine in a temporary directory with a started search index (no snapshots)."""
    from memosd.engine import Engine
    from memosd.index import IndexSettings, SearchService

    with tempfile.TemporaryDirectory(prefix="schedbench-") as tmp:
        engine = Engine.open(tmp)
        search = SearchService(
            engine, tmp, embedder=embedder, settings=IndexSettings(snapshot_interval_s=0)
        )
        search.start()
        try:
            yield engine, search
        finally:
            search.close()
            engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--embedder", choices=("hashing", "minilm"), default="hashing")
    parser.add_argument("--adds", type=int, default=0, help="measure add overhead instead")
    parser.add_argument("--evict", type=int, default=0, help="measure eviction CPU instead")
    args = parser.parse_args(argv)
    if args.adds:
        return add_overhead(args.adds, args.embedder)
    if args.evict:
        return evict_cpu(args.evict, args.embedder)

    from memosd.memcube.model import CubeConfig
    from memosd.scheduler.policies_builtin import CONSOLIDATE, EVICT, PlaintextTierPolicy
    from memosd.scheduler.runner import JobRunner

    embedder = _in_process_embedder(args.embedder)
    rng = random.Random(7)
    with _indexed_engine(embedder) as (engine, search):
        policy = PlaintextTierPolicy(embedder)
        tier_policy = {
            "plaintext": {
                "consolidate_batch": 100_000,
                "segment_threshold": 0.5,
                "fact_max_per_segment": 100_000,
            }
        }
        engine.create_cube(
            "bench",
            owner="uid:0",
            config=CubeConfig(
                embedding_model=embedder.model_name,
                embedding_dim=embedder.dim,
                tier_policy=tier_policy,
            ),
        )
        started = time.perf_counter()
        batch = 200
        for start in range(0, args.turns, batch):
            engine.atomic(
                lambda p, s=start: [
                    p.add("bench", turn_text(rng, i), session=f"s{i // 100}")
                    for i in range(s, min(s + batch, args.turns))
                ]
            )
        ingest_s = time.perf_counter() - started
        # Evict only (no consolidate handler yet): the chained job waits in the queue.
        handlers = policy.handlers()
        evictor = JobRunner(engine, {EVICT: handlers[EVICT]})
        evictor.start()
        evicted = evictor.run_now(EVICT, "bench", timeout=3600)
        evictor.close()
        search.wait_indexed(engine.applied_lsn, timeout=3600)
        queued = engine.list_jobs(kind=CONSOLIDATE, state="queued")
        assert queued, "eviction queued no consolidation (no hot segment?)"

        queries = [" ".join(rng.sample(TOPICS[q % len(TOPICS)].split(), 3)) for q in range(200)]

        def measure(stop: threading.Event | None, limit: int) -> list[float]:
            out = []
            i = 0
            while len(out) < limit or (stop is not None and not stop.is_set()):
                t = time.perf_counter()
                search.search(["bench"], queries[i % len(queries)], k=10)
                out.append(time.perf_counter() - t)
                i += 1
                if stop is not None and stop.is_set() and len(out) >= 20:
                    break
            return out

        # Warm the query-embedding cache (QueryCache) so both phases measure the
        # same path: index search, fusion and item reads - not first-time embeds.
        for query in queries:
            search.search(["bench"], query, k=10)
        idle = measure(None, args.queries)

        runner = JobRunner(engine, {CONSOLIDATE: handlers[CONSOLIDATE]}, poll_s=0.01)
        done = threading.Event()
        runner.add_listener(
            lambda e: done.set() if e.type in {"succeeded", "failed", "cancelled"} else None
        )
        job_started = time.perf_counter()
        runner.start()
        busy = measure(done, args.queries)
        job = runner.wait(queued[0].id, timeout=3600)
        job_s = time.perf_counter() - job_started
        runner.close()

    rows: list[tuple[str, dict[str, Any]]] = [
        ("idle", percentiles(idle)),
        ("during consolidation", percentiles(busy)),
    ]
    print(
        f"scheduler_bench: {args.turns} turns ({ingest_s:.1f} s ingest), "
        f"embedder={embedder.model_name}, evicted={evicted.result}"
    )
    print(
        f"consolidation job: {job.state} in {job_s:.2f} s, "
        f"segments={len(job.result['segments']) if job.result else '?'}, "
        f"facts added={job.result['added'] if job.result else '?'}"
    )
    print()
    print(
        f"{'search (hybrid, k=10)':<24}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    )
    for name, stats in rows:
        print(
            f"{name:<24}{stats['n']:>6}{stats['p50']:>9.2f}{stats['p95']:>9.2f}"
            f"{stats['p99']:>9.2f}{stats['max']:>9.2f}"
        )
    return 0


def add_overhead(n: int, embedder: str) -> int:
    """Sequential adds to one session through the daemon, tiers off / on (see the doc)."""
    from pathlib import Path

    from memosd.testing import DaemonHandle

    model = {"hashing": ("hashing-384", 384), "minilm": ("all-MiniLM-L6-v2", 384)}[embedder]
    print(f"{n} sequential adds, one session, {embedder} embeddings")
    print(f"{'':22}{'adds/s':>8}{'extra WAL':>11}{'per turn':>10}  jobs")
    for label, delay in (
        ("tiers off", None),
        ("evict_delay_s = 0", 0.0),
        ("evict_delay_s = 1", 1.0),
    ):
        base = Path(tempfile.mkdtemp(prefix="memosd-adds-"))
        env = {"MEMOSD_LOG_LEVEL": "warning", "MEMOSD_INDEX_EMBEDDER": embedder}
        daemon = DaemonHandle(base, env=env).start()
        try:
            with daemon.client(timeout=300) as c:
                tiers = (
                    {"policies": []} if delay is None else {"plaintext": {"evict_delay_s": delay}}
                )
                config = {"embedding_model": model[0], "embedding_dim": model[1]}
                c.create_cube("chat", config={**config, "tier_policy": tiers})
                for i in range(12):
                    c.add("chat", f"warm-up turn {i}", session="s")
                if delay is not None:
                    c.tier_run("chat", "plaintext", timeout=300)  # loads what the jobs need
                lsn0 = c.status()["engine"]["last_lsn"]
                before = {j["id"] for j in c.jobs(limit=1000)}
                t0 = time.perf_counter()
                for i in range(n):
                    c.add("chat", f"Alice: turn {i} about my garden and the weather", session="s")
                took = time.perf_counter() - t0
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and any(
                    not j["terminal"] for j in c.jobs(limit=1000)
                ):
                    time.sleep(0.2)
                extra = c.status()["engine"]["last_lsn"] - lsn0 - n
                kinds: dict[str, int] = {}
                for job in c.jobs(limit=1000):
                    if job["id"] not in before:
                        kinds[job["kind"]] = kinds.get(job["kind"], 0) + 1
            print(f"{label:22}{n / took:8.0f}{extra:11d}{extra / n:10.2f}  {kinds or '-'}")
        finally:
            daemon.cleanup()
    return 0


def evict_cpu(n: int, embedder_name: str) -> int:
    """One eviction job's CPU, embedding the turns itself vs taking the index's vectors."""
    from memosd.scheduler.policies_builtin import EVICT, PlaintextTierPolicy
    from memosd.scheduler.runner import JobRunner

    embedder = _in_process_embedder(embedder_name)
    print(f"one tiers.evict job over {n} turns of one session, {embedder_name} embeddings")
    print(f"{'':30}{'wall s':>8}{'CPU s':>8}{'embedded':>10}{'reused':>8}")
    rng = random.Random(7)
    for label, reuse in (("embeds every turn", False), ("index's vectors", True)):
        with _indexed_engine(embedder) as (engine, search):
            policy = PlaintextTierPolicy(embedder)
            if reuse:
                policy.use_vector_lookup(search.known_vectors, search.wait_caught_up)
            runner = JobRunner(engine, policy.handlers(), poll_s=0.05)
            runner.start()
            try:
                config = search.cube_config(tier_policy={"plaintext": {"promote_heat": 1e9}})
                engine.create_cube("bench", owner="uid:0", config=config)
                for start in range(0, n, 500):
                    texts = [turn_text(rng, i) for i in range(start, min(n, start + 500))]
                    engine.atomic(lambda p, t=texts: [p.add("bench", x, session="s") for x in t])
                assert search.wait_caught_up(600)
                t0, c0 = time.perf_counter(), time.process_time()
                job = runner.run_now(EVICT, "bench", timeout=600)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                assert job.state == "succeeded", job.error
                assert job.result is not None
                embedded = job.result["evicted"] - policy.vectors_reused
            finally:
                runner.close()
            print(f"{label:30}{wall:8.2f}{cpu:8.2f}{embedded:10d}{policy.vectors_reused:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
