"""memosd side by side with mem0 and bare faiss, in one run (issue 9).

    bash bench/peers/setup.sh                    # once: mem0 in bench/.venv-peers
    .venv/bin/python bench/compare.py            # quick sizes (minutes)
    BENCH_FULL=1 .venv/bin/python bench/compare.py   # 10k + 100k, 20 kill rounds, all of LoCoMo

Each system runs in its own process: memosd is the real daemon (``memosd``
subprocess, temporary ipc socket) driven through ``memosd.client``; mem0
(``mem0ai``, offline: see bench/peers/mem0_worker.py) runs in the peer
virtualenv behind a JSON-lines worker that times its own calls; bare faiss
(``IndexFlatIP``, one thread) runs in this process as the floor for search.

Measured:

* **add throughput** with the same MiniLM embedder, real texts (LoCoMo
  turns): 1 client and 16 concurrent clients.  memosd: acknowledged (durable)
  adds, and the time until all of them are searchable (embedded + indexed in
  the background); 16 clients = 16 client processes.  mem0: ``Memory.add(...,
  infer=False)``, which embeds before it returns; 16 clients = 16 threads
  sharing one ``Memory`` (its local stores are single-process: qdrant local
  mode locks its directory, the FAISS store rewrites whole files).
* **search latency** p50/p99 (k = 10, one client, sequential) at each corpus
  size, with precomputed vectors on both sides (a lookup embedder; see
  bench/peers/memosd_lookup.py), so the query embedding is excluded; the
  MiniLM query-embedding cost is measured separately, and the LoCoMo rows
  give the latency with it included.  memosd is measured at the client
  (including the IPC round trip); mem0 inside its own process.  All systems
  are up at once and each size's queries are timed in alternating rounds
  (after the daemon's post-load work has settled), so machine noise lands
  on all of them alike; each system's round starts with one untimed query
  (it sat idle while the others ran).
* **LoCoMo** turn-level evidence recall@5/@10 (the metric and loader of
  bench/locomo.py), same texts, same MiniLM embedder.
* **memory**: RSS of the serving process (memosd daemon, mem0 worker) after
  the corpus is loaded.
* **durability**: writers stream adds; the writer process (the memosd daemon;
  the mem0 process) is killed with SIGKILL at a random moment; after restart
  every acknowledged memory is looked up.  Repeated for N rounds on the same
  store; lost = acknowledged but missing at the end.

Environment (quick defaults; ``BENCH_FULL=1`` switches to the full ones):

    BENCH_SIZES=1000,5000         corpus sizes for search latency (full: 1000,10000,100000)
    BENCH_QUERIES=200             queries per size (full: 300)
    BENCH_SEARCH_ROUNDS=5         alternating timing rounds per size (each system in turn)
    BENCH_ADDS=200                adds per throughput run (full: 1000)
    BENCH_KILL_ROUNDS=3           kill -9 rounds per system (full: 20)
    BENCH_LOCOMO_CONVERSATIONS=1  LoCoMo conversations (full: 10)
    BENCH_MEM0_STORES=qdrant,faiss  mem0 vector stores to run
    BENCH_SKIP=                   comma list of sections to skip: add,search,locomo,durability
    BENCH_OUT=bench/results/compare/run-1.json   where the JSON result goes
    BENCH_RESULT_NAME=compare     the result's name (a partial run can be stored beside)
    BENCH_PLOT=docs/bench-compare-search.png   the plot ("" = none)

Prints the tables; writes the JSON (rendered into docs/benchmarks.md by
bench/render.py) and docs/bench-compare-search.png (via the peer venv's
matplotlib).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from _result import command_line, process_cpu_s, write_result  # noqa: E402

PEER_PY = REPO / "bench" / ".venv-peers" / "bin" / "python"
WORKER = REPO / "bench" / "peers" / "mem0_worker.py"
LAUNCHER = REPO / "bench" / "peers" / "memosd_lookup.py"
PLOT = REPO / "bench" / "peers" / "plot.py"
PNG = REPO / "docs" / "bench-compare-search.png"
DIM = 384
K = 10
FULL = os.environ.get("BENCH_FULL", "") not in ("", "0")
WORDS = (  # noqa: SIM905
    "apple river music garden doctor travel winter coffee paint school friend dog city "
    "movie summer guitar beach family project market recipe camera mountain book piano "
    "soccer yoga bakery library museum festival concert hiking garden ocean forest "
    "island bridge castle train flight hotel dinner lunch breakfast birthday wedding"
).split()


def env_int(name: str, quick: int, full: int) -> int:
    return int(os.environ.get(name, full if FULL else quick))


def env_list(name: str, default: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p50_p99_ms(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples) * 1000, percentile(samples, 0.99) * 1000


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A memory figure of ``pid`` from /proc (VmRSS; RssAnon = heap, not file pages), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_quiet(
    pid: int, *, window: float = 0.5, busy: float = 0.05, timeout: float = 300.0
) -> None:
    """Block until process ``pid`` uses under ``busy`` of a CPU over a ``window``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = process_cpu_s(pid)
        time.sleep(window)
        if process_cpu_s(pid) - before < busy * window:
            return


