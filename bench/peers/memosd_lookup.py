"""The real ``memosd`` daemon with a precomputed-vector embedder, for corpus-size benchmarks.

    MEMOSD_INDEX_EMBEDDER=hashing BENCH_DOCS=docs.npy BENCH_QUERIES=queries.npy \\
        .venv/bin/python bench/peers/memosd_lookup.py --data-dir D --socket S

Everything is ``memosd.daemon.main`` unchanged, except that the ``hashing``
embedder is replaced by a lookup: a text ``d<n> ...`` embeds to row n of
``BENCH_DOCS``, ``q<n> ...`` to row n of ``BENCH_QUERIES`` (other texts fall
back to the hashing embedder).  mem0's worker gets the same lookup
(bench/peers/mem0_worker.py), so search latency at 10k/100k items measures the
systems, not the embedding model (whose cost is measured separately).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

from memosd import embed

_HashingEmbedder = embed.HashingEmbedder


class LookupEmbedder:
    """Rows of two ``.npy`` files by the text's ``d<n>``/``q<n>`` prefix."""

    def __init__(self, dim: int) -> None:
        self.docs = np.load(os.environ["BENCH_DOCS"], mmap_mode="r")
        self.queries = np.load(os.environ["BENCH_QUERIES"], mmap_mode="r")
        self.fallback = _HashingEmbedder(dim)
        self._dim = dim

    @property
    def model_name(self) -> str:
        return "bench-lookup-384"

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> embed.Vectors:
        out = np.empty((len(texts), self._dim), dtype=np.float32)
        for i, text in enumerate(texts):
            head = text.split(" ", 1)[0]
            if len(head) > 1 and head[0] in "dq" and head[1:].isdigit():
                table = self.docs if head[0] == "d" else self.queries
                out[i] = table[int(head[1:])]
            else:
                out[i] = self.fallback.embed([text])[0]
        return out


if __name__ == "__main__":
    embed.HashingEmbedder = LookupEmbedder  # type: ignore[misc,assignment]
    from memosd.daemon import main

    sys.exit(main())
