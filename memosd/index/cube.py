"""One cube's search state: id maps + BM25 + dense vectors, kept in step.

Each indexed item version gets a fresh integer *label* (never reused), which
both indexes use as their key; ``by_item`` maps an item id to its current
``(label, version, text digest)``.  Only the latest active version of an item
is present.  A new version whose indexed text is unchanged (a tier move, a
usage or metadata update) keeps its label: :meth:`CubeIndex.advance` only
records the new version, so nothing is re-embedded and the HNSW graph gets no
tombstone.

``dense`` is None when the cube's configured embedding model or dimension
differs from the daemon's embedder (``mismatch`` then says why): lexical
search still works, dense search raises ``BadRequest(reason="embedding_mismatch")``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from memosd.errors import BadRequest
from memosd.index.bm25 import BM25Index
from memosd.index.dense import DenseIndex, WouldBlock
from memosd.memcube.model import MemoryItem

__all__ = ["CubeIndex", "FormText", "embedding_mismatch", "indexed_text", "text_digest"]


#: What a memory form says search should index for an item (None: keep it out).
FormText = Callable[[MemoryItem], "str | None"]


def indexed_text(
    item: MemoryItem, context_key: str | None, form_text: FormText | None = None
) -> str | None:
    """What is indexed for ``item``: its form's index text plus its retrieval context.

    ``form_text`` is the daemon's form registry (``MemoryForm.index_text``:
    a plugin form may index a text derived from its payload, and blob-backed
    forms are kept out of search); without one, the item's text.  ``None``
    (or blank) means the item is not indexed.  The context
    (``item.metadata[context_key]``, a string) helps find the item - e.g.
    the conversation turn it answers - without being part of it.
    """
    text = item.text if form_text is None else form_text(item)
    if text is None or not text.strip():
        return None
    if context_key:
        context = item.metadata.get(context_key)
        if isinstance(context, str) and context.strip():
            return f"{text}\n{context}"
    return text


def text_digest(text: str) -> int:
    """A 64-bit digest of an indexed text, never 0 (0 stands for "not known")."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def _indexed_with(entry: tuple[int, int, int] | None, text: str) -> TypeGuard[tuple[int, int, int]]:
    """Whether a ``by_item`` entry was indexed from exactly ``text`` (digest 0: unknown)."""
    return entry is not None and entry[2] != 0 and entry[2] == text_digest(text)


def embedding_mismatch(
    cube: str, config_model: str, config_dim: int, model: str, dim: int
) -> str | None:
    """A message if the cube's recorded embedding differs from the embedder's, else None."""
    if config_model == model and config_dim == dim:
        return None
    return (
        f"cube {cube!r} records embeddings of model {config_model!r} ({config_dim}-d) "
        f"but this daemon embeds with {model!r} ({dim}-d); re-create the cube with the "
        f"daemon's model or configure the daemon with {config_model!r}"
    )


