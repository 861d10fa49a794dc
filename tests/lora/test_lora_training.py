"""Parameter memory end to end on a tiny Llama: train, gate, reload, forget, combine."""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Sequence

import pytest
import torch

from memosd.engine import Engine
from memosd.errors import Conflict, NotFound
from memosd.lora import (
    LoraSettings,
    LoraStore,
    TrainingProgress,
    encode_adapter,
    load_adapter_bytes,
)
from memosd.lora.dataset import encode_text, format_memory
from memosd.lora.train import train_peft_model
from memosd.memcube.model import MemoryItem
from memosd.models.backend import HFBackend

MEMORIES = (
    "Alice's favourite colour is teal and she owns two cats named Pixel and Byte.",
    "The deadline for the Orion database migration is the 14th of March.",
    "Bob drinks green tea without sugar every afternoon at four.",
    "The staging database lives on host db-stage-3 in rack twelve.",
    "Carol runs the Tuesday reading group on distributed systems.",
    "The office wifi password rotates on the first Monday of each month.",
)

#: A 64-wide, 2-layer model has little room: adapt every linear module, at a
#: far higher learning rate than a real model needs (40 full-batch steps).
TINY_SETTINGS = LoraSettings(
    rank=16,
    alpha=32,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    learning_rate=1e-2,  # 2e-2 overshoots: control perplexity rises ~10%
    epochs=40,
    batch_size=6,
    control_max_tokens=512,
)
#: For tests where the adapter's quality does not matter.
QUICK_SETTINGS = dataclasses.replace(
    TINY_SETTINGS, learning_rate=2e-2, epochs=3, min_memory_ppl_drop=0.0, max_control_ppl_rise=1.0
)


def add_memories(
    engine: Engine, cube: str = "notes", texts: Sequence[str] = MEMORIES
) -> list[MemoryItem]:
    return [engine.add(cube, text, tier="long") for text in texts]


def _logits(model: object, text: str, backend: HFBackend) -> torch.Tensor:
    ids = torch.tensor([encode_text(backend.tokenizer, format_memory(text), 256)])
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=ids).logits  # type: ignore[operator]
    return out


def test_training_lowers_memory_perplexity_and_stores_a_parameter_item(
    engine: Engine, tiny_backend: HFBackend
) -> None:
    items = add_memories(engine)
    store = LoraStore(engine)
    result = store.train("notes", items, tiny_backend, TINY_SETTINGS, in_process=True)

    assert result.report is not None
    assert result.outcome == "promoted", str(result.report.to_dict())[100:]
    assert result.report.memory_drop >= 0.30, result.report.to_dict()
    assert result.active_version == 1
    adapter = result.adapter
    assert adapter is not None
    assert adapter.active
    assert adapter.gate == "passed"
    assert adapter.trained_on == tuple(sorted(it.key for it in items))
    assert adapter.base_fingerprint == tiny_backend.fingerprint
    item = store.adapter_item("notes")
    assert item is not None
    assert (item.form, item.tier) == ("parameter", "long")
    manifest = (item.payload or {})["manifest"]
    assert manifest["settings"]["learning_rate"] == TINY_SETTINGS.learning_rate
    assert manifest["training"]["loss_curve"][-1] < manifest["training"]["loss_curve"][0]
    assert engine.blobs.exists((item.payload or {})["blobs"]["adapter"])
    assert "gate passed" in item.text


def test_saved_and_reloaded_adapter_gives_identical_logits(tiny_backend: HFBackend) -> None:
    settings = QUICK_SETTINGS
    sequences = [encode_text(tiny_backend.tokenizer, format_memory(t), 256) for t in MEMORIES]
    trained = train_peft_model(
        copy.deepcopy(tiny_backend.model),
        sequences,
        settings,
        pad_id=tiny_backend.tokenizer.pad_token_id,
    )
    blob = encode_adapter(
        trained.peft_model, base_fingerprint=tiny_backend.fingerprint, settings=settings
    )
    reloaded = load_adapter_bytes(
        blob, tiny_backend.model, model_fingerprint=tiny_backend.fingerprint
    )
    before = _logits(trained.peft_model, MEMORIES[0], tiny_backend)
    after = _logits(reloaded, MEMORIES[0], tiny_backend)
    base = _logits(tiny_backend.model, MEMORIES[0], tiny_backend)
    assert torch.equal(before, after)
    assert not torch.equal(before, base)  # the adapter does something...
    assert not hasattr(tiny_backend.model, "peft_config")  # ...but not to the shared model


