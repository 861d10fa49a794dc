"""Activation memory benchmark: time to first token with and without a KV cache.

For memory prefixes of about 512, 1k, 2k and 4k tokens, with a ~104M-parameter
Llama-style CPU model built from a config (:func:`memosd.models.testing.build_model_100m`,
float32), measured in one run:

(a) **full prefill** - the model reads prefix + prompt, first token = argmax of
    the last logits;
(b) **disk** - :meth:`KvStore.load` with its RAM cache emptied (chunk blobs read
    from the blob store - warm OS page cache - decoded, concatenated), then
    prompt only with the injected cache (copy-on-read included);
(c) **daemon** - a real ``memosd`` (subprocess, temporary data dir) built
    the same cache with ``kv_build`` (a ``kv.build`` job); the client fetches it
    with ``Client.kv_get`` over the daemon's ``ipc://`` socket (header + 2 x
    layers raw frames, sent ``copy=False`` from the daemon's RAM cache, received
    zero-copy), then runs the prompt only with the injected cache.

Also: the cost of the fetch alone (``kv_get`` round trip + rebuild) as a share
of recomputing the prefix, and for one size the int8 quantized cache's size and
logit error.

Usage: ``python bench/kv.py [--sizes 512,1024,2048,4096] [--repeat 3]
[--model-dir DIR] [--threads 1]`` (the model is built once into DIR, default
``$TMPDIR/memosd-bench-100m``).  ``make bench``: ``BENCH_KV_SIZES``,
``BENCH_KV_REPEAT`` (default 1; 3 with ``BENCH_FULL=1``); the result goes to
``$BENCH_OUT`` (bench/_result.py) for bench/render.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _result import write_result  # bench/ is on sys.path (the script's directory)

from memosd.client import Client
from memosd.engine import Engine
from memosd.integrations.hf import logits_with_memory
from memosd.kv import KvStore, LoadedCache
from memosd.models import HFBackend
from memosd.models.testing import build_model_100m
from memosd.testing import DaemonHandle

PROMPT = "\nQuestion: what did Alice decide about the Friday release?\nAnswer:"
FACTS = [
    "Alice decided to move the release to Friday after the WAL fix landed.",
    "Bob keeps the on-call rota in the shared calendar, rotating every Monday.",
    "The staging cluster runs two nodes with 64 GB of RAM each.",
    "Carol prefers written design reviews over meetings.",
    "The customer asked for CSV export of the audit log by next quarter.",
    "Backups are verified weekly by restoring into a scratch environment.",
    "Dave's team owns the ingestion pipeline and its alerting.",
    "Latency budget for search is 50 ms at p99 on the reference machine.",
]


def fetch(client: Client, backend: HFBackend, cube: str, item_id: str) -> LoadedCache:
    """``kv_get`` from the daemon: frames received zero-copy, fingerprint checked."""
    return client.kv_get(cube, item_id, backend)


def first_token_full(backend: HFBackend, ids: list[int]) -> int:
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([ids])).logits
    return int(logits[0, -1].argmax())


def first_token_cached(backend: HFBackend, loaded: LoadedCache, prompt: list[int]) -> int:
    return int(logits_with_memory(backend, loaded, prompt)[-1].argmax())


def timed(fn: Any, repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    full = os.environ.get("BENCH_FULL") == "1"
    parser.add_argument(
        "--sizes",
        default=os.environ.get("BENCH_KV_SIZES") or "512,1024,2048,4096",
    )
    parser.add_argument(
        "--repeat", type=int, default=int(os.environ.get("BENCH_KV_REPEAT") or (3 if full else 1))
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--quant-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]

    model_dir = args.model_dir or Path(tempfile.gettempdir()) / "memosd-bench-100m"
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        build_model_100m(model_dir)
        print(f"built model in {time.perf_counter() - t0:.1f} s -> {model_dir}")
    backend = HFBackend.load(model_dir)
    params = sum(p.numel() for p in backend.model.parameters())
    print(
        f"model: {params / 1e6:.0f}M params, float32, torch threads {torch.get_num_threads()}, "
        f"fingerprint {backend.short_fingerprint}"
    )
    prompt = backend.encode(PROMPT)

    with tempfile.TemporaryDirectory() as tmp, Engine.open(Path(tmp) / "data") as engine:
        engine.create_cube("bench", owner="uid:0")
        store = KvStore(engine, Path(tmp), ram_cache_bytes=4 << 30)
        (Path(tmp) / "daemon").mkdir()
        daemon = DaemonHandle(
            Path(tmp) / "daemon",
            env={
                "MEMOSD_KV_RAM_CACHE_BYTES": str(4 << 30),
                "MEMOSD_MODELS_ALLOWED_DIRS": str(model_dir),
                "MEMOSD_LOG_LEVEL": "warning",
            },
        ).start(timeout=120)
        client = Client(daemon.socket, timeout=600)
        client.create_cube("bench")

        rows = []
        quant_row = None
        counter = 0
        for size in sizes:
            items = []
            length = len(backend.encode("Memory:\n")) + 2
            while length < size:
                text = f"[{counter}] {FACTS[counter % len(FACTS)]}"
                counter += 1
                items.append(engine.add("bench", text, actor="uid:0", tier="long"))
                length += len(backend.encode(f"- {text}\n"))
            t0 = time.perf_counter()
            kv = store.build("bench", items, backend, actor="uid:0")
            build_s = time.perf_counter() - t0
            # The same memories in the daemon's cube, cached by a kv.build job there.
            ids = [client.add("bench", it.text, tier="long").id for it in items]
            t0 = time.perf_counter()
            built = client.kv_build("bench", model=model_dir, items=ids, timeout=3600)
            daemon_build_s = time.perf_counter() - t0
            daemon_kv = built["item"].id
            tokens = kv.metadata["num_tokens"]
            store._ram.clear()
            store._ram_bytes = 0
            loaded = store.load("bench", kv.id, backend)
            full_ids = [*loaded.token_ids, *prompt]

            t_full, tok_full = timed(
                lambda ids=full_ids: first_token_full(backend, ids), args.repeat
            )

            def disk_path(kv_id: str = kv.id) -> int:
                store._ram.clear()
                store._ram_bytes = 0
                cache = store.load("bench", kv_id, backend)
                return first_token_cached(backend, cache, prompt)

            t_disk, tok_disk = timed(disk_path, args.repeat)
            fetch(client, backend, "bench", daemon_kv)  # the daemon now holds it in RAM
            t_fetch, fetched = timed(
                lambda kv_id=daemon_kv: fetch(client, backend, "bench", kv_id), args.repeat
            )
            t_ipc, tok_ipc = timed(
                lambda kv_id=daemon_kv: first_token_cached(
                    backend, fetch(client, backend, "bench", kv_id), prompt
                ),
                args.repeat,
            )
            assert tok_full == tok_disk == tok_ipc, (tok_full, tok_disk, tok_ipc)
            assert fetched.token_ids == loaded.token_ids
            rows.append(
                (
                    tokens,
                    kv.metadata["bytes"],
                    build_s,
                    daemon_build_s,
                    t_full,
                    t_disk,
                    t_ipc,
                    t_fetch,
                )
            )
            if size == args.quant_size:
                q = store.build("bench", items, backend, actor="uid:0", quant="int8")
                qc = store.load("bench", q.id, backend)
                with torch.no_grad():
                    logits = backend.model(input_ids=torch.tensor([full_ids])).logits
                    want = logits[0, len(loaded.token_ids) :]
                    got = logits_with_memory(backend, qc, prompt)
                    exact = logits_with_memory(backend, loaded, prompt)
                quant_row = (
                    tokens,
                    kv.metadata["bytes"],
                    q.metadata["bytes"],
                    float((exact - want).abs().max()),
                    float((got - want).abs().max()),
                    float(want.abs().max()),
                    bool((got.argmax(-1) == want.argmax(-1)).all()),
                )
        client.close()
        daemon.stop()

    print()
    print(
        f"{'tokens':>7} {'KV MB':>7} {'build s':>8} {'daemon s':>9} {'(a) full ms':>12} "
        f"{'(b) disk ms':>12} {'(c) daemon ms':>14} {'a/b':>6} {'a/c':>6} {'fetch ms':>9} "
        f"{'fetch/recompute':>16}"
    )
    for tokens, nbytes, build_s, daemon_s, t_full, t_disk, t_ipc, t_fetch in rows:
        print(
            f"{tokens:>7} {nbytes / 2**20:>7.1f} {build_s:>8.2f} {daemon_s:>9.2f} "
            f"{t_full * 1e3:>12.1f} "
            f"{t_disk * 1e3:>12.1f} {t_ipc * 1e3:>14.1f} {t_full / t_disk:>5.1f}x "
            f"{t_full / t_ipc:>5.1f}x {t_fetch * 1e3:>9.1f} {t_fetch / t_full:>15.1%}"
        )
    if quant_row:
        tokens, exact_b, q_b, err_exact, err_q, scale, same = quant_row
        print(
            f"\nint8 KV at {tokens} tokens: {exact_b / 2**20:.1f} MB -> {q_b / 2**20:.1f} MB "
            f"({exact_b / q_b:.2f}x smaller); max |logit error| exact cache {err_exact:.2e}, "
            f"int8 {err_q:.2e} (max |logit| {scale:.2f}); same argmax on all prompt tokens: {same}"
        )
    print(f"\n(cpu count {os.cpu_count()}; medians of {args.repeat}; disk = warm page cache)")
    tables: list[dict[str, Any]] = [
        {
            "caption": (
                f"time to first token, 104M-parameter model, float32, {args.threads} torch "
                f"thread(s) in the client, prompt {len(prompt)} tokens, medians of {args.repeat}; "
                "(c) = a real memosd, cache built by its kv.build job, fetched with kv_get"
            ),
            "columns": [
                "prefix tokens",
                "KV MB",
                "(a) full prefill ms",
                "(b) disk + inject ms",
                "(c) daemon kv_get + inject ms",
                "a/b",
                "a/c",
                "fetch ms",
                "fetch / recompute %",
                "daemon build s",
            ],
            "rows": [
                [
                    tokens,
                    round(nbytes / 2**20, 1),
                    round(t_full * 1e3),
                    round(t_disk * 1e3),
                    round(t_ipc * 1e3),
                    round(t_full / t_disk, 1),
                    round(t_full / t_ipc, 1),
                    round(t_fetch * 1e3, 1),
                    round(100 * t_fetch / t_full, 2),
                    round(daemon_s, 1),
                ]
                for tokens, nbytes, _, daemon_s, t_full, t_disk, t_ipc, t_fetch in rows
            ],
        }
    ]
    if quant_row:
        tokens, exact_b, q_b, err_exact, err_q, scale, same = quant_row
        tables.append(
            {
                "caption": "int8 KV (keys per channel, values per token) vs the exact cache",
                "columns": [
                    "prefix tokens",
                    "exact MB",
                    "int8 MB",
                    "smaller",
                    "max logit error exact",
                    "max logit error int8",
                    "max logit",
                    "same argmax",
                ],
                "rows": [
                    [
                        tokens,
                        round(exact_b / 2**20, 1),
                        round(q_b / 2**20, 1),
                        round(exact_b / q_b, 2),
                        f"{err_exact:.1e}",
                        f"{err_q:.1e}",
                        round(scale, 2),
                        same,
                    ]
                ],
            }
        )
    write_result(
        "kv",
        "Activation memory",
        tables=tables,
        command=f".venv/bin/python bench/kv.py --sizes {args.sizes} "
        f"--repeat {args.repeat} --threads {args.threads}",
    )


if __name__ == "__main__":
    main()
