"""Byte formats of activation memory: chunk blobs (safetensors) and the manifest.

Never pickle: tensors are stored with safetensors, whose header is JSON with
names, dtypes, shapes and offsets, and whose loader only ever creates plain
tensors.  Everything else is msgpack-safe data inside the item payload.

**Chunk blob** (one per chunk, content-addressed in the engine's blob store).
A safetensors file with, for each layer ``l`` (zero-padded to 3 digits):

* ``k.NNN`` and ``v.NNN``: keys and values of the chunk, shape
  ``[kv_heads, chunk_len, head_dim]`` (the batch dimension of 1 dropped),
  in the model dtype; or, with ``quant="int8"``, int8 tensors plus
* ``ks.NNN``: float32 key scales ``[kv_heads, 1, head_dim]`` (per channel) and
  ``vs.NNN``: float32 value scales ``[kv_heads, chunk_len, 1]`` (per token);
  ``x ≈ q * scale`` (symmetric, ``scale = max|x| / 127``).

Its string metadata: ``format="memosd-kv-chunk/1"``, ``fingerprint``,
``key`` (the chained chunk key, :mod:`memosd.kv.chunks`), ``start``,
``length``, ``layers``, ``dtype``, ``quant`` (``"none"``/``"int8"``).  A
decoder checks all of them against what the manifest expects.

**Manifest** (``payload["manifest"]`` of the KV item; see :class:`KvManifest`)::

    {"format": "memosd-kv/1",
     "fingerprint": "<hex sha256 of the model>", "model": "<model dir, informative>",
     "dtype": "float32", "quant": "none" | "int8",
     "chunk_tokens": 256, "num_tokens": N,
     "token_ids": <bytes: N x uint32 LE>,
     "layers": [[kv_heads, head_dim], ...]        (per layer; K and V alike),
     "chunks": [{"key": hex, "blob": sha, "start": s, "end": e, "bytes": n}, ...],
     "sources": [[item_id, version], ...]          (template order),
     "template": {...}}                            (PrefixTemplate.describe())

and ``payload["blobs"] = {"chunk-00000": sha, ...}`` so that the engine
counts references to the chunk blobs (a purge of the last version that
references a blob deletes the file).  A placeholder for a cache that must be
rebuilt after a purge has ``num_tokens = 0``, no chunks and no blobs.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memosd.errors import CodecError

__all__ = [
    "CHUNK_FORMAT",
    "MANIFEST_FORMAT",
    "QUANT_MODES",
    "ChunkRef",
    "KvManifest",
    "decode_chunk",
    "dequantize_keys",
    "dequantize_values",
    "encode_chunk",
    "pack_token_ids",
    "quantize_keys",
    "quantize_values",
    "unpack_token_ids",
]

CHUNK_FORMAT: Final = "memosd-kv-chunk/1"
MANIFEST_FORMAT: Final = "memosd-kv/1"
QUANT_MODES: Final = ("none", "int8")
_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

LayerKV = tuple[torch.Tensor, torch.Tensor]


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """Token ids as uint32 little-endian bytes."""
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def unpack_token_ids(data: bytes) -> tuple[int, ...]:
    if len(data) % 4:
        raise CodecError("token_ids must be a multiple of 4 bytes")
    ids = array("I")
    ids.frombytes(data)
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian host
        ids.byteswap()
    return tuple(ids)


# --- 8-bit quantization ------------------------------------------------------------


def quantize_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 keys with one float32 scale per channel: ``[H, T, D]`` → (int8, ``[H, 1, D]``)."""
    scale = k.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.round(k.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values with one float32 scale per token: ``[H, T, D]`` → (int8, ``[H, T, 1]``)."""
    scale = v.float().abs().amax(dim=2, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.round(v.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_keys(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


dequantize_values = dequantize_keys


# --- chunk blobs ---------------------------------------------------------------------


def encode_chunk(
    layers: Sequence[LayerKV],
    *,
    fingerprint: str,
    key: str,
    start: int,
    dtype: str,
    quant: str = "none",
) -> bytes:
    """safetensors bytes of one chunk; ``layers[l] = (k, v)`` of shape ``[H, T, D]``."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}")
    tensors: dict[str, torch.Tensor] = {}
    length = int(layers[0][0].shape[1])
    for index, (k, v) in enumerate(layers):
        name = f"{index:03d}"
        if quant == "int8":
            tensors[f"k.{name}"], tensors[f"ks.{name}"] = quantize_keys(k)
            tensors[f"v.{name}"], tensors[f"vs.{name}"] = quantize_values(v)
        else:
            tensors[f"k.{name}"] = k.contiguous()
            tensors[f"v.{name}"] = v.contiguous()
    metadata = {
        "format": CHUNK_FORMAT,
        "fingerprint": fingerprint,
        "key": key,
        "start": str(start),
        "length": str(length),
        "layers": str(len(layers)),
        "dtype": dtype,
        "quant": quant,
    }
    data: bytes = st_save(tensors, metadata=metadata)
    return data


def _chunk_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CodecError("KV chunk blob is truncated")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > min(len(data) - 8, 16 << 20):
        raise CodecError("KV chunk blob has a bad safetensors header length")
    import json  # noqa: PLC0415 - only on this path

    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError:
        raise CodecError("KV chunk blob has an unreadable safetensors header") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CodecError("KV chunk blob has no metadata")
    return {str(k): str(v) for k, v in meta.items()}


