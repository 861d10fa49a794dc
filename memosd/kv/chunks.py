"""Content-addressed KV chunks: keys chained over the token sequence (pure, no torch).

A cached prefix of ``n`` tokens is split into chunks of ``chunk_tokens``
(default :data:`CHUNK_TOKENS` = 256) tokens; the last chunk may be shorter
(a *partial* chunk).  Chunk ``i`` covers tokens ``[i*C, min((i+1)*C, n))``.

**Key of a chunk** (hex SHA-256)::

    key_i = sha256( b"memosd-kv-chunk/1\\0"
                    || model fingerprint (ASCII hex) || b"\\0"
                    || key_{i-1} (ASCII hex, "" for the first chunk) || b"\\0"
                    || uint32 LE number of tokens in the chunk
                    || token ids of the chunk, each uint32 LE )

Because ``key_{i-1}`` is chained in, a key identifies the *whole* token
sequence up to the end of its chunk, not just the chunk's own tokens - which
is exactly what the chunk's keys and values depend on (attention is causal:
the KV of token ``t`` is a function of tokens ``0..t`` and of the model).
Two caches that share a token prefix therefore share the keys (and the blobs)
of the chunks inside that prefix; a cache that extends a cached prefix reuses
its chunks and computes only the tail (:func:`plan_reuse`).  This mirrors
LMCache's chained chunk hashing.

The model fingerprint is in every key, so chunks of different models (or the
same model in another dtype) never collide.

**Partial reuse.**  A partial last chunk is keyed like a full one (its
length is part of the hash), so an extension of a prefix cannot find it by
key: the extended chunk has more tokens.  Worse, the template's footer sits
at the end of the old prefix and differs from the tokens that replace it.
But the KV of the first ``m`` tokens of a chunk depends only on the chunk's
history and those ``m`` tokens, so any stored chunk with the same *parent*
key (the same history) whose tokens share an ``m``-token prefix with the new
chunk provides those ``m`` positions.  :func:`plan_reuse` asks for such
candidates by parent key, verifies each candidate's key against its claimed
tokens, takes the longest common prefix, and computes only the rest.

**Purge safety.**  Chunks *before* the position of a memory in the prefix do
not depend on it; the ones at and after it do and have distinct keys.  When
a memory is purged the caches built from it are purged, and only blobs no
other cache references are deleted - which never include a chunk that saw
the purged text unless another live cache contains the same text.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CHUNK_TOKENS",
    "KEY_DOMAIN",
    "ChunkSpan",
    "PartialCandidate",
    "ReusePlan",
    "chunk_key",
    "chunk_spans",
    "plan_reuse",
]

CHUNK_TOKENS: Final = 256
KEY_DOMAIN: Final = b"memosd-kv-chunk/1\0"
_MAX_TOKEN: Final = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Chunk ``index`` covers tokens ``[start, end)``; ``parent`` is the previous chunk's key."""

    index: int
    start: int
    end: int
    key: str
    parent: str

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class PartialCandidate:
    """A stored chunk with the same parent as a chunk we need, and its token ids."""

    key: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReusePlan:
    """What to load and what to compute for a token sequence.

    ``reused`` are stored chunks whose keys match the new sequence's chunks
    (a prefix of them); ``partial`` optionally continues them with the
    first ``partial.length`` tokens of the stored chunk ``partial.key``
    (``partial.end`` is where its reused part ends, not the stored chunk's
    end); computation starts at token ``compute_from``.
    """

    spans: tuple[ChunkSpan, ...]
    reused: tuple[ChunkSpan, ...]
    partial: ChunkSpan | None
    compute_from: int

    @property
    def reused_tokens(self) -> int:
        return self.compute_from


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    try:
        packed = array("I", token_ids)
    except OverflowError:
        raise ValueError("token ids must be in 0..2**32-1") from None
    if packed.itemsize != 4:  # pragma: no cover - every platform we run on
        packed = array("L", token_ids)
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian host
        packed.byteswap()
    return packed.tobytes()


def chunk_key(fingerprint: str, parent: str, token_ids: Sequence[int]) -> str:
    """The key of one chunk (see the module docstring)."""
    digest = hashlib.sha256(KEY_DOMAIN)
    digest.update(fingerprint.encode("ascii"))
    digest.update(b"\0")
    digest.update(parent.encode("ascii"))
    digest.update(b"\0")
    digest.update(struct.pack("<I", len(token_ids)))
    digest.update(_token_bytes(token_ids))
    return digest.hexdigest()


def chunk_spans(
    fingerprint: str, token_ids: Sequence[int], chunk_tokens: int = CHUNK_TOKENS
) -> list[ChunkSpan]:
    """The chunks of ``token_ids``, each with its chained key."""
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    spans: list[ChunkSpan] = []
    parent = ""
    for index, start in enumerate(range(0, len(token_ids), chunk_tokens)):
        end = min(start + chunk_tokens, len(token_ids))
        key = chunk_key(fingerprint, parent, token_ids[start:end])
        spans.append(ChunkSpan(index, start, end, key, parent))
        parent = key
    return spans


def plan_reuse(
    fingerprint: str,
    token_ids: Sequence[int],
    *,
    has_chunk: Callable[[str], bool],
    partials_after: Callable[[str], Sequence[PartialCandidate]] = lambda _parent: (),
    chunk_tokens: int = CHUNK_TOKENS,
) -> ReusePlan:
    """Plan an (incremental) build of ``token_ids``.

    ``has_chunk(key)`` says whether a chunk with that key is stored;
    ``partials_after(parent)`` lists stored chunks (full or partial) whose
    parent key is ``parent``, with their token ids.  The longest run of
    stored leading chunks is reused, then the longest common token prefix
    with a stored chunk that continues the run (see "Partial reuse").
    ``compute_from == len(token_ids)`` means nothing is left to compute.
    """
    spans = chunk_spans(fingerprint, token_ids, chunk_tokens)
    reused: list[ChunkSpan] = []
    for span in spans:
        if not has_chunk(span.key):
            break
        reused.append(span)
    partial: ChunkSpan | None = None
    if len(reused) < len(spans):
        nxt = spans[len(reused)]
        wanted = tuple(token_ids[nxt.start : nxt.end])
        for cand in partials_after(nxt.parent):
            common = _common_prefix(cand.token_ids, wanted)
            if common == 0 or (partial is not None and common <= partial.length):
                continue
            if chunk_key(fingerprint, nxt.parent, cand.token_ids) != cand.key:
                continue  # a manifest that lies about its tokens is ignored
            partial = ChunkSpan(nxt.index, nxt.start, nxt.start + common, cand.key, nxt.parent)
    compute_from = partial.end if partial is not None else (reused[-1].end if reused else 0)
    return ReusePlan(tuple(spans), tuple(reused), partial, compute_from)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
