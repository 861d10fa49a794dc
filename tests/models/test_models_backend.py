"""Model backend: tiny Llama round trip, tokenizer, fingerprint identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from memosd.errors import BadRequest, NotFound
from memosd.models import HFBackend, ModelBackend, model_fingerprint
from memosd.models.testing import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_byte_tokenizer_round_trips_through_auto_tokenizer(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    text = "héllo, wörld\n\ttabs & ünïcode ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode())
    assert tok.decode(ids) == text


def test_load_backend(tiny_dir: Path, tmp_path: Path) -> None:
    backend = HFBackend.load(tiny_dir, fingerprint_cache_dir=tmp_path)
    assert isinstance(backend, ModelBackend)
    assert backend.device == "cpu"
    assert backend.dtype == "float32"
    assert not backend.model.training
    assert backend.encode("ab") == [97, 98]
    assert len(backend.fingerprint) == 64


def test_fingerprint_is_deterministic_and_sensitive(tiny_dir: Path, tmp_path: Path) -> None:
    same = build_tiny_llama(tmp_path / "same")
    other_seed = build_tiny_llama(tmp_path / "seed1", seed=1)
    cache = tmp_path / "cache"
    fp = model_fingerprint(tiny_dir, dtype="float32", cache_dir=cache)
    assert model_fingerprint(same, dtype="float32", cache_dir=cache) == fp
    assert model_fingerprint(tiny_dir, dtype="float32", cache_dir=cache) == fp  # cached path
    assert list(cache.iterdir())  # the weights-hash sidecar was written
    assert model_fingerprint(tiny_dir, dtype="bfloat16", cache_dir=cache) != fp
    # Same config and tokenizer, different weights: a different model.
    assert model_fingerprint(other_seed, dtype="float32", cache_dir=cache) != fp
    # A re-save by another transformers version does not change the identity ...
    config = json.loads((same / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (same / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(same, dtype="float32", cache_dir=cache) == fp
    # ... but a real config change does.
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (same / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(same, dtype="float32", cache_dir=cache) != fp


def test_weights_cache_invalidated_by_change(tmp_path: Path) -> None:
    d = build_tiny_llama(tmp_path / "m")
    cache = tmp_path / "cache"
    fp = model_fingerprint(d, dtype="float32", cache_dir=cache)
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_fingerprint(d, dtype="float32", cache_dir=cache) != fp


def test_bad_arguments(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        HFBackend.load(tmp_path / "nothing")
    with pytest.raises(BadRequest):
        HFBackend.load(tiny_dir, dtype="int3")
    with pytest.raises(BadRequest):
        HFBackend.load(tiny_dir, device="tpu")