class CubeIndex:
    """Search state of one cube.  Thread-safe (one lock for the id maps and BM25)."""

    def __init__(
        self,
        name: str,
        *,
        dense: DenseIndex | None,
        mismatch: str | None = None,
        bm25: BM25Index | None = None,
    ) -> None:
        self.name = name
        self.dense = dense
        self.mismatch = mismatch
        self.bm25 = bm25 if bm25 is not None else BM25Index()
        # Merges and compactions of the BM25 arrays (up to ~1 s at 1M items)
        # are built outside the lock: see maintain_bm25.
        self.bm25.auto_maintain = False
        self.lock = threading.Lock()
        # item id -> (label, version, text_digest of the indexed text; 0 unknown)
        self.by_item: dict[str, tuple[int, int, int]] = {}
        self.by_label: dict[int, str] = {}
        # Conversation order: each session's indexed item ids, sorted (ids are
        # time-ordered ULIDs, so this is write order), for neighbour smoothing.
        # An item's conversation is the session of its latest version that names
        # one: a version written outside any session (a scheduler's tier move,
        # an edit) leaves the item where it was.
        self.session_of: dict[str, str] = {}
        self.sessions: dict[str, list[str]] = {}
        self.next_label = 1
        self.dirty = True

    def __len__(self) -> int:
        return len(self.by_item)

    @contextlib.contextmanager
    def _locked(self, blocking: bool) -> Iterator[None]:
        """The lock; ``blocking=False``: WouldBlock (see memosd.index.dense) if it is held."""
        if not self.lock.acquire(blocking=blocking):
            raise WouldBlock(self.name)
        try:
            yield
        finally:
            self.lock.release()

    def version_of(self, item_id: str) -> int | None:
        entry = self.by_item.get(item_id)
        return None if entry is None else entry[1]

    def advance(self, item_id: str, version: int, text: str, session: str | None) -> bool:
        """Record ``version`` of an indexed item whose indexed text is unchanged.

        True if the item is indexed with the same text (its label, BM25
        terms and vector stay; only the version, and the session if one is
        given, are updated); False if it must be (re)indexed through
        :meth:`upsert_many`.
        """
        with self.lock:
            old = self.by_item.get(item_id)
            if not _indexed_with(old, text):
                return False
            self.by_item[item_id] = (old[0], version, old[2])
            if session is not None:
                self._set_session(item_id, session)
            self.dirty = True
        return True

    def known_vectors(self, entries: Sequence[tuple[str, str]]) -> dict[str, npt.NDArray[Any]]:
        """Vectors of the ``(item id, text)`` entries indexed with exactly that text.

        The indexed vector of an item is its embedding when its indexed text
        (its form's text plus retrieval context) is ``text``; the digest
        says so without the text.  Entries not indexed, indexed with another
        text, or in a cube without a dense index are left out.
        """
        dense = self.dense
        if dense is None or not entries:
            return {}
        found: list[tuple[str, int]] = []
        with self.lock:
            for item_id, text in entries:
                entry = self.by_item.get(item_id)
                if _indexed_with(entry, text):
                    found.append((item_id, entry[0]))
        if not found:
            return {}
        # A label the worker removed since is simply not returned.
        stored = dense.vectors([label for _, label in found])
        return {item_id: stored[label] for item_id, label in found if label in stored}

    def upsert_many(
        self,
        entries: Sequence[tuple[str, int, str]],
        vectors: npt.NDArray[np.float32] | None,
        sessions: Sequence[str | None] | None = None,
    ) -> None:
        """Index ``(item_id, version, text)`` entries; ``vectors`` row-aligned (or None).

        ``sessions`` (row-aligned) are the items' provenance sessions, which
        place them in their conversation for :meth:`neighbours` (None: an
        indexed item stays in its conversation).
        """
        if not entries:
            return
        if self.dense is not None and vectors is None:
            raise ValueError("vectors are required for a cube with a dense index")
        labels: list[int] = []
        stale: list[int] = []
        with self.lock:
            for row, (item_id, version, text) in enumerate(entries):
                session = sessions[row] if sessions is not None else None
                if session is not None:
                    self._set_session(item_id, session)
                old = self.by_item.get(item_id)
                if old is not None:
                    stale.append(old[0])
                    self.bm25.remove(old[0])
                    del self.by_label[old[0]]
                label = self.next_label
                self.next_label += 1
                self.by_item[item_id] = (label, version, text_digest(text))
                self.by_label[label] = item_id
                self.bm25.add(label, text)
                labels.append(label)
            self.dirty = True
        self.maintain_bm25()
        if self.dense is not None and vectors is not None:
            if stale:
                self.dense.remove(stale)
            self.dense.add(labels, vectors)

    def maintain_bm25(self, *, merge_only: bool = False) -> None:
        """Merge BM25's tail or compact it, if due, without blocking searches.

        The new arrays are built outside the lock - only reads of the index,
        which searches share - and swapped in under it.  The indexer's worker
        is the only thread that writes a cube's index, so nothing can change
        the index meanwhile (``install`` refuses a stale layout regardless).
        """
        prepared = self.bm25.prepare_maintenance(merge_only=merge_only)
        if prepared is not None:
            with self.lock:
                self.bm25.install(prepared)

    def _set_session(self, item_id: str, session: str | None) -> None:
        """Move ``item_id`` to ``session``'s ordered list (None: out of every session)."""
        current = self.session_of.get(item_id)
        if current == session:
            return
        if current is not None:
            members = self.sessions[current]
            del members[bisect.bisect_left(members, item_id)]
            if not members:
                del self.sessions[current]
            del self.session_of[item_id]
        if session is not None:
            session = sys.intern(session)  # one string per session, not one per item
            bisect.insort(self.sessions.setdefault(session, []), item_id)
            self.session_of[item_id] = session

    def neighbours(self, item_id: str) -> tuple[str | None, str | None]:
        """The items indexed just before and after ``item_id`` in its session."""
        with self.lock:
            session = self.session_of.get(item_id)
            if session is None:
                return None, None
            members = self.sessions[session]
            at = bisect.bisect_left(members, item_id)
            return (
                members[at - 1] if at > 0 else None,
                members[at + 1] if at + 1 < len(members) else None,
            )

    def neighbour_scores(
        self, scores: dict[str, float], *, blocking: bool = True
    ) -> dict[str, float]:
        """For each item of ``scores`` in a session: the best positive score in
        ``scores`` of its session neighbours (the items just before and after
        it, as :meth:`neighbours` finds them); items with none are left out.  A
        search's neighbour smoothing, in one loop under one lock.
        ``blocking=False``: WouldBlock if the lock is held."""
        out: dict[str, float] = {}
        session_of = self.session_of.get
        sessions = self.sessions
        score_of = scores.get
        bisect_left = bisect.bisect_left
        with self._locked(blocking):
            for item_id in scores:
                session = session_of(item_id)
                if session is None:
                    continue
                members = sessions[session]
                at = bisect_left(members, item_id)
                best = 0.0
                if at > 0:
                    before = score_of(members[at - 1])
                    if before is not None and before > best:
                        best = before
                if at + 1 < len(members):
                    after = score_of(members[at + 1])
                    if after is not None and after > best:
                        best = after
                if best > 0.0:
                    out[item_id] = best
        return out

    def remove(self, item_id: str) -> bool:
        with self.lock:
            self._set_session(item_id, None)
            old = self.by_item.pop(item_id, None)
            if old is None:
                return False
            del self.by_label[old[0]]
            self.bm25.remove(old[0])
            self.dirty = True
        self.maintain_bm25()
        if self.dense is not None:
            self.dense.remove([old[0]])
        return True

    def require_dense(self) -> DenseIndex:
        if self.dense is None:
            raise BadRequest(
                self.mismatch or f"cube {self.name!r} has no dense index",
                reason="embedding_mismatch",
                cube=self.name,
            )
        return self.dense

    def search_dense(
        self, query: npt.NDArray[np.float32], n: int, *, blocking: bool = True
    ) -> list[tuple[str, float]]:
        dense = self.require_dense()
        found = dense.search(query, n, blocking=blocking)
        by_label = self.by_label
        # A label can vanish between the faiss search and here (concurrent update): skip it.
        return [(by_label[lab], s) for lab, s in found if lab in by_label]

    def search_lexical(
        self, terms: Sequence[str], n: int, *, blocking: bool = True
    ) -> list[tuple[str, float]]:
        with self._locked(blocking):
            found = self.bm25.search(terms, n)
            return [(self.by_label[lab], s) for lab, s in found]

    def stats(self) -> dict[str, Any]:
        dense = self.dense
        return {
            "items": len(self.by_item),
            "dense_kind": None if dense is None else dense.kind,
            "dense_vectors": 0 if dense is None else len(dense),
            "dense_tombstones": 0 if dense is None else dense.tombstones,
            "dense_building": False if dense is None else dense.building,
            "bm25_docs": len(self.bm25),
            "embedding_mismatch": self.mismatch,
        }
