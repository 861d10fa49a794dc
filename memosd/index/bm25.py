"""Lexical retrieval: a small tokenizer and an incremental BM25 index (pure, no I/O).

Tokenizer: Unicode-aware words (``[^\\W_]+``), lower-cased, English stop words
dropped, then a light suffix stripper (plural ``s``/``es``/``ies``, ``ing``,
``ed``) so "paints"/"painting"/"painted" meet.  It is deliberately crude: the
same function runs on documents and queries, so consistency matters more than
linguistics.

Scoring is Okapi BM25 with Lucene's non-negative IDF::

    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    score(d, q) = sum over distinct t in q of
                  idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))

Documents are keyed by integer labels (the same labels as the dense index).
``add``/``remove`` are O(terms of the document); a search touches only the
postings of the query terms.  The state (labels and their term counts) is a
plain dict that :mod:`memosd.index.snapshot` stores with msgpack.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["STOP_WORDS", "BM25Index", "stem", "tokenize"]

_WORD_RE: Final = re.compile(r"[^\W_]+")

STOP_WORDS: Final = frozenset(
    """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself no nor not now of off on once
    only or other our ours ourselves out over own same she should so some such than that the
    their theirs them themselves then there these they this those through to too under until
    up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves s t d m ll re ve don im ive id ill youre thats""".split()  # noqa: SIM905 - a word list reads best as text
)


def stem(word: str) -> str:
    """A light, deterministic suffix stripper (not a full Porter stemmer)."""
    n = len(word)
    if n > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if n > 5 and word.endswith("ing"):
        return word[:-3]
    if n > 4 and word.endswith("ed"):
        return word[:-2]
    if n > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if n > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Index terms of ``text``, in order (duplicates kept)."""
    out: list[str] = []
    for word in _WORD_RE.findall(text.lower()):
        if word in STOP_WORDS:
            continue
        out.append(stem(word))
    return out


class BM25Index:
    """Incremental BM25 over integer labels.  Not thread-safe: the owner locks.

    Each document occupies a *slot* (reused after removal) in a numpy array of
    lengths; a term's posting is a dict (cheap to update) plus a cached pair of
    numpy arrays (slots, term frequencies) rebuilt on the first search after it
    changed, so scoring a query is a few vectorised operations per term.
    """

    def __init__(self, *, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self._docs: dict[int, dict[str, int]] = {}
        self._slot: dict[int, int] = {}
        self._labels = np.zeros(64, dtype=np.int64)
        self._lengths = np.zeros(64, dtype=np.float32)
        self._free: list[int] = []
        self._next_slot = 0
        self._postings: dict[str, dict[int, int]] = {}  # term -> {slot: tf}
        self._cache: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]] = {}
        self._total_length = 0

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, label: object) -> bool:
        return label in self._docs

    def add(self, label: int, text: str) -> None:
        """Index ``text`` under ``label`` (replacing what the label held)."""
        self.add_terms(label, Counter(tokenize(text)))

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next_slot
        self._next_slot += 1
        if slot >= len(self._lengths):
            grow = len(self._lengths) * 2
            self._lengths = np.resize(self._lengths, grow)
            self._labels = np.resize(self._labels, grow)
        return slot

    def add_terms(self, label: int, counts: dict[str, int]) -> None:
        if label in self._docs:
            self.remove(label)
        slot = self._take_slot()
        self._docs[label] = dict(counts)
        self._slot[label] = slot
        length = sum(counts.values())
        self._labels[slot] = label
        self._lengths[slot] = length
        self._total_length += length
        for term, tf in counts.items():
            self._postings.setdefault(term, {})[slot] = tf
            self._cache.pop(term, None)

    def remove(self, label: int) -> bool:
        """Forget ``label``; False if it was not indexed."""
        counts = self._docs.pop(label, None)
        if counts is None:
            return False
        slot = self._slot.pop(label)
        self._total_length -= int(self._lengths[slot])
        self._lengths[slot] = 0
        self._free.append(slot)
        for term in counts:
            posting = self._postings[term]
            del posting[slot]
            self._cache.pop(term, None)
            if not posting:
                del self._postings[term]
        return True

    def idf(self, term: str) -> float:
        df = len(self._postings.get(term, ()))
        n = len(self._docs)
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def _posting_arrays(
        self, term: str
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]] | None:
        cached = self._cache.get(term)
        if cached is None:
            posting = self._postings.get(term)
            if not posting:
                return None
            slots = np.fromiter(posting.keys(), dtype=np.int64, count=len(posting))
            tfs = np.fromiter(posting.values(), dtype=np.float32, count=len(posting))
            cached = (slots, tfs)
            self._cache[term] = cached
        return cached

    def _slot_scores(
        self, query_terms: Iterable[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Slots with a positive score and their scores (unordered)."""
        n = len(self._docs)
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        if n == 0:
            return empty
        avgdl = self._total_length / n if self._total_length else 1.0
        k1, b = self.k1, self.b
        scores: npt.NDArray[np.float32] | None = None
        for term in dict.fromkeys(query_terms):
            arrays = self._posting_arrays(term)
            if arrays is None:
                continue
            slots, tfs = arrays
            if scores is None:
                scores = np.zeros(self._next_slot, dtype=np.float32)
            norm = k1 * (1.0 - b + b * self._lengths[slots] / avgdl)
            scores[slots] += np.float32(self.idf(term)) * tfs * (k1 + 1.0) / (tfs + norm)
        if scores is None:
            return empty
        hit = np.flatnonzero(scores > 0)
        return hit, scores[hit]

    def scores(self, query_terms: Iterable[str]) -> dict[int, float]:
        """BM25 score of every document containing at least one query term."""
        slots, values = self._slot_scores(query_terms)
        labels = self._labels[slots]
        return {int(label): float(v) for label, v in zip(labels, values, strict=True)}

    def search(self, query: str | Sequence[str], k: int) -> list[tuple[int, float]]:
        """The best ``k`` ``(label, score)`` pairs, best first (ties by label)."""
        terms = tokenize(query) if isinstance(query, str) else list(query)
        slots, values = self._slot_scores(terms)
        if k <= 0 or not len(slots):
            return []
        if len(slots) > k:
            top = np.argpartition(-values, k - 1)[:k]
            slots, values = slots[top], values[top]
        labels = self._labels[slots]
        order = np.lexsort((labels, -values))
        return [(int(labels[i]), float(values[i])) for i in order]

    # --- state for snapshots ------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Msgpack-safe state: parameters and each label's term counts."""
        return {
            "k1": self.k1,
            "b": self.b,
            "labels": list(self._docs),
            "terms": [list(c.items()) for c in self._docs.values()],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BM25Index:
        index = cls(k1=float(state["k1"]), b=float(state["b"]))
        for label, pairs in zip(state["labels"], state["terms"], strict=True):
            index.add_terms(int(label), {str(t): int(c) for t, c in pairs})
        return index
