"""Injected cache + continuation gives the logits of the full text (float32)."""

from __future__ import annotations

import pytest
import torch

from memosd.engine import Engine
from memosd.integrations.hf import logits_with_memory
from memosd.kv import KvStore, LoadedCache
from memosd.memcube.model import MemoryItem
from memosd.models import HFBackend

TEXTS = [
    "Alice prefers green tea over coffee.",
    "The project deadline moved to Friday, 17:00 UTC.",
    "Bob's cat is called Ünïcode ✓ and sleeps on the router.",
    "Server room door code: ask facilities, never store it here.",
    "Meeting notes: ship the WAL first, then the daemon, then KV caches.",
]
CONTINUATIONS = ["Q: What does Alice drink?\nA:", " ok", "Who owns the cat? Bob does, since 2019."]


def full_logits(backend: HFBackend, prefix: tuple[int, ...], cont: list[int]) -> torch.Tensor:
    ids = torch.tensor([[*prefix, *cont]])
    with torch.no_grad():
        logits: torch.Tensor = backend.model(input_ids=ids).logits[0, len(prefix) :]
    return logits


def add_items(engine: Engine, texts: list[str]) -> list[MemoryItem]:
    return [engine.add("notes", t, actor="uid:1000", tier="long") for t in texts]


@pytest.mark.parametrize(("chunk_tokens", "prefill_step"), [(16, 2048), (256, 2048), (16, 7)])
def test_injected_cache_matches_full_prefill(
    engine: Engine, tiny_backend: HFBackend, chunk_tokens: int, prefill_step: int
) -> None:
    store = KvStore(engine, chunk_tokens=chunk_tokens, prefill_step=prefill_step)
    items = add_items(engine, TEXTS)
    for n in (1, 3, 5):
        kv = store.build("notes", items[:n], tiny_backend, actor="uid:1000")
        loaded = store.load("notes", kv.id, tiny_backend)
        assert loaded.num_tokens == kv.metadata["num_tokens"]
        for text in CONTINUATIONS:
            cont = tiny_backend.encode(text)
            got = logits_with_memory(tiny_backend, loaded, cont)
            want = full_logits(tiny_backend, loaded.token_ids, cont)
            assert (got - want).abs().max().item() < 1e-4


def test_incremental_build_matches_scratch(engine: Engine, tiny_backend: HFBackend) -> None:
    items = add_items(engine, TEXTS)
    store = KvStore(engine, chunk_tokens=16)
    first = store.build("notes", items[:2], tiny_backend, actor="uid:1000")
    extended = store.build("notes", items, tiny_backend, actor="uid:1000")
    # The extension reused every token the first cache covered.
    first_tokens = first.metadata["num_tokens"]
    footer = len(tiny_backend.encode(store.template.footer))
    assert extended.metadata["reused_tokens"] == first_tokens - footer
    first_chunks = {c["blob"] for c in first.payload["manifest"]["chunks"][:-1]}  # type: ignore[index]
    ext_chunks = {c["blob"] for c in extended.payload["manifest"]["chunks"]}  # type: ignore[index]
    assert first_chunks
    assert first_chunks <= ext_chunks

    # The same prefix built with reuse disabled: every token computed in one pass.
    scratch_store = KvStore(engine, chunk_tokens=16, listen=False)
    scratch_store._chunk_index = lambda *a: ({}, {})  # type: ignore[method-assign]
    scratch = scratch_store.build("notes", items, tiny_backend, actor="uid:1000")
    assert scratch.metadata["reused_tokens"] == 0
    a = store.load("notes", extended.id, tiny_backend)
    b = scratch_store.load("notes", scratch.id, tiny_backend)
    assert a.token_ids == b.token_ids
    for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True):
        assert (ka - kb).abs().max().item() < 1e-4
        assert (va - vb).abs().max().item() < 1e-4
    cont = tiny_backend.encode(CONTINUATIONS[0])
    diff = logits_with_memory(tiny_backend, a, cont) - full_logits(tiny_backend, a.token_ids, cont)
    assert diff.abs().max().item() < 1e-4


def test_identical_rebuild_computes_nothing(engine: Engine, tiny_backend: HFBackend) -> None:
    items = add_items(engine, TEXTS[:3])
    store = KvStore(engine, chunk_tokens=16)
    a = store.build("notes", items, tiny_backend, actor="uid:1000")
    b = store.build("notes", items, tiny_backend, actor="uid:1000")
    assert b.metadata["reused_tokens"] == a.metadata["num_tokens"]
    assert a.payload["blobs"] == b.payload["blobs"]  # type: ignore[index]


def test_int8_quantization_error_and_size(engine: Engine, tiny_backend: HFBackend) -> None:
    items = add_items(engine, TEXTS)
    exact_store = KvStore(engine, chunk_tokens=16)
    exact = exact_store.build("notes", items, tiny_backend, actor="uid:1000")
    quant = exact_store.build("notes", items, tiny_backend, actor="uid:1000", quant="int8")
    # Tiny heads (16 dims) and chunks (16 tokens): scales and headers weigh more
    # than at real sizes (see the bench for those).
    assert quant.metadata["bytes"] < 0.45 * exact.metadata["bytes"]
    q = exact_store.load("notes", quant.id, tiny_backend)
    e = exact_store.load("notes", exact.id, tiny_backend)
    cont = tiny_backend.encode(CONTINUATIONS[0])
    want = full_logits(tiny_backend, e.token_ids, cont)
    err = (logits_with_memory(tiny_backend, q, cont) - want).abs().max().item()
    assert err < 5e-2 * want.abs().max().item()


def test_loaded_cache_type(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine)
    kv = store.build("notes", add_items(engine, TEXTS[:1]), tiny_backend, actor="uid:1000")
    loaded = store.load("notes", kv.id, tiny_backend)
    assert isinstance(loaded, LoadedCache)
    cache = loaded.cache
    assert type(cache).__name__ == "DynamicCache"
    assert cache.get_seq_length() == loaded.num_tokens