def test_store_round_trip_and_fingerprint_mismatch(
    engine: Engine, tiny_backend: HFBackend, other_backend: HFBackend
) -> None:
    store = LoraStore(engine)
    store.train(
        "notes",
        add_memories(engine),
        tiny_backend,
        QUICK_SETTINGS,
        in_process=True,
    )
    first = store.load_adapter("notes", tiny_backend)
    second = store.load_adapter("notes", tiny_backend)
    assert torch.equal(
        _logits(first, MEMORIES[1], tiny_backend), _logits(second, MEMORIES[1], tiny_backend)
    )
    with pytest.raises(Conflict) as excinfo:
        store.load_adapter("notes", other_backend)
    assert excinfo.value.reason == "fingerprint_mismatch"
    data, _ = store.adapter_bytes("notes")
    with pytest.raises(Conflict):
        load_adapter_bytes(data, other_backend.model, model_fingerprint=other_backend.fingerprint)


def test_gate_rejects_absurd_learning_rate_and_keeps_the_active_adapter(
    engine: Engine, tiny_backend: HFBackend
) -> None:
    items = add_memories(engine)
    store = LoraStore(engine)
    good = store.train("notes", items, tiny_backend, QUICK_SETTINGS, in_process=True)
    assert good.outcome == "promoted"
    absurd = dataclasses.replace(QUICK_SETTINGS, learning_rate=10.0, max_control_ppl_rise=0.1)
    bad = store.train("notes", items, tiny_backend, absurd, in_process=True)

    assert bad.outcome == "rejected"
    assert bad.report is not None
    assert not bad.report.passed
    assert any("control" in reason for reason in bad.report.reasons), bad.report.reasons
    assert bad.active_version == 1
    versions = store.versions("notes")
    assert [(v.version, v.gate, v.active) for v in versions] == [
        (1, "passed", True),
        (2, "rejected", False),
    ]
    # Rolling back to the good adapter writes version 3, which becomes active.
    rolled = store.rollback("notes", 1)
    assert (rolled.version, rolled.active, rolled.sha256) == (3, True, versions[0].sha256)


def test_purge_marks_stale_and_retrain_forgets_the_item(
    engine: Engine, tiny_backend: HFBackend
) -> None:
    items = add_memories(engine)
    noted: list[tuple[str, str]] = []
    store = LoraStore(engine, on_stale=lambda cube, item_id: noted.append((cube, item_id)))
    first = store.train("notes", items, tiny_backend, QUICK_SETTINGS, in_process=True)
    assert first.adapter is not None
    old_sha, old_item = first.adapter.sha256, first.adapter.item_id
    assert store.stale_cubes() == set()

    forgotten = items[2]
    engine.purge("notes", forgotten.id, reason="user asked")
    assert noted == [("notes", forgotten.id)]
    assert store.stale_cubes() == {"notes"}
    assert store.versions("notes")[0].stale
    with pytest.raises(NotFound):  # the only version is stale: nothing active to serve
        store.load_adapter("notes", tiny_backend)
    with pytest.raises(Conflict):
        store.adapter_bytes("notes", version=1)
    with pytest.raises(Conflict):
        store.rollback("notes", 1)

    result = store.retrain_stale("notes", tiny_backend, in_process=True)
    assert result is not None
    assert result.outcome == "promoted"
    assert result.dropped_versions == (1,)
    assert result.replaced_item == old_item
    assert result.adapter is not None
    assert forgotten.id not in {item_id for item_id, _ in result.adapter.trained_on}
    assert len(result.adapter.trained_on) == len(items) - 1
    assert not engine.blobs.exists(old_sha)  # the stale weights are erased
    assert [v.version for v in store.versions("notes")] == [1]
    assert store.stale_cubes(rescan=True) == set()
    assert store.retrain_stale("notes", tiny_backend, in_process=True) is None
    store.load_adapter("notes", tiny_backend)


