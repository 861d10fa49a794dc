"""Activation memory benchmark: time to first token with and without a KV cache.

For memory prefixes of about 512, 1k, 2k and 4k tokens, with a ~104M-parameter
Llama-style CPU model built from a config (:func:`memosd.models.testing.build_model_100m`,
float32), measured in one run:

(a) **full prefill** - the model reads prefix + prompt, first token = argmax of
    the last logits;
(b) **disk** - :meth:`KvStore.load` with its RAM cache emptied (chunk blobs read
    from the blob store - warm OS page cache - decoded, concatenated), then
    prompt only with the injected cache (copy-on-read included);
(c) **IPC** - the cache fetched as ZeroMQ frames over an ``ipc://`` socket from a
    server thread holding it in RAM (what the daemon's ``kv_get`` does: header
    + 2 x layers raw frames, ``copy=False``), rebuilt with ``frames_to_cache``,
    then prompt only.  The daemon adds its request dispatch (~0.1 ms) on top.

Also: the cost of the fetch alone (IPC transfer + rebuild) as a share of
recomputing the prefix, and for one size the int8 quantized cache's size and
logit error.

Usage: ``python bench/kv_bench.py [--sizes 512,1024,2048,4096] [--repeat 3]
[--model-dir DIR] [--threads 1]`` (the model is built once into DIR, default
``$TMPDIR/memosd-bench-100m``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

from memosd.engine import Engine
from memosd.integrations.hf import logits_with_memory
from memosd.kv import KvStore, LoadedCache, frames_to_cache
from memosd.models import HFBackend
from memosd.models.testing import build_model_100m

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


def serve(store: KvStore, endpoint: str, fingerprint: str, stop: threading.Event) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(50):
            continue
        ident, body = sock.recv_multipart()
        req = msgpack.unpackb(body)
        header, frames = store.frames(req["cube"], req["item_id"], fingerprint)
        sock.send_multipart([ident, msgpack.packb(header), *frames], copy=False)
    sock.close(0)


def fetch(sock: Any, cube: str, item_id: str) -> LoadedCache:
    sock.send(msgpack.packb({"op": "kv_get", "cube": cube, "item_id": item_id}))
    parts = sock.recv_multipart(copy=False)
    header = msgpack.unpackb(parts[0].bytes)
    return frames_to_cache(header, parts[1:])


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
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--repeat", type=int, default=3)
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
        endpoint = f"ipc://{tmp}/kv.sock"
        stop = threading.Event()
        server = threading.Thread(
            target=serve, args=(store, endpoint, backend.fingerprint, stop), daemon=True
        )
        server.start()
        ctx = zmq.Context.instance()
        client = ctx.socket(zmq.DEALER)
        client.connect(endpoint)

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
            store.load("bench", kv.id, backend)  # the server holds it in RAM
            t_fetch, fetched = timed(lambda kv_id=kv.id: fetch(client, "bench", kv_id), args.repeat)
            t_ipc, tok_ipc = timed(
                lambda kv_id=kv.id: first_token_cached(
                    backend, fetch(client, "bench", kv_id), prompt
                ),
                args.repeat,
            )
            assert tok_full == tok_disk == tok_ipc, (tok_full, tok_disk, tok_ipc)
            assert fetched.token_ids == loaded.token_ids
            rows.append((tokens, kv.metadata["bytes"], build_s, t_full, t_disk, t_ipc, t_fetch))
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
        stop.set()
        server.join()
        client.close(0)

    print()
    print(
        f"{'tokens':>7} {'KV MB':>7} {'build s':>8} {'(a) full ms':>12} {'(b) disk ms':>12} "
        f"{'(c) IPC ms':>11} {'a/b':>6} {'a/c':>6} {'fetch ms':>9} {'fetch/recompute':>16}"
    )
    for tokens, nbytes, build_s, t_full, t_disk, t_ipc, t_fetch in rows:
        print(
            f"{tokens:>7} {nbytes / 2**20:>7.1f} {build_s:>8.2f} {t_full * 1e3:>12.1f} "
            f"{t_disk * 1e3:>12.1f} {t_ipc * 1e3:>11.1f} {t_full / t_disk:>5.1f}x "
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


if __name__ == "__main__":
    main()
