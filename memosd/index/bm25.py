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
The index is a handful of numpy arrays (postings packed by term, per-slot
labels and lengths) plus one dict of terms - about 25 bytes per posting
instead of the ~2 KB of Python objects per 12-word document of the earlier
dict-of-dicts layout.  ``add`` is O(terms of the document) (amortised: new
postings are merged into the packed arrays in batches), ``remove`` O(1)
(amortised: dead slots are reclaimed in batches); a search touches only the
postings of the query terms: each is scatter-added into a score buffer with
precomputed term weights, and the top k are picked from the scores above a
sampled threshold (see :class:`BM25Index`).  The state is a msgpack-safe dict
of those arrays as bytes that :mod:`memosd.index.snapshot` stores; the
per-document layout of earlier releases is still read.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


#: Score buffers at least this long pick their top-k candidates by a sampled
#: threshold instead of sorting every positive score.
_SAMPLED_TOP: Final = 32_768
_SAMPLE: Final = 16_384
#: Postings added since the last merge are folded into the packed arrays once
#: there are more than max(_MERGE_MIN, packed postings // _MERGE_DIVISOR).
_MERGE_MIN: Final = 65_536
_MERGE_DIVISOR: Final = 32
#: Removed documents' slots are reclaimed (every slot renumbered) once more
#: than max(_COMPACT_MIN, slots // 4) are dead.
_COMPACT_MIN: Final = 4_096
#: ``to_state`` layout version (a state without "format" is the older
#: per-document term lists, still read).
STATE_FORMAT: Final = 2


@dataclass(slots=True)
class _Prepared:
    """A merged or compacted BM25 layout, built aside; see BM25Index.prepare_maintenance."""

    mutations: int  # the index's mutation count it was built from
    start: npt.NDArray[np.int64]
    slots: npt.NDArray[np.int32]
    tfs: npt.NDArray[np.float32]
    renumbered: _Renumbered | None = None  # set by a compaction


@dataclass(slots=True)
class _Renumbered:
    """A compaction's live slots, in label order, and the terms they still hold."""

    labels: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.float32]
    terms: list[str]