def decode_chunk(
    data: bytes,
    *,
    fingerprint: str,
    key: str,
    start: int,
    length: int,
    layers: Sequence[Sequence[int]],
    dtype: str,
) -> list[LayerKV]:
    """Decode and check one chunk blob; tensors come back ``[H, T, D]`` in ``dtype``."""
    meta = _chunk_metadata(data)
    expected = {
        "format": CHUNK_FORMAT,
        "fingerprint": fingerprint,
        "key": key,
        "start": str(start),
        "length": str(length),
        "layers": str(len(layers)),
        "dtype": dtype,
    }
    for name, want in expected.items():
        if meta.get(name) != want:
            raise CodecError(
                f"KV chunk {key[:12]}: {name} is {meta.get(name)!r}, expected {want!r}",
                reason="kv_chunk_mismatch",
            )
    quant = meta.get("quant", "none")
    if quant not in QUANT_MODES:
        raise CodecError(f"KV chunk {key[:12]}: unknown quant {quant!r}")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CodecError(f"KV chunk {key[:12]} does not decode: {exc}") from None
    torch_dtype = _DTYPES[dtype]
    out: list[LayerKV] = []
    for index, (heads, head_dim) in enumerate(layers):
        name = f"{index:03d}"
        try:
            k, v = tensors[f"k.{name}"], tensors[f"v.{name}"]
            if quant == "int8":
                k = dequantize_keys(k, tensors[f"ks.{name}"], torch_dtype)
                v = dequantize_values(v, tensors[f"vs.{name}"], torch_dtype)
        except KeyError as exc:
            raise CodecError(f"KV chunk {key[:12]}: tensor {exc} missing") from None
        shape = (heads, length, head_dim)
        if tuple(k.shape) != shape or tuple(v.shape) != shape or k.dtype != torch_dtype:
            raise CodecError(
                f"KV chunk {key[:12]} layer {index}: shape {tuple(k.shape)}/{k.dtype}, "
                f"expected {shape}/{torch_dtype}"
            )
        out.append((k, v))
    return out


# --- manifest ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a manifest: its chained key, blob sha, token span and blob size."""

    key: str
    blob: str
    start: int
    end: int
    nbytes: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class KvManifest:
    """``payload["manifest"]`` of a KV item (see the module docstring)."""

    fingerprint: str
    model: str
    dtype: str
    chunk_tokens: int
    token_ids: tuple[int, ...]
    layers: tuple[tuple[int, int], ...]
    chunks: tuple[ChunkRef, ...]
    sources: tuple[tuple[str, int], ...]
    template: dict[str, Any] = field(default_factory=dict)
    quant: str = "none"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of all chunk blobs (shared chunks counted once per manifest)."""
        return sum(c.nbytes for c in self.chunks)

    @property
    def is_placeholder(self) -> bool:
        """True for a cache that holds no tensors (to be rebuilt)."""
        return not self.chunks

    def blob_refs(self) -> dict[str, str]:
        return {f"chunk-{i:05d}": c.blob for i, c in enumerate(self.chunks)}

    def to_payload(self) -> dict[str, Any]:
        return {
            "manifest": {
                "format": MANIFEST_FORMAT,
                "fingerprint": self.fingerprint,
                "model": self.model,
                "dtype": self.dtype,
                "quant": self.quant,
                "chunk_tokens": self.chunk_tokens,
                "num_tokens": self.num_tokens,
                "token_ids": pack_token_ids(self.token_ids),
                "layers": [list(shape) for shape in self.layers],
                "chunks": [
                    {
                        "key": c.key,
                        "blob": c.blob,
                        "start": c.start,
                        "end": c.end,
                        "bytes": c.nbytes,
                    }
                    for c in self.chunks
                ],
                "sources": [[i, v] for i, v in self.sources],
                "template": dict(self.template),
            },
            "blobs": self.blob_refs(),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any] | None) -> KvManifest:
        """Parse and check a KV item payload; :class:`CodecError` if it is not one."""
        if not isinstance(payload, dict) or not isinstance(payload.get("manifest"), dict):
            raise CodecError("not a KV item (no payload manifest)", reason="not_kv")
        m = payload["manifest"]
        if m.get("format") != MANIFEST_FORMAT:
            raise CodecError(f"unknown KV manifest format {m.get('format')!r}", reason="not_kv")
        try:
            token_ids = unpack_token_ids(bytes(m["token_ids"]))
            chunks = tuple(
                ChunkRef(
                    str(c["key"]), str(c["blob"]), int(c["start"]), int(c["end"]), int(c["bytes"])
                )
                for c in m["chunks"]
            )
            manifest = cls(
                fingerprint=str(m["fingerprint"]),
                model=str(m.get("model", "")),
                dtype=str(m["dtype"]),
                chunk_tokens=int(m["chunk_tokens"]),
                token_ids=token_ids,
                layers=tuple((int(h), int(d)) for h, d in m["layers"]),
                chunks=chunks,
                sources=tuple((str(i), int(v)) for i, v in m["sources"]),
                template=dict(m.get("template") or {}),
                quant=str(m.get("quant", "none")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed KV manifest: {exc!r}", reason="bad_manifest") from None
        if manifest.dtype not in _DTYPES or manifest.quant not in QUANT_MODES:
            raise CodecError("KV manifest has an unknown dtype or quant", reason="bad_manifest")
        if int(m.get("num_tokens", -1)) != len(token_ids):
            raise CodecError("KV manifest num_tokens does not match its token ids")
        position = 0
        for c in chunks:
            if c.start != position or c.end <= c.start:
                raise CodecError("KV manifest chunks do not tile the token ids")
            position = c.end
        if chunks and position != len(token_ids):
            raise CodecError("KV manifest chunks do not cover the token ids")
        return manifest
