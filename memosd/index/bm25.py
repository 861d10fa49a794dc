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
postings of the query terms: each is a numpy array of slots with precomputed
term weights, scatter-added into a score buffer, and the top k are picked
from the scores above a sampled threshold (see :class:`BM25Index`).  The
state (labels and their term counts) is a plain dict that
:mod:`memosd.index.snapshot` stores with msgpack.
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


class _Posting:
    """A term's posting as numpy arrays (built from the dict on first use).

    ``slots`` ascending where possible (scatter-adds into the score buffer
    then walk memory forward; removing a document drops the arrays of its
    terms, so every slot here holds the document it held when added);
    ``weights`` the BM25 term weight without idf,
    ``tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avgdl))``, computed for
    the collection statistics in ``stamp`` (recomputed when they change).
    Adds append to the ``extra`` lists, merged on the next search.
    """

    __slots__ = ("extra", "slots", "stamp", "tfs", "weights")

    def __init__(self, slots: npt.NDArray[np.int64], tfs: npt.NDArray[np.float32]) -> None:
        self.slots = slots
        self.tfs = tfs
        self.weights: npt.NDArray[np.float32] | None = None
        self.stamp: tuple[int, int] = (-1, -1)
        self.extra: list[tuple[int, int]] = []


#: Score buffers at least this long pick their top-k candidates by a sampled
#: threshold instead of sorting every positive score.
_SAMPLED_TOP: Final = 32_768
_SAMPLE: Final = 16_384


class BM25Index:
    """Incremental BM25 over integer labels.  Not thread-safe: the owner locks.

    Each document occupies a *slot* (reused after removal) in numpy arrays of
    labels and lengths; a term's posting is a dict (cheap to update) plus a
    cached :class:`_Posting` of numpy arrays with precomputed term weights.
    Scoring a query is one ``np.add.at`` per query term into a score buffer
    kept between searches, then a top-k selection that looks at the few
    scores above a threshold estimated from a sample (exact: if fewer than k
    documents pass, every positive score is considered).
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
        self._cache: dict[str, _Posting] = {}
        self._total_length = 0
        self._buffer = np.zeros(0, dtype=np.float32)

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
        cache = self._cache
        for term, tf in counts.items():
            self._postings.setdefault(term, {})[slot] = tf
            cached = cache.get(term)
            if cached is not None:
                cached.extra.append((slot, tf))

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

    def _posting(self, term: str) -> _Posting | None:
        """``term``'s arrays with weights for the current collection statistics."""
        cached = self._cache.get(term)
        if cached is None:
            posting = self._postings.get(term)
            if not posting:
                return None
            slots = np.fromiter(posting.keys(), dtype=np.int64, count=len(posting))
            tfs = np.fromiter(posting.values(), dtype=np.float32, count=len(posting))
            if len(slots) > 1 and bool(np.any(slots[1:] < slots[:-1])):
                order = np.argsort(slots, kind="stable")
                slots, tfs = slots[order], tfs[order]
            cached = _Posting(slots, tfs)
            self._cache[term] = cached
        elif cached.extra:
            extra = np.array(cached.extra, dtype=np.int64).reshape(-1, 2)
            cached.extra = []
            slots = np.concatenate((cached.slots, extra[:, 0]))
            tfs = np.concatenate((cached.tfs, extra[:, 1].astype(np.float32)))
            if len(cached.slots) and int(extra[:, 0].min()) < int(cached.slots[-1]):
                order = np.argsort(slots, kind="stable")
                slots, tfs = slots[order], tfs[order]
            cached.slots, cached.tfs = slots, tfs
            cached.weights = None
        stamp = (self._total_length, len(self._docs))
        if cached.weights is None or cached.stamp != stamp:
            avgdl = self._total_length / len(self._docs) if self._total_length else 1.0
            k1, b = self.k1, self.b
            tfs = cached.tfs
            lens = self._lengths[cached.slots]
            norm = np.float32(k1 * (1.0 - b)) + np.float32(k1 * b / avgdl) * lens
            weights = tfs * np.float32(k1 + 1.0) / (tfs + norm)
            cached.weights = weights.astype(np.float32, copy=False)
            cached.stamp = stamp
        return cached

    def _score_buffer(self, query_terms: Iterable[str]) -> npt.NDArray[np.float32] | None:
        """Every slot's score (a view of a buffer reused by the next call), or None."""
        if not self._docs:
            return None
        scores: npt.NDArray[np.float32] | None = None
        for term in dict.fromkeys(query_terms):
            posting = self._posting(term)
            if posting is None:
                continue
            if scores is None:
                size = self._next_slot
                if len(self._buffer) < size:
                    self._buffer = np.zeros(len(self._lengths), dtype=np.float32)
                scores = self._buffer[:size]
                scores.fill(0.0)
            assert posting.weights is not None
            np.add.at(scores, posting.slots, np.float32(self.idf(term)) * posting.weights)
        return scores

    def _slot_scores(
        self, query_terms: Iterable[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Slots with a positive score and their scores (unordered)."""
        scores = self._score_buffer(query_terms)
        if scores is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
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
        if k <= 0:
            return []
        scores = self._score_buffer(terms)
        if scores is None:
            return []
        slots = _top_candidates(scores, k)
        values = scores[slots]
        if len(slots) > k:
            # Keep everything tied with the k-th score, then order by (score, label).
            kth = np.partition(values, len(values) - k)[len(values) - k]
            keep = values >= kth
            slots, values = slots[keep], values[keep]
        labels = self._labels[slots]
        order = np.lexsort((labels, -values))[:k]
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


def _top_candidates(scores: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """Slots holding every one of the ``k`` best positive scores (a superset).

    For a long buffer, a threshold ``t`` is read off a strided sample so that
    a few times ``k`` scores should reach it; if at least ``k`` do, the best
    ``k`` are all among them (exact, whatever the sample); otherwise every
    positive score is returned.
    """
    size = len(scores)
    if size >= _SAMPLED_TOP:
        sample = scores[:: size // _SAMPLE]
        want = min(len(sample), 1 + (3 * k * len(sample)) // size)
        threshold = np.partition(sample, len(sample) - want)[len(sample) - want]
        if threshold > 0:
            above = np.flatnonzero(scores >= threshold)
            if len(above) >= k:
                return above
    return np.flatnonzero(scores > 0)
