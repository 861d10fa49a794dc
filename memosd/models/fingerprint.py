"""Model fingerprints: the identity a KV cache or a LoRA adapter is bound to.

A fingerprint is the lowercase hex SHA-256 of a small, versioned, canonical
description of the model::

    memosd-model-fingerprint/1\\n
    dtype=<torch dtype name, e.g. float32>\\n
    config=<sha256 of canonical config.json>\\n
    tokenizer:<file name>=<sha256 of the file's bytes>\\n     (one line per file, sorted)
    weights=<sha256 over the weight files>\\n

* **config** - ``config.json`` parsed and re-serialised with sorted keys and
  without the keys that change when the *same* model is merely re-saved
  (``transformers_version``, ``_name_or_path``, ``torch_dtype``/``dtype``: the
  dtype that matters is the one the model is *run* in, hashed separately).
* **tokenizer** - the raw bytes of each tokenizer file present
  (:data:`TOKENIZER_FILES`).  A different vocabulary or chat template gives
  different token ids, hence different caches.
* **dtype** - the dtype the model is loaded in: a float16 cache is not a
  float32 cache.
* **weights** - SHA-256 over ``name NUL size NUL sha256(file)`` for every
  weight file (``*.safetensors``, ``*.bin``, ``*.pt``, sorted by name).  Two
  checkpoints with the same config but different training are different
  models.  Hashing hundreds of megabytes takes a while, so the weights hash is
  cached in a JSON sidecar keyed by each file's size and ``mtime_ns``
  (:func:`weights_hash`); a changed file invalidates the entry.  The sidecar
  lives in ``$MEMOSD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/memosd`` or
  ``~/.cache/memosd``), named after the hash of the model directory's
  absolute path; if it cannot be written the hash is simply recomputed next
  time.

The device is deliberately *not* part of the fingerprint: a cache computed on
CPU is valid on GPU up to floating-point noise of the same order as batch
composition effects.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CONFIG_VOLATILE_KEYS",
    "FINGERPRINT_VERSION",
    "TOKENIZER_FILES",
    "WEIGHT_SUFFIXES",
    "canonical_config_bytes",
    "default_cache_dir",
    "model_fingerprint",
    "short_fingerprint",
    "weights_hash",
]

FINGERPRINT_VERSION: Final = 1
TOKENIZER_FILES: Final = (
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)
WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".pt")
CONFIG_VOLATILE_KEYS: Final = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash"}
)
_CHUNK: Final = 1 << 20


def default_cache_dir() -> Path:
    """Where weight-hash sidecars are kept (see the module docstring)."""
    env = os.environ.get("MEMOSD_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "memosd"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def canonical_config_bytes(config_path: Path) -> bytes:
    """``config.json`` with sorted keys and without :data:`CONFIG_VOLATILE_KEYS`."""
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    kept = {k: v for k, v in config.items() if k not in CONFIG_VOLATILE_KEYS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()


def _weight_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def weights_hash(directory: Path, *, cache_dir: Path | None = None) -> str:
    """SHA-256 over the weight files of ``directory``, cached by (size, mtime_ns)."""
    directory = directory.resolve()
    files = _weight_files(directory)
    stats = {p.name: p.stat() for p in files}
    keys = {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}
    sidecar_dir = cache_dir if cache_dir is not None else default_cache_dir()
    sidecar = sidecar_dir / (
        "weights-" + hashlib.sha256(str(directory).encode()).hexdigest()[:32] + ".json"
    )
    cached: dict[str, Any] = {}
    try:
        cached = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    per_file: dict[str, Any] = cached.get("files", {}) if isinstance(cached, dict) else {}
    digest = hashlib.sha256()
    fresh: dict[str, Any] = {}
    for path in files:
        entry = per_file.get(path.name)
        if isinstance(entry, dict) and entry.get("key") == keys[path.name]:
            file_hash = str(entry["sha256"])
        else:
            file_hash = _sha256_file(path)
        fresh[path.name] = {"key": keys[path.name], "sha256": file_hash}
        digest.update(f"{path.name}\0{stats[path.name].st_size}\0{file_hash}\n".encode())
    if fresh != per_file:
        try:
            sidecar_dir.mkdir(parents=True, exist_ok=True)
            tmp = sidecar.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"directory": str(directory), "files": fresh}))
            tmp.replace(sidecar)
        except OSError:
            pass  # a read-only cache only costs a recomputation next time
    return digest.hexdigest()


def model_fingerprint(
    directory: str | Path,
    *,
    dtype: str,
    include_weights: bool = True,
    cache_dir: Path | None = None,
) -> str:
    """The fingerprint (lowercase hex SHA-256) of the model in ``directory`` run in ``dtype``."""
    directory = Path(directory)
    lines = [f"memosd-model-fingerprint/{FINGERPRINT_VERSION}", f"dtype={dtype}"]
    config_hash = hashlib.sha256(canonical_config_bytes(directory / "config.json")).hexdigest()
    lines.append(f"config={config_hash}")
    for name in sorted(TOKENIZER_FILES):
        path = directory / name
        if path.is_file():
            lines.append(f"tokenizer:{name}={_sha256_file(path)}")
    if include_weights:
        lines.append(f"weights={weights_hash(directory, cache_dir=cache_dir)}")
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


def short_fingerprint(fingerprint: str) -> str:
    """The first 12 hex digits, for messages and listings."""
    return fingerprint[:12]
