"""Pure parts of parameter memory: settings, training-set selection, the gate, the blob codec."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from memosd.errors import BadRequest, Conflict, CorruptionError
from memosd.lora import LoraSettings, build_training_set, control_text, decode_adapter, judge
from memosd.lora.adapter import ADAPTER_FORMAT, check_fingerprint
from memosd.lora.dataset import TEMPLATE_ID, encode_text, format_memory
from memosd.lora.evaluate import control_sequences
from memosd.memcube import versioning
from memosd.memcube.ids import MonotonicIdFactory
from memosd.memcube.model import MemoryItem


class ByteTokenizer:
    """Enough of a tokenizer for selection tests: one token per byte, bos 256, eos 257."""

    bos_token_id: int | None = 256
    eos_token_id: int | None = 257
    pad_token_id: int | None = 258

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


def _items(texts: list[str]) -> list[MemoryItem]:
    ids = MonotonicIdFactory()
    now = 1_700_000_000_000_000
    return [
        versioning.new_item(id=ids(now + i), cube="c", text=t, now_us=now + i)
        for i, t in enumerate(texts)
    ]


def test_settings_defaults_validation_and_overrides() -> None:
    defaults = LoraSettings()
    assert defaults.target_modules == ("q_proj", "v_proj")
    assert defaults.min_memory_ppl_drop == 0.20
    assert defaults.max_control_ppl_rise == 0.10
    assert LoraSettings.from_mapping(defaults.to_dict()) == defaults
    changed = LoraSettings.from_mapping({"rank": 4, "target_modules": ["q_proj"]})
    assert (changed.rank, changed.target_modules) == (4, ("q_proj",))
    with pytest.raises(BadRequest, match="did you mean 'rank'"):
        LoraSettings.from_mapping({"rnak": 4})
    bad: list[dict[str, Any]] = [
        {"rank": 0},
        {"rank": 2.0},
        {"learning_rate": 0.0},
        {"learning_rate": math.nan},
        {"dropout": True},
        {"target_modules": []},
        {"epochs": -1},
    ]
    for values in bad:
        with pytest.raises(BadRequest):
            LoraSettings.from_mapping(values)
    described = {row["name"]: row for row in LoraSettings.describe()}
    assert set(described) == set(defaults.to_dict())
    assert all(row["help"] for row in described.values())


def test_training_set_is_deterministic_budgeted_and_reports_skips() -> None:
    items = _items([f"memory number {i} " * 3 for i in range(10)] + ["   "])
    tok = ByteTokenizer()
    settings = LoraSettings(max_tokens=200, max_seq_len=40, seed=3)
    first = build_training_set(items, tok, settings)
    again = build_training_set(reversed(items), tok, settings)
    assert first == again
    assert first.total_tokens <= 200
    assert all(s.tokens <= 40 for s in first.samples)
    reasons = {reason for _, _, reason in first.skipped}
    assert reasons == {"empty", "token_budget"}
    assert len(first.samples) + len(first.skipped) == len(items)
    other = build_training_set(items, tok, LoraSettings(max_tokens=200, max_seq_len=40, seed=4))
    assert [s.item_id for s in other.samples] != [s.item_id for s in first.samples]
    manifest = first.to_manifest()
    assert manifest["template"] == TEMPLATE_ID
    assert manifest["items"] == [list(p) for p in first.pairs]


def test_training_set_uses_the_newest_given_version_of_live_items() -> None:
    (item,) = _items(["old text"])
    newer = versioning.revise(item, now_us=item.recorded_us + 1, actor=None, text="new text")
    archived = versioning.archive(_items(["gone"])[0], now_us=item.recorded_us + 2, actor=None)
    built = build_training_set([item, newer, archived], ByteTokenizer(), LoraSettings())
    assert [(s.item_id, s.version, s.text) for s in built.samples] == [
        (item.id, 2, format_memory("new text"))
    ]
    assert {reason for _, _, reason in built.skipped} == {"older_version", "status_archived"}


def test_template_and_special_tokens() -> None:
    assert format_memory("  Bob likes tea. ") == "Memory: Bob likes tea.\n"
    assert encode_text(ByteTokenizer(), "ab", 10) == [256, 97, 98, 257]
    assert encode_text(ByteTokenizer(), "abcdef", 3) == [256, 97, 98]


def test_gate_verdicts() -> None:
    settings = LoraSettings()
    ok = judge(
        memory_ppl_base=10.0,
        memory_ppl_adapted=7.0,
        control_ppl_base=20.0,
        control_ppl_adapted=21.0,
        settings=settings,
    )
    assert ok.passed
    assert ok.memory_drop == pytest.approx(0.3)
    assert ok.control_rise == pytest.approx(0.05)
    weak = judge(
        memory_ppl_base=10.0,
        memory_ppl_adapted=9.0,
        control_ppl_base=20.0,
        control_ppl_adapted=20.0,
        settings=settings,
    )
    assert not weak.passed
    assert weak.reasons == ("memory perplexity dropped 10.0%, needs >= 20.0%",)
    forgot = judge(
        memory_ppl_base=10.0,
        memory_ppl_adapted=5.0,
        control_ppl_base=20.0,
        control_ppl_adapted=23.0,
        settings=settings,
    )
    assert not forgot.passed
    assert "control perplexity rose 15.0%" in forgot.reasons[0]
    diverged = judge(
        memory_ppl_base=10.0,
        memory_ppl_adapted=math.inf,
        control_ppl_base=20.0,
        control_ppl_adapted=math.nan,
        settings=settings,
    )
    assert not diverged.passed
    assert len(diverged.reasons) == 2
    wire = diverged.to_dict()
    assert wire["memory_ppl_adapted"] is None
    assert type(diverged).from_dict(wire).passed is False


def test_control_text_ships_and_is_windowed() -> None:
    text = control_text()
    assert len(text.split()) > 300
    settings = LoraSettings(control_max_tokens=300, max_seq_len=64)
    windows = control_sequences(ByteTokenizer(), settings)
    assert sum(len(w) for w in windows) <= 300
    assert all(2 <= len(w) <= 64 for w in windows)


def test_adapter_blob_codec_rejects_garbage_and_other_models() -> None:
    from safetensors.torch import save

    with pytest.raises(CorruptionError):
        decode_adapter(b"not safetensors at all")
    foreign = save({"x": torch.zeros(2)}, metadata={"format": "something-else"})
    with pytest.raises(CorruptionError):
        decode_adapter(foreign)
    mine = save(
        {"x": torch.ones(2)},
        metadata={
            "format": ADAPTER_FORMAT,
            "base_fingerprint": "a" * 64,
            "lora_config": '{"r": 1}',
        },
    )
    blob = decode_adapter(mine)
    assert (blob.base_fingerprint, blob.config, blob.parameters) == ("a" * 64, {"r": 1}, 2)
    check_fingerprint("a" * 64, "a" * 64)
    with pytest.raises(Conflict) as excinfo:
        check_fingerprint("a" * 64, "b" * 64)
    assert excinfo.value.reason == "fingerprint_mismatch"