# --- the systems ------------------------------------------------------------------------


class Memosd:
    """A real memosd daemon subprocess; ``lookup`` swaps in the precomputed-vector embedder."""

    def __init__(self, data_dir: Path, *, embedder: str, vectors: tuple[Path, Path] | None = None):
        self.data_dir = data_dir
        self.run_dir = Path(tempfile.mkdtemp(prefix="cmp-run-", dir="/tmp"))
        self.socket = self.run_dir / "memosd.sock"
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMOSD_", "NOTIFY_"))}
        self.env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            MEMOSD_INDEX_EMBEDDER="hashing" if embedder == "lookup" else embedder,
            MEMOSD_INDEX_WAIT_TIMEOUT_S="900",
            MEMOSD_LOG_LEVEL="warning",
            MEMOSD_SCHEDULER_ENABLED="false",
        )
        self.cmd = [sys.executable]
        if embedder == "lookup":
            assert vectors is not None
            self.env.update(BENCH_DOCS=str(vectors[0]), BENCH_QUERIES=str(vectors[1]))
            self.cmd.append(str(LAUNCHER))
        else:
            self.cmd += ["-m", "memosd"]
        self.cmd += ["--data-dir", str(data_dir), "--socket", str(self.socket)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> None:
        from memosd.testing import wait_until_ready

        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until_ready(self.socket, timeout=timeout, proc=self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, timeout: float = 900.0) -> Any:
        from memosd.client import Client

        return Client(self.socket, timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def wait_dense_built(self, cube: str, timeout: float = 1800.0) -> str:
        """Block until the cube's dense index is not (re)building; its kind."""
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                stats = c.status()["search"]["cubes"].get(cube, {})
                if not stats.get("dense_building") or time.monotonic() > deadline:
                    return str(stats.get("dense_kind"))
                time.sleep(0.2)


class Mem0:
    """mem0 in the peer venv behind bench/peers/mem0_worker.py."""

    def __init__(
        self,
        data_dir: Path,
        *,
        store: str,
        embedder: str,
        vectors: tuple[Path, Path] | None = None,
        embed_dtype: str = "float32",
    ):
        self.data_dir = data_dir
        self.store = store
        self.embedder = embedder
        self.embed_dtype = embed_dtype
        self.vectors = vectors
        self.proc: subprocess.Popen[str] | None = None
        self.log = data_dir.parent / f"{data_dir.name}.log"

    def start(self) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMOSD_")}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [str(PEER_PY), str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        req: dict[str, Any] = {"op": "open", "dir": str(self.data_dir), "store": self.store}
        req["embedder"] = self.embedder
        req["embed_dtype"] = self.embed_dtype
        if self.vectors is not None:
            req.update(docs=str(self.vectors[0]), queries=str(self.vectors[1]))
        return self.call(req)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"mem0 worker died (exit {self.proc.poll()}); see {self.log}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"mem0 worker: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running(system: Any) -> Iterator[Any]:
    system.start()
    try:
        yield system
    finally:
        system.stop()


# --- data ---------------------------------------------------------------------------------


def clustered(n: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)]
    x = x + 0.25 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def doc_text(i: int) -> str:
    rng = random.Random(i)
    return f"d{i} " + " ".join(rng.choice(WORDS) for _ in range(12))


def query_text(i: int) -> str:
    rng = random.Random(-1 - i)
    return f"q{i} " + " ".join(rng.choice(WORDS) for _ in range(3))


def locomo_data(conversations: int) -> list[dict[str, Any]]:
    from locomo import DEFAULT_DATA

    data: list[dict[str, Any]] = json.loads(Path(DEFAULT_DATA).read_text())
    return data[:conversations]


def locomo_turns(data: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(conversation id, text, dia_id) for every turn, in order."""
    from locomo import sessions, turn_text

    out = []
    for conv in data:
        for _, _, turns in sessions(conv["conversation"]):
            for turn in turns:
                out.append(
                    (str(conv["sample_id"]), turn_text(turn, "speaker"), str(turn["dia_id"]))
                )
    return out


# --- memosd helpers -----------------------------------------------------------------------


def _add_share(args: tuple[str, str, list[str]]) -> tuple[int, float]:
    """One client process: add its share of texts sequentially; (count, seconds)."""
    from memosd.client import Client

    socket, cube, texts = args
    with Client(socket, timeout=900.0) as c:
        started = time.perf_counter()
        for text in texts:
            c.add(cube, text)
        return len(texts), time.perf_counter() - started


def memosd_add(daemon: Memosd, cube: str, texts: list[str], clients: int) -> float:
    """Seconds until every text is acknowledged, with ``clients`` client processes."""
    if clients == 1:
        return _add_share((str(daemon.socket), cube, texts))[1]
    shares = [(str(daemon.socket), cube, texts[i::clients]) for i in range(clients)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(clients) as pool:
        started = time.perf_counter()
        pool.map(_add_share, shares)
        return time.perf_counter() - started


# --- sections -----------------------------------------------------------------------------


def section_add(tmp: Path, stores: list[str], out: dict[str, Any]) -> None:
    n = env_int("BENCH_ADDS", 200, 1000)
    turns = locomo_turns(locomo_data(10))
    texts = [t for _, t, _ in turns]
    rows: list[dict[str, Any]] = []
    daemon = Memosd(tmp / "add-memosd", embedder="minilm")
    with running(daemon), daemon.client() as c:
        for clients in (1, 16):
            cube = f"add{clients}"
            c.create_cube(cube)
            batch = texts[:n] if clients == 1 else texts[n : 2 * n]
            acked_s = memosd_add(daemon, cube, batch, clients)
            started = time.perf_counter()
            c.search(cube, "warm-up", k=1, mode="dense")  # read-your-writes: waits for the indexer
            searchable_s = acked_s + time.perf_counter() - started
            rows.append(
                {
                    "system": "memosd",
                    "clients": clients,
                    "n": n,
                    "acked_per_s": n / acked_s,
                    "searchable_per_s": n / searchable_s,
                }
            )
            print(
                f"  memosd add x{clients}: {n / acked_s:.0f}/s acked, "
                f"{n / searchable_s:.0f}/s searchable"
            )
    for store in stores:
        peer = Mem0(tmp / f"add-mem0-{store}", store=store, embedder="minilm")
        with running(peer):
            for clients in (1, 16):
                batch = texts[:n] if clients == 1 else texts[n : 2 * n]
                r = peer.call(
                    {"op": "add_many", "texts": batch, "threads": clients, "user_id": f"u{clients}"}
                )
                ok = r["n"] - r["errors"]
                rows.append(
                    {
                        "system": f"mem0 ({store})",
                        "clients": clients,
                        "n": n,
                        "acked_per_s": ok / r["seconds"],
                        "searchable_per_s": ok / r["seconds"],
                        "errors": r["errors"],
                        "first_error": r["first_error"],
                    }
                )
                print(
                    f"  mem0 {store} add x{clients}: {ok / r['seconds']:.1f}/s "
                    f"({r['errors']} errors)"
                )
    out["add"] = rows


def section_search(tmp: Path, stores: list[str], out: dict[str, Any]) -> None:
    import faiss

    sizes = [int(s) for s in env_list("BENCH_SIZES", "1000,10000,100000" if FULL else "1000,5000")]
    sizes.sort()
    n_queries = env_int("BENCH_QUERIES", 200, 300)
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((max(64, sizes[-1] // 500), DIM)).astype(np.float32)
    docs = clustered(sizes[-1], 1, centres)
    queries = clustered(n_queries, 2, centres)
    vec_dir = tmp / "vectors"
    vec_dir.mkdir()
    vectors = (vec_dir / "docs.npy", vec_dir / "queries.npy")
    np.save(vectors[0], docs)
    np.save(vectors[1], queries)
    qtexts = [query_text(i) for i in range(n_queries)]
    rows: list[dict[str, Any]] = []

    def record(system: str, size: int, samples: list[float], pid: int | None, **extra: Any) -> None:
        p50, p99 = p50_p99_ms(samples)
        rss = rss_mb(pid) if pid is not None else None
        anon = rss_mb(pid, "RssAnon") if pid is not None else None
        rows.append(
            {
                "system": system,
                "items": size,
                "p50_ms": p50,
                "p99_ms": p99,
                "rss_mb": rss,
                "rss_anon_mb": anon,
                **extra,
            }
        )
        print(f"  {system} @{size}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, rss {rss}")

    # Bare faiss: the floor.
    faiss.omp_set_num_threads(1)
    for size in sizes:
        index = faiss.IndexFlatIP(DIM)
        index.add(docs[:size])
        samples = []
        for qi in range(n_queries):
            t = time.perf_counter()
            index.search(queries[qi : qi + 1], K)
            samples.append(time.perf_counter() - t)
        record("bare faiss (IndexFlatIP)", size, samples, None)
        del index

    # memosd and every mem0 store run side by side, loaded to each size in
    # turn; each size's queries are then timed in alternating rounds (memosd
    # dense, memosd hybrid, each mem0 store, repeat), so a busy minute on a
    # shared machine lands on all systems alike instead of on whichever was
    # measured then.
    rounds = env_int("BENCH_SEARCH_ROUNDS", 5, 5)
    daemon = Memosd(tmp / "search-memosd", embedder="lookup", vectors=vectors)
    peers = {
        store: Mem0(tmp / f"search-mem0-{store}", store=store, embedder="lookup", vectors=vectors)
        for store in stores
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(daemon))
        c = stack.enter_context(daemon.client())
        for peer in peers.values():
            stack.enter_context(running(peer))
        c.create_cube("big")
        loaded = 0
        for size in sizes:
            started = time.perf_counter()
            memosd_add(daemon, "big", [doc_text(i) for i in range(loaded, size)], 16)
            c.search("big", qtexts[0], k=1, mode="dense")  # waits until indexed
            kind = daemon.wait_dense_built("big")
            load_s = time.perf_counter() - started
            peer_load_s = {}
            for store, peer in peers.items():
                texts = [doc_text(i) for i in range(loaded, size)]
                got = peer.call({"op": "bulk_load", "start": loaded, "texts": texts})
                peer_load_s[store] = got["seconds"]
            loaded = size
            # Steady state: the daemon's work after a bulk load (index
            # snapshot, change-log pruning) is done before timing starts.
            wait_quiet(daemon.pid)
            for mode in ("dense", "hybrid"):
                for q in qtexts[:20]:  # warm-up
                    c.search("big", q, k=K, mode=mode)
            for peer in peers.values():
                peer.call({"op": "search_many", "queries": qtexts[:20], "k": K})
            samples: dict[str, list[float]] = {name: [] for name in ("dense", "hybrid", *peers)}
            for r in range(rounds):
                chunk = qtexts[r::rounds]
                # Each system sat idle while the others ran: one untimed
                # query first, so no round starts with a wake-up from idle
                # (2.5x a query in a stream through the daemon; noted in
                # docs/bench-notes/compare.md).  Not one of the timed
                # queries: memosd caches query vectors, mem0 does not.
                warm = f"warm-up query {r}"
                for mode in ("dense", "hybrid"):
                    c.search("big", warm, k=K, mode=mode)
                    for q in chunk:
                        t = time.perf_counter()
                        c.search("big", q, k=K, mode=mode)
                        samples[mode].append(time.perf_counter() - t)
                for store, peer in peers.items():
                    got = peer.call(
                        {"op": "search_many", "queries": [warm, *chunk], "k": K, "untimed": 1}
                    )
                    samples[store].extend(got["latencies"])
            for mode in ("dense", "hybrid"):
                record(f"memosd {mode}", size, samples[mode], daemon.pid, index=kind, load_s=load_s)
            for store, peer in peers.items():
                record(f"mem0 ({store})", size, samples[store], peer.pid, load_s=peer_load_s[store])
    out["search"] = rows


def section_embed_cost(out: dict[str, Any], peer_store: str) -> None:
    """MiniLM query-embedding cost, in memosd's code (this process) and in mem0's.

    Each side in float32 and in bfloat16: memosd's default (``auto``) picks
    bfloat16 on a CPU with native bfloat16, mem0's default is float32 and
    takes bfloat16 through its embedder's ``model_kwargs``.
    """
    from memosd.embed import MiniLMEmbedder, resolve_embed_dtype

    qs = [f"what did {w} say about the {v}?" for w in WORDS[:10] for v in WORDS[10:20]][:100]
    default = resolve_embed_dtype("auto")
    ours = {dtype: MiniLMEmbedder(dtype=dtype) for dtype in ("float32", "bfloat16")}
    for emb in ours.values():
        emb.embed(qs[:5])
    samples: dict[str, list[float]] = {}
    # Alternating rounds, as in the search section: noise lands on all of them.
    rounds = 5
    with tempfile.TemporaryDirectory(prefix="cmp-embed-") as d:
        peers = {
            dtype: Mem0(Path(d) / dtype, store=peer_store, embedder="minilm", embed_dtype=dtype)
            for dtype in ("float32", "bfloat16")
        }
        with contextlib.ExitStack() as stack:
            for peer in peers.values():
                stack.enter_context(running(peer))
                peer.call({"op": "embed_cost", "queries": qs[:5]})
            for r in range(rounds):
                chunk = qs[r::rounds]
                for dtype, emb in ours.items():
                    mine = samples.setdefault(f"memosd {dtype}", [])
                    for q in chunk:
                        t = time.perf_counter()
                        emb.embed([q])
                        mine.append(time.perf_counter() - t)
                for dtype, peer in peers.items():
                    reply = peer.call({"op": "embed_cost", "queries": chunk})
                    samples.setdefault(f"mem0 {dtype}", []).extend(reply["latencies"])
    rows = []
    for key, values in samples.items():
        system, dtype = key.split()
        is_default = dtype == (default if system == "memosd" else "float32")
        where = "MiniLMEmbedder" if system == "memosd" else "huggingface embedder"
        label = f"{system} ({where}, {dtype}{', its default here' if is_default else ''})"
        p50, p99 = p50_p99_ms(values)
        rows.append({"system": label, "dtype": dtype, "p50_ms": p50, "p99_ms": p99})
        print(f"  query embedding {label}: p50 {p50:.1f} ms")
    out["embed"] = rows


def section_locomo(tmp: Path, store: str, out: dict[str, Any]) -> None:
    from locomo import CATEGORIES, normalise_evidence

    data = locomo_data(env_int("BENCH_LOCOMO_CONVERSATIONS", 1, 10))
    turns = locomo_turns(data)
    questions: list[tuple[str, str, list[str]]] = []
    for conv in data:
        for qa in conv["qa"]:
            evidence = normalise_evidence(qa.get("evidence") or [])
            if evidence and int(qa["category"]) in CATEGORIES:
                questions.append((str(conv["sample_id"]), str(qa["question"]), evidence))
    print(f"  LoCoMo: {len(data)} conversations, {len(turns)} turns, {len(questions)} questions")
    rows: list[dict[str, Any]] = []

    def score(
        system: str, ranked: list[list[str]], latencies: list[float], ingest_s: float
    ) -> None:
        row: dict[str, Any] = {"system": system, "questions": len(questions), "ingest_s": ingest_s}
        for k in (5, 10):
            vals = [
                len(set(ev) & set(r[:k])) / len(ev)
                for (_, _, ev), r in zip(questions, ranked, strict=True)
            ]
            row[f"recall@{k}"] = sum(vals) / len(vals)
        row["p50_ms"], row["p99_ms"] = p50_p99_ms(latencies)
        rows.append(row)
        print(
            f"  {system}: R@5 {row['recall@5']:.3f} R@10 {row['recall@10']:.3f} "
            f"p50 {row['p50_ms']:.1f} ms"
        )

    daemon = Memosd(tmp / "locomo-memosd", embedder="minilm")
    with running(daemon), daemon.client() as c:
        for conv in data:
            c.create_cube(f"c-{conv['sample_id']}")
        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda t: c.add(f"c-{t[0]}", t[1], metadata={"dia_id": t[2]}), turns))
        for conv in data:
            c.search(f"c-{conv['sample_id']}", "warm-up", k=1, mode="lexical")
        ingest_s = time.perf_counter() - started
    for mode in ("hybrid", "dense"):
        # A fresh daemon per mode: its query-vector cache must not serve the second pass.
        with running(daemon), daemon.client() as c:
            ranked, latencies = [], []
            for sample_id, question, _ in questions:
                t = time.perf_counter()
                hits = c.search(f"c-{sample_id}", question, k=K, mode=mode)
                latencies.append(time.perf_counter() - t)
                ranked.append([str(h.item.metadata.get("dia_id")) for h in hits])
            score(f"memosd {mode}", ranked, latencies, ingest_s)
    peer = Mem0(tmp / f"locomo-mem0-{store}", store=store, embedder="minilm")
    with running(peer):
        r = peer.call(
            {
                "op": "add_many",
                "texts": [t for _, t, _ in turns],
                "user_ids": [s for s, _, _ in turns],
                "metadata": [{"dia_id": d} for _, _, d in turns],
                # One thread: qdrant local mode is not thread-safe (concurrent adds
                # corrupt its in-memory arrays; see the add table's errors).
                "threads": 1,
            }
        )
        s = peer.call(
            {
                "op": "search_many",
                "queries": [q for _, q, _ in questions],
                "user_ids": [s for s, _, _ in questions],
                "k": K,
                "field": "dia_id",
            }
        )
        score(
            f"mem0 ({store})",
            [[str(x) for x in h] for h in s["hits"]],
            s["latencies"],
            r["seconds"],
        )
    out["locomo"] = rows


def _memosd_add_id(client: Any, text: str) -> str:
    return str(client.add("k", text).id)


def _mem0_add_id(peer: Mem0, text: str) -> str:
    return str(peer.call({"op": "add", "text": text})["id"])


def _stream_adds(
    add: Callable[[str], str],
    prefix: str,
    acked: list[str],
    stop: threading.Event,
    errors: list[str] | None = None,
) -> None:
    """Add until ``stop`` or the first failure; a failure before ``stop`` goes to ``errors``."""
    i = 0
    while not stop.is_set():
        try:
            acked.append(add(f"{prefix}-{i} durable memory number {i}"))
        except Exception as exc:
            if errors is not None and not stop.is_set():
                errors.append(str(exc).splitlines()[0][:200])
            return
        i += 1


def _round_notes(failed: dict[str, list[int]]) -> list[str]:
    """ "adds failed before the kill in rounds 2-20: <error>" per distinct error."""
    notes = []
    for error, rounds in failed.items():
        span = f"{rounds[0]}" if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"
        notes.append(f"adds failed before the kill in {len(rounds)} round(s) ({span}): {error}")
    return notes


def _kill_round(
    system: Memosd | Mem0,
    add: Callable[[str], str],
    *,
    writers: int,
    prefix: str,
    delay: float,
    failed: dict[str, list[int]],
    rnd: int,
) -> list[str]:
    """Stream adds from ``writers`` threads, SIGKILL ``system`` after ``delay``; the acked ids."""
    stop = threading.Event()
    acked: list[str] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=_stream_adds, args=(add, f"{prefix}w{w}", acked, stop, errors))
        for w in range(writers)
    ]
    for t in threads:
        t.start()
    time.sleep(delay)
    stop.set()  # set first: failures caused by the kill itself are not reported
    system.kill9()
    for t in threads:
        t.join()
    for error in dict.fromkeys(errors):
        failed.setdefault(error, []).append(rnd)
    return acked


def section_durability(tmp: Path, stores: list[str], out: dict[str, Any]) -> None:
    rounds = env_int("BENCH_KILL_ROUNDS", 3, 20)
    rng = random.Random(9)
    rows: list[dict[str, Any]] = []

    # memosd: 4 writer threads (one client, a socket each); kill -9 the daemon.
    daemon = Memosd(tmp / "kill-memosd", embedder="hashing")
    acked: list[str] = []
    failed: dict[str, list[int]] = {}
    for rnd in range(rounds):
        daemon.start()
        if rnd == 0:
            with daemon.client() as c:
                c.create_cube("k")
        client = daemon.client(timeout=5.0)
        add = partial(_memosd_add_id, client)
        acked += _kill_round(
            daemon,
            add,
            writers=4,
            prefix=f"r{rnd}",
            delay=rng.uniform(0.3, 1.5),
            failed=failed,
            rnd=rnd,
        )
        client.close()
    daemon.start()
    lost = 0
    with daemon.client() as c:
        for item_id in acked:
            try:
                c.get("k", item_id)
            except Exception:
                lost += 1
    daemon.stop()
    note = "; ".join(_round_notes(failed))
    rows.append(
        {"system": "memosd", "rounds": rounds, "acked": len(acked), "lost": lost, "note": note}
    )
    print(f"  memosd: {rounds} kill -9 rounds, {len(acked)} acknowledged, {lost} lost {note}")

    # mem0: one writer (its process), adds acknowledged one by one over the pipe.
    for store in stores:
        peer = Mem0(tmp / f"kill-mem0-{store}", store=store, embedder="lookup")
        peer.vectors = _empty_vectors(tmp)
        acked = []
        failed = {}
        notes: list[str] = []
        for rnd in range(rounds):
            try:
                peer.start()
            except RuntimeError as exc:
                notes.append(f"round {rnd}: reopen failed: {str(exc).splitlines()[0][:160]}")
                peer.kill9()
                break
            add = partial(_mem0_add_id, peer)
            acked += _kill_round(
                peer,
                add,
                writers=1,
                prefix=f"r{rnd}",
                delay=rng.uniform(0.3, 1.5),
                failed=failed,
                rnd=rnd,
            )
        missing: list[str] = list(acked)
        try:
            peer.start()
            missing = peer.call({"op": "check", "ids": acked})["missing"]
        except RuntimeError as exc:
            notes.append(f"final reopen failed: {str(exc).splitlines()[0][:160]}")
        finally:
            peer.stop()
        notes += _round_notes(failed)
        rows.append(
            {
                "system": f"mem0 ({store})",
                "rounds": rounds,
                "acked": len(acked),
                "lost": len(missing),
                "note": "; ".join(notes),
            }
        )
        print(
            f"  mem0 {store}: {rounds} rounds, {len(acked)} acknowledged, "
            f"{len(missing)} lost {notes}"
        )
    out["durability"] = rows


def _empty_vectors(tmp: Path) -> tuple[Path, Path]:
    """Tiny lookup tables: durability texts fall back to hashed vectors (no model load)."""
    d = tmp / "novectors"
    if not d.exists():
        d.mkdir()
        np.save(d / "docs.npy", np.zeros((1, DIM), dtype=np.float32))
        np.save(d / "queries.npy", np.zeros((1, DIM), dtype=np.float32))
    return d / "docs.npy", d / "queries.npy"


# --- report -------------------------------------------------------------------------------


def tables(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON tables bench/render.py turns into markdown."""
    result: list[dict[str, Any]] = []
    if "add" in out:
        result.append(
            {
                "caption": "Add throughput, MiniLM embedder, LoCoMo turns "
                f"({out['add'][0]['n']} adds per run)",
                "columns": [
                    "system",
                    "clients",
                    "acknowledged adds/s",
                    "searchable adds/s",
                    "failed adds",
                ],
                "rows": [
                    [
                        r["system"],
                        r["clients"],
                        r["acked_per_s"],
                        r["searchable_per_s"],
                        r.get("errors", 0),
                    ]
                    for r in out["add"]
                ],
            }
        )
    if "search" in out:
        floor = {r["items"]: r["p50_ms"] for r in out["search"] if r["system"].startswith("bare")}
        result.append(
            {
                "caption": "Search latency, k = 10, one client, query embedding excluded "
                "(precomputed vectors)",
                "columns": [
                    "system",
                    "items",
                    "p50 ms",
                    "p99 ms",
                    "p50 / faiss",
                    "RSS MB",
                    "of it anon MB",
                ],
                "rows": [
                    [
                        r["system"],
                        r["items"],
                        r["p50_ms"],
                        r["p99_ms"],
                        r["p50_ms"] / floor[r["items"]],
                        r["rss_mb"],
                        r.get("rss_anon_mb"),
                    ]
                    for r in out["search"]
                ],
            }
        )
    if "embed" in out:
        result.append(
            {
                "caption": "MiniLM query embedding (one query, one torch thread), each "
                "system in float32 and bfloat16 - add to the search rows above",
                "columns": ["where", "p50 ms", "p99 ms"],
                "rows": [[r["system"], r["p50_ms"], r["p99_ms"]] for r in out["embed"]],
            }
        )
    if "locomo" in out:
        n = out["locomo"][0]["questions"]
        result.append(
            {
                "caption": f"LoCoMo turn-level evidence recall ({n} questions), MiniLM; "
                "latency includes the query embedding",
                "columns": ["system", "R@5", "R@10", "search p50 ms", "search p99 ms", "ingest s"],
                "rows": [
                    [
                        r["system"],
                        r["recall@5"],
                        r["recall@10"],
                        r["p50_ms"],
                        r["p99_ms"],
                        r["ingest_s"],
                    ]
                    for r in out["locomo"]
                ],
                "formats": {"R@5": "{:.3f}", "R@10": "{:.3f}"},
            }
        )
    if "durability" in out:
        result.append(
            {
                "caption": "Durability: SIGKILL of the writer process mid-stream, restart, "
                "look up every acknowledged add",
                "columns": ["system", "rounds", "acknowledged", "lost", "note"],
                "rows": [
                    [r["system"], r["rounds"], r["acked"], r["lost"], r["note"]]
                    for r in out["durability"]
                ],
            }
        )
    return result


def main() -> int:
    if not PEER_PY.exists():
        print("no peer venv: run `bash bench/peers/setup.sh` first", file=sys.stderr)
        return 2
    skip = set(env_list("BENCH_SKIP", ""))
    stores = env_list("BENCH_MEM0_STORES", "qdrant,faiss")
    started = time.monotonic()
    out: dict[str, Any] = {}
    out_path: Path | None = None
    with tempfile.TemporaryDirectory(prefix="cmp-", dir=os.environ.get("BENCH_TMP")) as d:
        tmp = Path(d)
        sections: list[tuple[str, Callable[[], None]]] = [
            ("durability", lambda: section_durability(tmp, stores, out)),
            ("search", lambda: section_search(tmp, stores, out)),
            ("add", lambda: section_add(tmp, stores, out)),
            ("embed", lambda: section_embed_cost(out, stores[0])),
            ("locomo", lambda: section_locomo(tmp, stores[0], out)),
        ]
        for name, run in sections:
            if name in skip:
                continue
            print(f"== {name}", flush=True)
            t = time.monotonic()
            run()
            print(f"   ({time.monotonic() - t:.0f} s)", flush=True)
            # Written after every section, so a long run that dies keeps what it measured.
            out_path = write_result(
                os.environ.get("BENCH_RESULT_NAME", "compare"),
                "Side by side: memosd, mem0, bare faiss",
                command=command_line("bench/compare.py"),
                area="compare",
                tables=tables(out),
                raw={**out, "seconds": round(time.monotonic() - started)},
            )
    if out_path is None:
        return 0
    print(f"wrote {out_path} ({time.monotonic() - started:.0f} s)")
    png = os.environ.get("BENCH_PLOT", str(PNG))
    if "search" in out and png:
        subprocess.run([str(PEER_PY), str(PLOT), str(out_path), png], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