class BM25Index:
    """Incremental BM25 over integer labels.  Not thread-safe: the owner locks.

    Compact layout (a few numpy arrays instead of per-document Python
    objects):

    * each document occupies a *slot*; per slot the arrays ``_labels``
      (int64), ``_lengths`` (float32) and ``_alive`` (bool).  Slots are handed
      out in increasing order and not reused until a compaction renumbers
      them, so a label is found by binary search in ``_labels`` (labels
      added in increasing order, as a cube allocates them) or, for a label
      added out of order (an in-place update), in the small ``_extra`` dict;
    * terms get dense ids (``_term_ids``: one dict str -> int, ``_terms`` the
      inverse);
    * postings are packed by term (CSR): term ``t``'s entries are
      ``_slots[_start[t]:_start[t + 1]]`` (int32, ascending) with their term
      frequencies in ``_tfs`` (float32); postings added since the last merge
      wait in three flat ``array("i")`` (term id, slot, tf; a query term's
      tail entries are found by a vectorised scan) and are folded in once the
      tail grows past 1/32 of the packed arrays (at least 65,536 entries);
    * removing a document only marks its slot dead (``_alive``) and takes
      its length out of the totals: its posting entries stay and score 0
      (their weights are zeroed) until a compaction drops them; document
      frequencies count live entries only, so scores equal the formula;
    * per queried term, its live slots and idf-weighted BM25 term weights are
      cached for the current collection statistics (``_weights``; any write
      or merge drops the whole cache, so it holds only terms queried since).

    Scoring a query is one ``np.add.at`` per query term into a score buffer
    kept between searches, then a top-k selection that looks at the few
    scores above a threshold estimated from a sample (exact: if fewer than k
    documents pass, every positive score is considered).
    """

    def __init__(self, *, k1: float = 1.2, b: float = 0.75, auto_maintain: bool = True) -> None:
        self.k1 = k1
        self.b = b
        # False: adds and removes never merge or compact on their own; the
        # owner calls prepare_maintenance()/install() (CubeIndex does, to keep
        # its lock free while the new arrays are built) or maintain().
        self.auto_maintain = auto_maintain
        self._mutations = 0  # adds + removes: a prepared layout must not miss any
        self._term_ids: dict[str, int] = {}
        self._terms: list[str] = []
        self._labels = np.zeros(64, dtype=np.int64)
        self._lengths = np.zeros(64, dtype=np.float32)
        self._alive = np.zeros(64, dtype=bool)
        self._next_slot = 0
        self._main_end = 0  # slots [0, _main_end) hold labels in increasing order
        self._extra: dict[int, int] = {}  # label -> slot for labels added out of order
        self._count = 0
        self._dead = 0
        self._removals = 0
        self._total_length = 0
        self._start = np.zeros(1, dtype=np.int64)
        self._slots = np.zeros(0, dtype=np.int32)
        self._tfs = np.zeros(0, dtype=np.float32)
        self._tail_tids = array("i")
        self._tail_slots = array("i")
        self._tail_tfs = array("i")
        self._generation = 0  # bumped when packed positions or slots change
        # term id -> (slots, weights, df), all for the statistics in _weights_stamp
        # (dropped wholesale when they change, so no stale arrays are kept)
        self._weights: dict[int, tuple[Any, Any, int]] = {}
        self._weights_stamp: tuple[int, ...] = ()
        self._buffer = np.zeros(0, dtype=np.float32)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, label: object) -> bool:
        return isinstance(label, int) and self._find(label) is not None

    def _find(self, label: int) -> int | None:
        """The live slot of ``label``, or None."""
        slot = self._extra.get(label)
        if slot is not None:
            return slot
        end = self._main_end
        if not end or label > int(self._labels[end - 1]) or label < int(self._labels[0]):
            return None
        at = int(np.searchsorted(self._labels[:end], label))
        if at < end and int(self._labels[at]) == label and bool(self._alive[at]):
            return at
        return None

    def add(self, label: int, text: str) -> None:
        """Index ``text`` under ``label`` (replacing what the label held)."""
        self.add_terms(label, Counter(tokenize(text)))

    def _take_slot(self, label: int) -> int:
        slot = self._next_slot
        self._next_slot += 1
        if slot >= len(self._lengths):
            grow = len(self._lengths) * 2
            self._lengths = np.resize(self._lengths, grow)
            self._labels = np.resize(self._labels, grow)
            self._alive = np.resize(self._alive, grow)
        in_order = slot == self._main_end and (slot == 0 or label > int(self._labels[slot - 1]))
        if in_order:
            self._main_end += 1
        else:
            self._extra[label] = slot
        self._labels[slot] = label
        self._alive[slot] = True
        return slot

    def add_terms(self, label: int, counts: dict[str, int]) -> None:
        label = int(label)
        self.remove(label)
        slot = self._take_slot(label)
        length = sum(counts.values())
        self._lengths[slot] = length
        self._total_length += length
        self._count += 1
        term_ids = self._term_ids
        for term in counts:
            if term not in term_ids:
                term_ids[term] = len(self._terms)
                self._terms.append(term)
        self._tail_tids.extend(map(term_ids.__getitem__, counts))
        self._tail_slots.extend([slot] * len(counts))
        self._tail_tfs.extend(counts.values())
        self._mutations += 1
        if self.auto_maintain:
            self.maintain()

    def remove(self, label: int) -> bool:
        """Forget ``label``; False if it was not indexed."""
        slot = self._find(int(label))
        if slot is None:
            return False
        self._extra.pop(int(label), None)
        self._alive[slot] = False
        self._total_length -= int(self._lengths[slot])
        self._count -= 1
        self._dead += 1
        self._removals += 1
        self._mutations += 1
        if self.auto_maintain:
            self.maintain()
        return True

    # --- packed postings: merge and compaction ---------------------------------------

    def _compaction_due(self) -> bool:
        limit = max(_COMPACT_MIN, self._next_slot // 4)
        return self._dead > limit or len(self._extra) > limit

    def maintenance_due(self) -> bool:
        """Whether the tail should be merged or dead slots reclaimed."""
        merge_due = len(self._tail_tids) > max(_MERGE_MIN, len(self._slots) // _MERGE_DIVISOR)
        return merge_due or self._compaction_due()

    def maintain(self, *, merge_only: bool = False) -> None:
        """:meth:`prepare_maintenance` and :meth:`install` in one step (an owner
        that need not keep searches going meanwhile)."""
        prepared = self.prepare_maintenance(merge_only=merge_only)
        if prepared is not None:
            self.install(prepared)

    def prepare_maintenance(self, *, merge_only: bool = False) -> _Prepared | None:
        """The merged or compacted layout, if due, built without changing the index.

        It only reads the index, so searches may run meanwhile; no add or
        remove may (the owner's single writer prepares).  A compaction
        (renumbering every slot) when it is due, else a merge of the tail;
        ``merge_only`` folds any tail in without compacting (snapshots).
        Apply the result with :meth:`install`.
        """
        if merge_only:
            if not len(self._tail_tids):
                return None
            return _Prepared(self._mutations, *self._merged_postings())
        if not self.maintenance_due():
            return None
        start, slots, tfs = self._merged_postings()
        if not self._compaction_due():
            return _Prepared(self._mutations, start, slots, tfs)
        return self._compacted(start, slots, tfs)

    def install(self, prepared: _Prepared) -> bool:
        """Swap in a prepared layout (the owner holds its lock); False if stale."""
        if prepared.mutations != self._mutations:
            return False  # an add or remove came in between: prepare again
        self._start, self._slots, self._tfs = prepared.start, prepared.slots, prepared.tfs
        self._tail_tids = array("i")
        self._tail_slots = array("i")
        self._tail_tfs = array("i")
        self._generation += 1
        renumbered = prepared.renumbered
        if renumbered is not None:
            live = len(renumbered.labels)
            size = max(64, live)
            self._terms = renumbered.terms
            self._term_ids = {term: i for i, term in enumerate(renumbered.terms)}
            self._labels = np.resize(renumbered.labels, size)
            self._lengths = np.resize(renumbered.lengths, size)
            self._alive = np.zeros(size, dtype=bool)
            self._alive[:live] = True
            self._next_slot = self._main_end = live
            self._extra = {}
            self._dead = 0
            self._weights = {}
        return True

    def _merged_postings(
        self,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """The packed arrays with the tail folded in (each term's slots stay ascending)."""
        if not len(self._tail_tids):
            return self._start, self._slots, self._tfs
        n_terms = len(self._terms)
        tids = np.array(self._tail_tids, dtype=np.int64)
        order = np.argsort(tids, kind="stable")
        tids = tids[order]
        tail_slots = np.array(self._tail_slots, dtype=np.int32)[order]
        tail_tfs = np.array(self._tail_tfs, dtype=np.float32)[order]
        base_counts = np.zeros(n_terms, dtype=np.int64)
        packed_terms = len(self._start) - 1
        base_counts[:packed_terms] = np.diff(self._start)
        tail_counts = np.bincount(tids, minlength=n_terms)
        start = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(base_counts + tail_counts, out=start[1:])
        total = int(start[-1])
        slots = np.empty(total, dtype=np.int32)
        tfs = np.empty(total, dtype=np.float32)
        if len(self._slots):
            term_of = np.repeat(np.arange(packed_terms, dtype=np.int64), base_counts[:packed_terms])
            pos = start[term_of] + (np.arange(len(self._slots)) - self._start[term_of])
            slots[pos] = self._slots
            tfs[pos] = self._tfs
        tail_first = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(tail_counts, out=tail_first[1:])
        pos = start[tids] + base_counts[tids] + (np.arange(len(tids)) - tail_first[tids])
        slots[pos] = tail_slots
        tfs[pos] = tail_tfs
        return start, slots, tfs

    def _compacted(
        self,
        start: npt.NDArray[np.int64],
        slots: npt.NDArray[np.int32],
        tfs: npt.NDArray[np.float32],
    ) -> _Prepared:
        """Dead slots and their postings dropped, slots renumbered in label order."""
        used = self._next_slot
        alive = self._alive[:used]
        live = np.flatnonzero(alive)
        live = live[np.argsort(self._labels[live], kind="stable")]
        new_of = np.full(used, -1, dtype=np.int64)
        new_of[live] = np.arange(len(live))
        n_terms = len(start) - 1  # == len(self._terms): the tail is folded in
        term_of = np.repeat(np.arange(n_terms, dtype=np.int64), np.diff(start))
        keep = alive[slots] if len(slots) else np.zeros(0, dtype=bool)
        term_of = term_of[keep]
        new_slots = new_of[slots[keep]]
        new_tfs = tfs[keep]
        order = np.lexsort((new_slots, term_of))
        term_of, new_slots, new_tfs = term_of[order], new_slots[order], new_tfs[order]
        # Forget terms no live document holds any more.
        counts = np.bincount(term_of, minlength=n_terms)
        used_terms = np.flatnonzero(counts)
        new_start = np.zeros(len(used_terms) + 1, dtype=np.int64)
        np.cumsum(counts[used_terms], out=new_start[1:])
        return _Prepared(
            self._mutations,
            new_start,
            new_slots.astype(np.int32),
            new_tfs,
            _Renumbered(
                self._labels[live],
                self._lengths[live],
                [self._terms[i] for i in used_terms.tolist()],
            ),
        )

    def _term_slots_tfs(self, tid: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """All posting entries of term ``tid`` (packed, then the tail), dead ones included.

        Without tail entries these are views of the packed arrays.
        """
        if tid + 1 < len(self._start):
            lo, hi = int(self._start[tid]), int(self._start[tid + 1])
            slots: npt.NDArray[np.int32] = self._slots[lo:hi]
            tfs: npt.NDArray[np.float32] = self._tfs[lo:hi]
        else:
            slots, tfs = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        if len(self._tail_tids):
            hit = np.flatnonzero(np.frombuffer(self._tail_tids, dtype=np.int32) == tid)
            if len(hit):
                more = np.frombuffer(self._tail_slots, dtype=np.int32)[hit]
                more_tfs = np.frombuffer(self._tail_tfs, dtype=np.int32)[hit]
                slots = np.concatenate((slots, more))
                tfs = np.concatenate((tfs, more_tfs.astype(np.float32)))
        return slots, tfs

    def _df(self, term: str) -> int:
        tid = self._term_ids.get(term)
        if tid is None:
            return 0
        slots, _ = self._term_slots_tfs(tid)
        return int(np.count_nonzero(self._alive[slots]))

    def idf(self, term: str) -> float:
        df = self._df(term)
        n = self._count
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def _posting(self, term: str) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]] | None:
        """``term``'s live slots and idf-weighted BM25 term weights (cached per statistics)."""
        tid = self._term_ids.get(term)
        if tid is None:
            return None
        stamp = (
            self._total_length,
            self._count,
            self._removals,
            self._generation,
            self._next_slot,
        )
        if stamp != self._weights_stamp:
            self._weights = {}
            self._weights_stamp = stamp
        cached = self._weights.get(tid)
        if cached is not None:
            return (cached[0], cached[1]) if cached[2] else None
        slots, tfs = self._term_slots_tfs(tid)
        alive = self._alive[slots]
        df = int(np.count_nonzero(alive))
        if df < len(slots):
            slots, tfs = slots[alive], tfs[alive]
        weights: npt.NDArray[np.float32]
        if df:
            n = self._count
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            avgdl = self._total_length / n if self._total_length else 1.0
            k1, b = self.k1, self.b
            lens = self._lengths[slots]
            norm = np.float32(k1 * (1.0 - b)) + np.float32(k1 * b / avgdl) * lens
            raw = tfs * np.float32(k1 + 1.0) / (tfs + norm)
            weights = (np.float32(idf) * raw).astype(np.float32, copy=False)
        else:
            weights = np.zeros(0, dtype=np.float32)
        self._weights[tid] = (slots, weights, df)
        return (slots, weights) if df else None

    def _score_buffer(self, query_terms: Iterable[str]) -> npt.NDArray[np.float32] | None:
        """Every slot's score (a view of a buffer reused by the next call), or None."""
        if not self._count:
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
            np.add.at(scores, posting[0], posting[1])
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
        """Msgpack-safe state: parameters, terms and the packed arrays as bytes.

        Folds the tail into the packed arrays first (dead slots are kept:
        the state is the index as it is, reloaded as it was).
        """
        self.maintain(merge_only=True)
        used = self._next_slot
        extra = sorted(self._extra.items())
        return {
            "format": STATE_FORMAT,
            "k1": self.k1,
            "b": self.b,
            "terms": list(self._terms),
            "start": self._start.astype("<i8").tobytes(),
            "slots": self._slots.astype("<i4").tobytes(),
            "tfs": self._tfs.astype("<f4").tobytes(),
            "labels": self._labels[:used].astype("<i8").tobytes(),
            "lengths": self._lengths[:used].astype("<f4").tobytes(),
            "alive": self._alive[:used].astype(np.uint8).tobytes(),
            "main_end": self._main_end,
            "extra": [[label, slot] for label, slot in extra],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BM25Index:
        """An index from :meth:`to_state` (either layout); ValueError if inconsistent."""
        index = cls(k1=float(state["k1"]), b=float(state["b"]))
        if "format" not in state:  # the per-document layout of earlier releases
            for label, pairs in zip(state["labels"], state["terms"], strict=True):
                index.add_terms(int(label), {str(t): int(c) for t, c in pairs})
            return index
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"BM25 state format {state['format']!r} unknown")
        terms = [str(t) for t in state["terms"]]
        start = np.frombuffer(state["start"], dtype="<i8").astype(np.int64)
        slots = np.frombuffer(state["slots"], dtype="<i4").astype(np.int32)
        tfs = np.frombuffer(state["tfs"], dtype="<f4").astype(np.float32)
        labels = np.frombuffer(state["labels"], dtype="<i8").astype(np.int64)
        lengths = np.frombuffer(state["lengths"], dtype="<f4").astype(np.float32)
        alive = np.frombuffer(state["alive"], dtype=np.uint8).astype(bool)
        used = len(labels)
        main_end = int(state["main_end"])
        if (
            len(start) != len(terms) + 1
            or int(start[0]) != 0
            or int(start[-1]) != len(slots)
            or len(tfs) != len(slots)
            or bool(np.any(np.diff(start) < 0))
            or len(lengths) != used
            or len(alive) != used
            or not 0 <= main_end <= used
            or (len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= used))
            or bool(np.any(np.diff(labels[:main_end]) <= 0))
        ):
            raise ValueError("BM25 state arrays disagree")
        size = max(64, used)
        index._terms = terms
        index._term_ids = {term: i for i, term in enumerate(terms)}
        index._start, index._slots, index._tfs = start, slots, tfs
        index._labels = np.resize(labels, size) if used else np.zeros(size, dtype=np.int64)
        index._lengths = np.resize(lengths, size) if used else np.zeros(size, dtype=np.float32)
        index._alive = np.zeros(size, dtype=bool)
        index._alive[:used] = alive
        index._next_slot = used
        index._main_end = main_end
        index._extra = {int(label): int(slot) for label, slot in state["extra"]}
        index._count = int(np.count_nonzero(alive))
        index._dead = used - index._count
        index._total_length = int(lengths[alive].astype(np.int64).sum())
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
