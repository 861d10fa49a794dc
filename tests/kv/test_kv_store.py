"""KvStore: model identity, copy-on-read, frames, staleness, purge, budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from memosd.engine import Engine
from memosd.errors import BadRequest, CodecError, Conflict
from memosd.integrations.hf import generate_with_memory, logits_with_memory
from memosd.kv import HeatAwarePolicy, KvEntry, KvStore, LRUPolicy, frames_to_cache
from memosd.kv import build as build_module
from memosd.memcube.model import MemoryItem
from memosd.models import HFBackend
from memosd.models.backend import cache_keyword, output_cache

TEXTS = [
    "Alice prefers green tea over coffee.",
    "The deadline moved to Friday.",
    "Bob's cat sleeps on the router.",
]


def add(engine: Engine, *texts: str) -> list[MemoryItem]:
    return [engine.add("notes", t, actor="uid:1000", tier="long") for t in texts]


def blob_files(engine: Engine, kv: MemoryItem) -> list[str]:
    return sorted(set(kv.payload["blobs"].values()))  # type: ignore[index]


def test_other_model_is_refused(
    engine: Engine, tiny_backend: HFBackend, other_backend: HFBackend
) -> None:
    store = KvStore(engine, chunk_tokens=16)
    kv = store.build("notes", add(engine, *TEXTS), tiny_backend, actor="uid:1000")
    with pytest.raises(Conflict, match="built for model") as info:
        store.load("notes", kv.id, other_backend)
    assert info.value.reason == "fingerprint_mismatch"
    assert tiny_backend.short_fingerprint in info.value.message
    assert other_backend.short_fingerprint in info.value.message
    loaded = store.load("notes", kv.id, tiny_backend)
    with pytest.raises(Conflict):
        generate_with_memory(other_backend, None, loaded, "hi", max_new_tokens=2)


def test_copy_on_read_generate_twice(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine, chunk_tokens=16)
    kv = store.build("notes", add(engine, *TEXTS), tiny_backend, actor="uid:1000")
    loaded = store.load("notes", kv.id, tiny_backend)
    before = [(k.clone(), v.clone()) for k, v in loaded.layers]
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    first = generate_with_memory(tiny_backend, None, loaded, "Q: tea?", **kwargs)
    second = generate_with_memory(tiny_backend, None, loaded, "Q: tea?", **kwargs)
    assert first == second
    for (k, v), (k0, v0) in zip(loaded.layers, before, strict=True):
        assert torch.equal(k, k0)
        assert torch.equal(v, v0)
    # The same object again from the RAM cache, still pristine, same answer.
    again = store.load("notes", kv.id, tiny_backend)
    assert generate_with_memory(tiny_backend, None, again, "Q: tea?", **kwargs) == first
    # And it equals generating from the full text.
    ids = loaded.input_ids(tiny_backend.encode("Q: tea?"))
    with torch.no_grad():
        full = tiny_backend.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs
        )
    assert tiny_backend.tokenizer.decode(full[0, ids.shape[1] :], skip_special_tokens=True) == first


def test_frames_round_trip(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine, chunk_tokens=16)
    kv = store.build("notes", add(engine, *TEXTS), tiny_backend, actor="uid:1000")
    header, frames = store.frames("notes", kv.id, tiny_backend.fingerprint)
    assert len(frames) == 2 * len(tiny_backend.model.model.layers)
    wire = [bytes(f) for f in frames]  # what arrives over ZeroMQ
    back = frames_to_cache(header, wire)
    loaded = store.load("notes", kv.id, tiny_backend)
    assert back.token_ids == loaded.token_ids
    assert back.fingerprint == tiny_backend.fingerprint
    assert (back.item_id, back.version) == (kv.id, kv.version)
    for (k, v), (k2, v2) in zip(back.layers, loaded.layers, strict=True):
        assert torch.equal(k, k2)
        assert torch.equal(v, v2)
    assert back.cache.get_seq_length() == loaded.num_tokens
    # Zero copy on the sending side: the frames alias the stored tensors.
    k0 = loaded.layers[0][0]
    assert frames[0].nbytes == k0.numel() * k0.element_size()
    # Hostile or truncated replies are refused before any tensor is built.
    with pytest.raises(CodecError):
        frames_to_cache(header, wire[:-1])
    with pytest.raises(CodecError):
        frames_to_cache(header, [*wire[:-1], wire[-1][:-4]])
    with pytest.raises(CodecError):
        frames_to_cache({**header, "dtype": "object"}, wire)
    with pytest.raises(CodecError):
        frames_to_cache({**header, "format": "pickle"}, wire)


def test_manifest_and_chunks_never_pickle(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine, chunk_tokens=16)
    kv = store.build("notes", add(engine, *TEXTS), tiny_backend, actor="uid:1000")
    for sha in blob_files(engine, kv):
        data = engine.blobs.read(sha)
        assert b"pickle" not in data[:200]
        assert data[8:9] == b"{"  # a safetensors JSON header
    assert kv.form == "activation"
    assert kv.tier == "long"
    assert kv.provenance.parents == tuple(
        sorted((i.id, i.version) for i in engine.list_items("notes", form="plaintext"))
    )


def test_build_refuses_outdated_source(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine)
    (item,) = add(engine, TEXTS[0])
    engine.update("notes", item.id, text="Alice now drinks coffee.", actor="uid:1000")
    with pytest.raises(Conflict):
        store.build("notes", [item], tiny_backend, actor="uid:1000")
    with pytest.raises(BadRequest):
        store.build("notes", [], tiny_backend, actor="uid:1000")


def test_stale_on_update_and_delete_then_rebuild(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine, chunk_tokens=16)
    a, b, c = add(engine, *TEXTS)
    kv = store.build("notes", [a, b, c], tiny_backend, actor="uid:1000", name="daily")
    # A new version with the same text (tags only) does not make it stale.
    engine.update("notes", a.id, tags=["drinks"], actor="uid:1000")
    assert store.process_changes().marked_stale == []
    engine.update("notes", b.id, text="The deadline moved to Monday.", actor="uid:1000")
    report = store.process_changes()
    assert report.marked_stale == [("notes", kv.id)]
    with pytest.raises(Conflict, match="stale") as info:
        store.load("notes", kv.id, tiny_backend)
    assert info.value.reason == "stale"
    assert store.load("notes", kv.id, tiny_backend, allow_stale=True).num_tokens > 0
    engine.delete("notes", c.id, actor="uid:1000")
    assert store.process_changes().marked_stale == []  # already stale
    (new,) = store.rebuild_stale(tiny_backend, actor="uid:1000")
    assert new.metadata["kv_name"] == "daily"
    assert new.metadata["replaces"] == kv.id
    sources = dict(new.payload["manifest"]["sources"])  # type: ignore[index]
    assert sources == {a.id: 2, b.id: 2}
    assert store.find("notes", "daily").item_id == new.id
    assert [i.item_id for i in store.list_caches("notes")] == [new.id]
    loaded = store.load("notes", new.id, tiny_backend)
    assert "Monday" in tiny_backend.tokenizer.decode(list(loaded.token_ids))
    assert "router" not in tiny_backend.tokenizer.decode(list(loaded.token_ids))


def test_purge_of_source_erases_tensors(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine, chunk_tokens=16)
    a, b, c = add(engine, *TEXTS)
    kv = store.build("notes", [a, b, c], tiny_backend, actor="uid:1000", name="daily")
    # Another cache shares the chunks before b's text.
    other = store.build("notes", [a], tiny_backend, actor="uid:1000")
    shared = set(blob_files(engine, kv)) & set(blob_files(engine, other))
    only_kv = set(blob_files(engine, kv)) - shared
    assert only_kv
    engine.purge("notes", b.id, actor="uid:1000", reason="GDPR")
    report = store.process_changes(actor="uid:1000")
    assert report.purged == [("notes", kv.id)]
    assert all(not engine.blobs.exists(sha) for sha in only_kv)
    assert all(engine.blobs.exists(sha) for sha in shared)
    with pytest.raises(Exception, match="purged"):
        engine.get("notes", kv.id)
    (placeholder,) = report.placeholders
    with pytest.raises(Conflict, match="rebuild"):
        store.load("notes", placeholder[1], tiny_backend)
    (new,) = store.rebuild_stale(tiny_backend, actor="uid:1000")
    text = tiny_backend.tokenizer.decode(list(store.load("notes", new.id, tiny_backend).token_ids))
    assert "deadline" not in text
    assert "router" in text
    assert new.metadata["kv_name"] == "daily"


def test_scan_catches_changes_missed_while_down(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine, chunk_tokens=16)
    a, b = add(engine, *TEXTS[:2])
    kv = store.build("notes", [a, b], tiny_backend, actor="uid:1000")
    fresh = KvStore(engine, chunk_tokens=16, listen=False)  # a restarted daemon
    engine.update("notes", a.id, text="changed", actor="uid:1000")
    assert fresh.scan().marked_stale == [("notes", kv.id)]


def test_budget_evicts_least_recently_used(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine, chunk_tokens=16)
    items = add(engine, "one " * 20, "two " * 20, "three " * 20)
    kvs = [store.build("notes", [it], tiny_backend, actor="uid:1000") for it in items]
    per_cache = kvs[0].metadata["bytes"]
    store.load("notes", kvs[0].id, tiny_backend)  # the oldest cache, but used recently
    store.budget_bytes = int(per_cache * 3.5)
    fourth = add(engine, "four " * 20)[0]
    kv4 = store.build("notes", [fourth], tiny_backend, actor="uid:1000")
    remaining = {i.item_id for i in store.list_caches("notes")}
    assert kv4.id in remaining
    assert kvs[0].id in remaining
    assert kvs[1].id not in remaining  # least recently used
    assert store.usage_bytes() <= store.budget_bytes


def test_policies_order() -> None:
    old_hot = KvEntry("c", "a", 10, built_us=0, last_used_us=1_000_000, hits=50)
    new_cold = KvEntry("c", "b", 10, built_us=0, last_used_us=2_000_000, hits=0)
    now = 3_000_000
    assert [e.item_id for e in LRUPolicy().eviction_order([old_hot, new_cold], now)] == ["a", "b"]
    heat = HeatAwarePolicy(half_life_s=3600)
    assert [e.item_id for e in heat.eviction_order([old_hot, new_cold], now)] == ["b", "a"]


def test_frames_over_zeromq_zero_copy(
    engine: Engine, tiny_backend: HFBackend, tmp_path: Path
) -> None:
    zmq = pytest.importorskip("zmq")
    store = KvStore(engine, chunk_tokens=16)
    kv = store.build("notes", add(engine, *TEXTS), tiny_backend, actor="uid:1000")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind(f"ipc://{tmp_path}/kv.sock")
        b.connect(f"ipc://{tmp_path}/kv.sock")
        header, frames = store.frames("notes", kv.id, tiny_backend.fingerprint)
        a.send_multipart([msgpack.packb(header), *frames], copy=False)
        parts = b.recv_multipart(copy=False)
        got = frames_to_cache(msgpack.unpackb(parts[0].bytes), parts[1:])
        cont = tiny_backend.encode("Q: tea?")
        want = logits_with_memory(tiny_backend, store.load("notes", kv.id, tiny_backend), cont)
        assert torch.equal(logits_with_memory(tiny_backend, got, cont), want)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_listener_filters_and_overflow(
    engine: Engine, tiny_backend: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KvStore(engine, chunk_tokens=16)
    a, b = add(engine, *TEXTS[:2])
    kv = store.build("notes", [a], tiny_backend, actor="uid:1000")
    store.process_changes()  # the cube is indexed now
    engine.update("notes", b.id, text="unrelated change", actor="uid:1000")
    assert store.pending() == 0  # b is not a source of any cache
    monkeypatch.setattr(build_module, "MAX_PENDING_EVENTS", 0)
    engine.update("notes", a.id, text="relevant change", actor="uid:1000")
    assert store.pending() == 0  # dropped, but remembered as an overflow
    assert store.process_changes().marked_stale == [("notes", kv.id)]  # via a full scan


def test_cube_drop_forgets_everything(engine: Engine, tiny_backend: HFBackend) -> None:
    store = KvStore(engine, chunk_tokens=16)
    kv = store.build("notes", add(engine, *TEXTS[:1]), tiny_backend, actor="uid:1000")
    shas = blob_files(engine, kv)
    store.load("notes", kv.id, tiny_backend)
    engine.drop_cube("notes")
    store.process_changes()
    assert all(not engine.blobs.exists(s) for s in shas)
    assert not store._ram  # the RAM copy is gone too


def test_cache_keyword_follows_the_model_signature() -> None:
    class Old:
        def forward(self, input_ids: Any = None, past_key_values: Any = None) -> None: ...

    class New:
        def forward(self, input_ids: Any = None, cache: Any = None) -> None: ...

    class Wrapped:  # a peft model: forward(*args, **kwargs), the real model inside
        def __init__(self, base: Any) -> None:
            self.base = base

        def get_base_model(self) -> Any:
            return self.base

        def forward(self, *args: Any, **kwargs: Any) -> None: ...

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"
    assert cache_keyword(Wrapped(New())) == "cache"
    assert output_cache({"cache": 1, "logits": 2}) == 1
    assert output_cache({"past_key_values": 3, "logits": 2}) == 3