def test_forget_keeps_clean_older_versions(engine: Engine, tiny_backend: HFBackend) -> None:
    items = add_memories(engine)
    store = LoraStore(engine)
    quick = QUICK_SETTINGS
    v1 = store.train("notes", items[:3], tiny_backend, quick, in_process=True)
    v2 = store.train("notes", items, tiny_backend, quick, in_process=True)
    assert v1.adapter is not None
    assert v2.adapter is not None
    engine.purge("notes", items[5].id)
    dropped = store.forget_stale("notes")
    assert dropped == (2,)
    versions = store.versions("notes")
    assert [(v.version, v.sha256, v.active) for v in versions] == [(1, v1.adapter.sha256, True)]
    assert engine.blobs.exists(v1.adapter.sha256)
    assert not engine.blobs.exists(v2.adapter.sha256)


def test_coexisting_adapter_items_are_resolved(engine: Engine, tiny_backend: HFBackend) -> None:
    items = add_memories(engine)
    store = LoraStore(engine)
    quick = QUICK_SETTINGS
    done = store.train("notes", items, tiny_backend, quick, in_process=True)
    assert done.adapter is not None
    old = store.adapter_item("notes")
    assert old is not None
    # A partial copy of the lineage (e.g. imported from an older memosd).
    engine.add(
        "notes",
        old.text,
        form="parameter",
        tier="long",
        metadata={"lora": {**old.metadata["lora"], "lineage_of": old.id}},
        payload=old.payload,
    )
    repaired = store.adapter_item("notes")
    assert repaired is not None
    assert repaired.id == old.id  # the partial copy lost
    assert len(store.versions("notes")) == 1


def test_combine_weighted_adapters(engine: Engine, tiny_backend: HFBackend) -> None:
    engine.create_cube("other", owner="uid:1000")
    store = LoraStore(engine)
    settings = QUICK_SETTINGS
    store.train("notes", add_memories(engine), tiny_backend, settings, in_process=True)
    store.train(
        "other",
        add_memories(engine, "other", ["Dave keeps the spare keys in the blue drawer."]),
        tiny_backend,
        dataclasses.replace(settings, seed=7),
        in_process=True,
    )
    alone = _logits(store.load_adapter("notes", tiny_backend), MEMORIES[0], tiny_backend)
    only_first = store.combine(["notes", "other"], [1.0, 0.0], tiny_backend)
    both = store.combine(["notes", ("other", 1)], [1.0, 1.0], tiny_backend)
    torch.testing.assert_close(_logits(only_first, MEMORIES[0], tiny_backend), alone)
    assert not torch.allclose(_logits(both, MEMORIES[0], tiny_backend), alone)


def test_worker_process_streams_progress(engine: Engine, tiny_backend: HFBackend) -> None:
    store = LoraStore(engine)
    seen: list[TrainingProgress] = []
    settings = dataclasses.replace(QUICK_SETTINGS, batch_size=2)  # 3 epochs x 3 batches
    result = store.train(
        "notes", add_memories(engine), tiny_backend, settings, progress=seen.append
    )
    assert result.outcome == "promoted"
    training = [p for p in seen if p.phase == "training"]
    assert [p.step for p in training] == list(range(1, 10))
    assert all(p.total_steps == 9 and p.eta_s is not None for p in training)
    assert training[-1].eta_s == 0.0
    assert seen[0].phase == "loading"
    assert seen[-1].phase == "done"


def test_cancellation_leaves_no_adapter(engine: Engine, tiny_backend: HFBackend) -> None:
    store = LoraStore(engine)
    cancel = threading.Event()

    def on_progress(progress: TrainingProgress) -> None:
        if progress.phase == "training" and progress.step >= 2:
            cancel.set()

    result = store.train(
        "notes",
        add_memories(engine),
        tiny_backend,
        TINY_SETTINGS,
        progress=on_progress,
        cancel=cancel,
    )
    assert result.outcome == "cancelled"
    assert result.adapter is None
    assert store.adapter_item("notes") is None
    assert store.versions("notes") == []
    assert list(engine.blobs.iter_blobs()) == []
