"""SearchService: the one object the daemon uses for search.

::

    svc = SearchService(engine, data_dir, embedder=None, settings=IndexSettings())
    svc.start()                    # load snapshot + catch up in the background; returns at once
    svc.wait_ready(timeout)        # optional: block until the index reached the engine's LSN
    hits = svc.search(["notes"], "where do I live", k=10, wait_for_lsn=lsn)
    svc.status()                   # indexed LSN, per-cube sizes, index kinds, rebuild progress
    svc.close()                    # drain the queue, snapshot, stop

Search (``mode="hybrid"``, the default):

1. wait until ``indexed_lsn >= wait_for_lsn`` (read-your-writes), if asked;
2. per cube: the best ``candidates`` items by dense similarity (faiss) and by
   BM25; each modality's lists of all cubes are merged by score;
3. fusion of the two merged lists: by default a weighted sum of scaled
   scores (``fusion="score"``), or reciprocal rank fusion (``fusion="rrf"``);
4. walk the fused list, read each item's latest version from the engine,
   apply the filters, apply boosts, keep ``k`` (if filters leave fewer than
   ``k`` the candidate pool grows 4x and the search repeats);
5. ``engine.record_hits(cube, ids)`` for the returned items (batched in the
   engine, no WAL record).

``mode="dense"`` scores by cosine similarity alone, ``mode="lexical"`` by
BM25 alone.  Every hit carries its component scores (``dense``, ``lexical``,
``fused`` or ``rrf``, boosts, and with ``explain=True`` each list's rank and
scaled score).

Filters with ``as_of_us`` or a status other than ``"active"`` cannot use the
live index (it holds only latest active versions): such a search scans the
cube's items in the engine (the version current at ``as_of_us``, or the latest
one), scores them with a throw-away BM25 and freshly embedded vectors, then
fuses as above.  Linear in the cube size and bounded by
``history_scan_limit``: meant for audits and time travel.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from memosd.embed import Embedder, MiniLMEmbedder, QueryCache
from memosd.errors import BadRequest, NotFound, TooLarge, Unavailable
from memosd.index.bm25 import BM25Index, tokenize
from memosd.index.cube import CubeIndex, FormText, embedding_mismatch, indexed_text
from memosd.index.dense import WouldBlock
from memosd.index.filters import SearchFilters, matches, needs_history, validate_filters
from memosd.index.fusion import (
    Boosts,
    boost_components,
    fuse_scores,
    reciprocal_rank_fusion,
)
from memosd.index.indexer import Indexer
from memosd.index.settings import IndexSettings
from memosd.memcube import versioning
from memosd.memcube.model import CubeConfig, MemoryItem

__all__ = ["MODES", "SearchHit", "SearchService"]

MODES: Final = ("hybrid", "dense", "lexical")
_SCAN_PAGE: Final = 512
_COSTS_MAX: Final = 4096  # search-cost estimates kept (one per cubes/mode/k/filter kind)

Key = tuple[str, str]  # (cube, item id)
# Sort keys: best first with reverse=True, which keeps equal scores in order.
_SCORE: Final = itemgetter(1)
_HIT_SCORE: Final = attrgetter("score")


@dataclass(frozen=True, slots=True)
class SearchHit:
    item: MemoryItem
    score: float
    components: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class _Candidates:
    dense: list[tuple[Key, float]]
    lexical: list[tuple[Key, float]]
    exhausted: bool


class SearchService:
    """Hybrid (dense + BM25) search over cubes, kept in step with the engine."""

    def __init__(
        self,
        engine: Any,
        data_dir: str | os.PathLike[str],
        *,
        embedder: Embedder | None = None,
        settings: IndexSettings | None = None,
        form_text: FormText | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings or IndexSettings()
        self.form_text = form_text
        if embedder is None:
            embedder = MiniLMEmbedder(
                threads=self.settings.embed_threads, pool_size=self.settings.embed_workers + 1
            )
        self.embedder: Embedder = embedder
        self.root = Path(data_dir) / "index"
        self.queries = QueryCache(embedder, self.settings.query_cache_size)
        # Moving average of a live search's CPU time (s, query embedding excluded)
        # per _cost_key: whether try_search_inline may run one on the event loop.
        self._costs: dict[tuple[Any, ...], float] = {}
        self.inline_searches = 0  # searches answered by try_search_inline
        self.indexer = Indexer(engine, self.root, embedder, self.settings, form_text)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Attach to the engine and start loading/catching up in the background."""
        self.indexer.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until start-up (snapshot load, catch-up or rebuild) finished."""
        return self.indexer.wait_ready(timeout)

    def wait_indexed(self, lsn: int, timeout: float | None = None) -> bool:
        return self.indexer.wait_indexed(lsn, timeout)

    def wait_caught_up(self, timeout: float | None = None) -> bool:
        """Block until every write acknowledged so far is indexed; False on timeout."""
        return self.wait_indexed(self.engine.applied_lsn, timeout)

    def known_vectors(
        self, cube: str, entries: Sequence[tuple[str, str]]
    ) -> dict[str, npt.NDArray[Any]]:
        """Indexed vectors of ``(item id, text)`` entries whose indexed text is ``text``.

        For work that would embed texts the index already embedded with the
        same embedder (the tier policy's segment assignment); what is not
        (yet) indexed is left out, for the caller to embed.
        """
        index = self.indexer.cubes.get(cube)
        return {} if index is None else index.known_vectors(entries)

    def snapshot(self, timeout: float | None = None) -> bool:
        """Write a snapshot of changed cubes now (and wait for it)."""
        return self.indexer.request_snapshot(timeout)

    def close(self) -> None:
        """Index what is queued, write a snapshot, stop the worker (idempotent)."""
        self.indexer.stop(snapshot=True)

    def __enter__(self) -> SearchService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- cube configuration ---------------------------------------------------------

    def cube_config(self, **extra: Any) -> CubeConfig:
        """A CubeConfig recording this service's embedding model and dimension."""
        return CubeConfig(
            embedding_model=self.embedder.model_name, embedding_dim=self.embedder.dim, **extra
        )

    def check_cube_config(self, cube: str, config: CubeConfig) -> None:
        """BadRequest(reason="embedding_mismatch") if ``config`` records another embedding."""
        message = embedding_mismatch(
            cube,
            config.embedding_model,
            config.embedding_dim,
            self.embedder.model_name,
            self.embedder.dim,
        )
        if message is not None:
            raise BadRequest(message, reason="embedding_mismatch", cube=cube)

    # --- search -------------------------------------------------------------------

    def search(
        self,
        cubes: Sequence[str],
        query: str,
        *,
        k: int = 10,
        filters: SearchFilters | None = None,
        boosts: Boosts | None = None,
        wait_for_lsn: int | None = None,
        mode: str = "hybrid",
        explain: bool = False,
    ) -> list[SearchHit]:
        """The best ``k`` hits over ``cubes`` for ``query``, best first (see module doc)."""
        names = self._validate(cubes, query, k, mode, filters)
        return self._search(
            names, query, k, filters, boosts, wait_for_lsn, mode, explain, blocking=True
        )

    def try_search_inline(
        self,
        cubes: Sequence[str],
        query: str,
        *,
        k: int = 10,
        filters: SearchFilters | None = None,
        boosts: Boosts | None = None,
        wait_for_lsn: int | None = None,
        mode: str = "hybrid",
        explain: bool = False,
    ) -> list[SearchHit] | None:
        """:meth:`search` if it can run without blocking and is estimated to take at
        most ``settings.inline_search_us``; None otherwise (call :meth:`search`
        from a worker thread then).  For the daemon's event loop.

        Estimated from the measured CPU time of earlier searches with the
        same cubes, mode, k, filter kind and boosts (a moving average; the
        first such search is never inline), plus the query embedding unless
        the query vector is cached (the embedder's measured wall time:
        MiniLM's milliseconds never run inline).  None as well when the index is not
        ready, the principal's writes are not indexed yet (``wait_for_lsn``:
        the search would wait), the filters need the history scan, or an index
        lock is held (by the indexer).  The same hits and errors as
        :meth:`search` otherwise.
        """
        budget = self.settings.inline_search_us / 1e6
        if budget <= 0:
            return None
        names = self._validate(cubes, query, k, mode, filters)
        if self.indexer.state != "ready" or needs_history(filters):
            return None
        if wait_for_lsn is not None and self.indexer.indexed_lsn < wait_for_lsn:
            return None
        cost = self._costs.get(self._cost_key(names, k, filters, boosts, mode))
        if cost is None or cost > budget:
            return None
        try:
            hits = self._search(
                names,
                query,
                k,
                filters,
                boosts,
                None,
                mode,
                explain,
                blocking=False,
                embed_budget_s=budget - cost,
            )
        except WouldBlock:
            return None
        self.inline_searches += 1
        return hits

    def _search(  # noqa: PLR0917 - internal, both entry points pass everything
        self,
        names: list[str],
        query: str,
        k: int,
        filters: SearchFilters | None,
        boosts: Boosts | None,
        wait_for_lsn: int | None,
        mode: str,
        explain: bool,
        *,
        blocking: bool,
        embed_budget_s: float | None = None,
    ) -> list[SearchHit]:
        if self.indexer.state in ("stopped", "error"):
            raise Unavailable(
                f"the search index is {self.indexer.state}"
                + (f": {self.indexer.last_error}" if self.indexer.last_error else ""),
                reason="index_" + self.indexer.state,
            )
        for name in names:
            self.engine.get_cube(name)  # NotFound for an unknown cube
        if wait_for_lsn is not None and not self.indexer.wait_indexed(
            wait_for_lsn, self.settings.wait_timeout_s
        ):
            raise Unavailable(
                f"the search index has not reached LSN {wait_for_lsn} within "
                f"{self.settings.wait_timeout_s} s (at {self.indexer.indexed_lsn})",
                reason="index_lagging",
            )
        if not query.strip():
            return []
        if needs_history(filters):
            hits = self._search_history(
                names, query=query, k=k, filters=filters, boosts=boosts, mode=mode, explain=explain
            )
        else:
            hits = self._search_live(
                names,
                query=query,
                k=k,
                filters=filters,
                boosts=boosts,
                mode=mode,
                explain=explain,
                blocking=blocking,
                embed_budget_s=embed_budget_s,
            )
        self._record_hits(hits)
        return hits

    @staticmethod
    def _cost_key(
        names: list[str],
        k: int,
        filters: SearchFilters | None,
        boosts: Boosts | None,
        mode: str,
    ) -> tuple[Any, ...]:
        return (
            tuple(names),
            mode,
            k,
            filters is not None and filters.restrictive,
            boosts is not None and boosts.active,
        )

    def _note_cost(self, key: tuple[Any, ...], seconds: float) -> None:
        """Fold one live search's CPU time (without the query embedding) into its estimate."""
        costs = self._costs
        old = costs.get(key)
        if old is None and len(costs) >= _COSTS_MAX:
            costs.clear()
        costs[key] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def _validate(
        self, cubes: Sequence[str], query: str, k: int, mode: str, filters: SearchFilters | None
    ) -> list[str]:
        """The deduplicated cube names; BadRequest for any bad argument."""
        if isinstance(cubes, str):
            cubes = [cubes]
        names = list(dict.fromkeys(cubes))
        if not names or not all(isinstance(c, str) for c in names):
            raise BadRequest("search needs at least one cube name")
        if not isinstance(query, str):
            raise BadRequest("query must be a string")
        if type(k) is not int or not 1 <= k <= self.settings.max_k:
            raise BadRequest(f"k must be an int in 1..{self.settings.max_k}, got {k!r}")
        if mode not in MODES:
            raise BadRequest(f"mode must be one of {MODES}, got {mode!r}")
        if filters is not None:
            validate_filters(filters)
        return names

    def _search_live(
        self,
        names: list[str],
        *,
        query: str,
        k: int,
        filters: SearchFilters | None,
        boosts: Boosts | None,
        mode: str,
        explain: bool,
        blocking: bool = True,
        embed_budget_s: float | None = None,
    ) -> list[SearchHit]:
        cubes = [c for c in (self.indexer.cube(n) for n in names) if c is not None]
        vector = None
        if mode != "lexical":
            for cube in cubes:
                cube.require_dense()
            if blocking:
                vector = self.queries.embed_query(query)
            else:
                vector = self.queries.try_embed_query(query, embed_budget_s)
                if vector is None:
                    raise WouldBlock("query embedding")
        # CPU time of this thread: what the search costs whichever thread runs it
        # (wall time would also count waits for the GIL and for a busy CPU).
        started = time.thread_time()
        terms = tokenize(query) if mode != "dense" else []
        n = (
            k
            if self._top_k_suffices(cubes, filters, boosts, mode)
            else max(self.settings.candidates, k)
        )
        while True:
            found = self._gather(cubes, vector, terms, n, blocking)
            hits = self._rank_and_fetch(
                found,
                k=k,
                filters=filters,
                boosts=boosts,
                mode=mode,
                explain=explain,
                fetch=self._latest,
                blocking=blocking,
            )
            if len(hits) >= k or found.exhausted:
                key = self._cost_key(names, k, filters, boosts, mode)
                self._note_cost(key, time.thread_time() - started)
                return hits
            n *= 4

    def _top_k_suffices(
        self,
        cubes: list[CubeIndex],
        filters: SearchFilters | None,
        boosts: Boosts | None,
        mode: str,
    ) -> bool:
        """True if each list's best ``k`` already decide the result, so a search
        can ask the indexes for ``k`` candidates instead of ``candidates``.

        That holds for a single-modality search (no fusion, whose score scaling
        depends on the whole candidate list) that nothing re-ranks or drops:
        no restrictive filter, no boost, and no session-neighbour smoothing
        (off, or no item of these cubes has a session).  Pure dense searches
        over plain items - the common case for small corpora - then skip the
        bookkeeping of ~100 candidates.
        """
        if mode == "hybrid" or (filters is not None and filters.restrictive):
            return False
        if boosts is not None and boosts.active:
            return False
        return self.settings.neighbour_weight <= 0 or not any(cube.sessions for cube in cubes)

    def _gather(
        self,
        cubes: list[CubeIndex],
        vector: np.ndarray[Any, Any] | None,
        terms: list[str],
        n: int,
        blocking: bool = True,
    ) -> _Candidates:
        dense: list[tuple[Key, float]] = []
        lexical: list[tuple[Key, float]] = []
        exhausted = True
        for cube in cubes:
            if vector is not None:
                got = cube.search_dense(vector, n, blocking=blocking)
                exhausted = exhausted and len(got) < n
                dense.extend(((cube.name, item_id), s) for item_id, s in got)
            if terms:
                got = cube.search_lexical(terms, n, blocking=blocking)
                exhausted = exhausted and len(got) < n
                lexical.extend(((cube.name, item_id), s) for item_id, s in got)
        # reverse=True keeps equal scores in their order, as a key of -score did.
        dense.sort(key=_SCORE, reverse=True)
        lexical.sort(key=_SCORE, reverse=True)
        return _Candidates(dense, lexical, exhausted)

    def _latest(self, keys: list[Key]) -> list[MemoryItem | None]:
        """Latest versions of ``keys`` (None where gone), in one engine read if possible."""
        get_many = getattr(self.engine, "get_many", None)
        if get_many is not None:
            by_cube: dict[str, list[str]] = {}
            for cube, item_id in keys:
                by_cube.setdefault(cube, []).append(item_id)
            found: dict[Key, MemoryItem | None] = {}
            for cube, ids in by_cube.items():
                for item_id, item in zip(ids, get_many(cube, ids), strict=True):
                    found[(cube, item_id)] = item
            return [found[key] for key in keys]
        items: list[MemoryItem | None] = []
        for cube, item_id in keys:
            try:
                items.append(self.engine.get(cube, item_id))
            except NotFound:
                items.append(None)
        return items

    def _rank_and_fetch(
        self,
        found: _Candidates,
        *,
        k: int,
        filters: SearchFilters | None,
        boosts: Boosts | None,
        mode: str,
        explain: bool,
        fetch: Callable[[list[Key]], list[MemoryItem | None]],
        blocking: bool = True,
    ) -> list[SearchHit]:
        ranked, components_of = self._rank(found, mode=mode, explain=explain)
        bonus: dict[Key, float] = {}
        if self.settings.neighbour_weight > 0 and ranked:
            ranked, bonus = self._smooth_by_neighbours(ranked, blocking=blocking)
        boosting = boosts is not None and boosts.active
        now_us = time.time_ns() // 1000
        if boosts is not None and boosts.now_us is not None:
            now_us = boosts.now_us
        hits: list[SearchHit] = []
        # Read items in chunks (one engine read each when the engine has get_many):
        # without boosts only until k pass the filters.  A candidate's score
        # components are built only once it is a hit.
        chunk = max(1, len(ranked) if boosting else k)
        start = 0
        while start < len(ranked):
            part = ranked[start : start + chunk]
            start += len(part)
            items = fetch([key for key, _, _ in part])
            for (key, base, fused), item in zip(part, items, strict=True):
                if item is None or not matches(item, filters):
                    continue
                score = base
                components = components_of(key, fused)
                if key in bonus:
                    components["neighbour"] = bonus[key]
                    if explain:
                        components["before_neighbour"] = fused
                if boosting:
                    assert boosts is not None
                    extra = boost_components(
                        boosts,
                        now_us=now_us,
                        time_us=item.recorded_us
                        if item.valid_from_us is None
                        else item.valid_from_us,
                        heat=item.usage.heat,
                        importance=item.importance,
                    )
                    components.update(extra)
                    components["base"] = base
                    score = base * (1.0 + sum(extra.values()))
                hits.append(SearchHit(item, score, components))
            if not boosting and len(hits) >= k:
                break
            chunk = max(chunk, 2 * k)
        if boosting:
            hits.sort(key=_HIT_SCORE, reverse=True)
        return hits[:k]

    def _rank(
        self, found: _Candidates, *, mode: str, explain: bool
    ) -> tuple[list[tuple[Key, float, float]], Callable[[Key, float], dict[str, float]]]:
        """The candidates as ``(key, score, fused score)`` best first (score and
        fused score are equal until neighbour smoothing), and a function giving
        a candidate's score components (built per hit, not per candidate)."""
        positions: dict[str, dict[Key, int]] = {}

        def rank_in(name: str) -> dict[Key, int]:  # explain only: computed once, on demand
            if name not in positions:
                source = found.dense if name == "dense" else found.lexical
                positions[name] = {key: i for i, (key, _) in enumerate(source, start=1)}
            return positions[name]

        if mode != "hybrid":
            name = "dense" if mode == "dense" else "lexical"
            source = found.dense if mode == "dense" else found.lexical

            def single(key: Key, fused: float) -> dict[str, float]:
                components = {name: fused}
                if explain:
                    components[f"{name}_rank"] = float(rank_in(name)[key])
                return components

            return [(key, score, score) for key, score in source], single

        weights = {"dense": self.settings.dense_weight, "lexical": self.settings.lexical_weight}
        extra: dict[Key, dict[str, float]] = {}  # explain only: per-list fusion inputs
        if self.settings.fusion == "rrf":
            fused_name = "rrf"
            fused_ranks = reciprocal_rank_fusion(
                {
                    "dense": [key for key, _ in found.dense],
                    "lexical": [key for key, _ in found.lexical],
                },
                rrf_k=self.settings.rrf_k,
                weights=weights,
            )
            ranking = [(key, score) for key, score, _ in fused_ranks]
            if explain:
                for key, _, ranks in fused_ranks:
                    extra[key] = {f"{n}_rank": float(r) for n, r in ranks.items()}
        else:
            fused_name = "fused"
            ranking, scaled = fuse_scores(
                {"dense": found.dense, "lexical": found.lexical},
                weights=weights,
                scaling={"dense": "minmax", "lexical": "max"},
            )
            if explain:
                for list_name, values in scaled.items():
                    for key, value in values.items():
                        extra.setdefault(key, {})[f"{list_name}_scaled"] = value
        dense_scores = dict(found.dense)
        lexical_scores = dict(found.lexical)

        def hybrid(key: Key, fused: float) -> dict[str, float]:
            components = {fused_name: fused}
            if explain:
                components.update(extra.get(key, {}))
            if key in dense_scores:
                components["dense"] = dense_scores[key]
            if key in lexical_scores:
                components["lexical"] = lexical_scores[key]
            if explain:
                for list_name in ("dense", "lexical"):
                    at = rank_in(list_name).get(key)
                    if at is not None:
                        components[f"{list_name}_rank"] = float(at)
            return components

        return [(key, score, score) for key, score in ranking], hybrid

    def _smooth_by_neighbours(
        self,
        ranked: list[tuple[Key, float, float]],
        *,
        blocking: bool = True,
    ) -> tuple[list[tuple[Key, float, float]], dict[Key, float]]:
        """Add ``neighbour_weight`` x the best candidate score among each candidate's
        session neighbours (the items just before and after it), then re-rank.

        Returns the re-ranked candidates and the bonus each one received."""
        weight = self.settings.neighbour_weight
        scores_by_cube: dict[str, dict[str, float]] = {}
        for (cube_name, item_id), score, _ in ranked:
            scores = scores_by_cube.get(cube_name)
            if scores is None:
                scores = scores_by_cube[cube_name] = {}
            scores[item_id] = score
        best_by_cube: dict[str, dict[str, float]] = {}
        for cube_name, scores in scores_by_cube.items():
            cube = self.indexer.cube(cube_name)
            if cube is not None and cube.sessions:
                best = cube.neighbour_scores(scores, blocking=blocking)
                if best:
                    best_by_cube[cube_name] = best
        if not best_by_cube:
            return ranked, {}  # no candidate has a session neighbour: nothing to add
        out: list[tuple[Key, float, float]] = []
        bonuses: dict[Key, float] = {}
        for entry in ranked:
            key = entry[0]
            of_cube = best_by_cube.get(key[0])
            neighbour = None if of_cube is None else of_cube.get(key[1])
            if neighbour is None:
                out.append(entry)
            else:
                bonus = weight * neighbour
                bonuses[key] = bonus
                out.append((key, entry[1] + bonus, entry[2]))
        out.sort(key=_SCORE, reverse=True)  # stable: ties keep the fused order
        return out, bonuses

    def _search_history(
        self,
        names: list[str],
        *,
        query: str,
        k: int,
        filters: SearchFilters | None,
        boosts: Boosts | None,
        mode: str,
        explain: bool,
    ) -> list[SearchHit]:
        assert filters is not None
        items: dict[Key, MemoryItem] = {}
        for name in names:
            for item in self._scan_versions(name, filters):
                items[(name, item.id)] = item
        texts: dict[Key, str] = {}
        for key, item in items.items():
            text = indexed_text(item, self.settings.context_key, self.form_text)
            if text is not None:
                texts[key] = text
        keys = list(texts)
        dense: list[tuple[Key, float]] = []
        lexical: list[tuple[Key, float]] = []
        if mode != "dense":
            bm25 = BM25Index()
            for label, key in enumerate(keys):
                bm25.add(label, texts[key])
            lexical = [(keys[label], s) for label, s in bm25.search(query, len(keys))]
        if mode != "lexical" and keys:
            for name in names:
                cube = self.indexer.cube(name)
                if cube is not None:
                    cube.require_dense()
            vector = self.queries.embed_query(query)
            vectors = np.concatenate(
                [
                    self.embedder.embed([texts[key] for key in keys[i : i + 256]])
                    for i in range(0, len(keys), 256)
                ]
            )
            sims = vectors @ vector
            order = np.argsort(-sims, kind="stable")
            dense = [(keys[int(i)], float(sims[int(i)])) for i in order]
        found = _Candidates(dense, lexical, exhausted=True)
        return self._rank_and_fetch(
            found,
            k=k,
            filters=filters,
            boosts=boosts,
            mode=mode,
            explain=explain,
            fetch=lambda keys: [items.get(key) for key in keys],
        )

    def _scan_versions(self, cube: str, filters: SearchFilters) -> list[MemoryItem]:
        """Each item's version at ``as_of_us`` (or latest) in ``cube`` that passes the filters."""
        out: list[MemoryItem] = []
        items = self.engine.iter_items(cube, status=None, page=_SCAN_PAGE)
        for scanned, latest in enumerate(items, 1):
            if scanned > self.settings.history_scan_limit:
                raise TooLarge(
                    f"cube {cube!r} has more than history_scan_limit="
                    f"{self.settings.history_scan_limit} items for an as_of/status search",
                    reason="history_scan_limit",
                )
            version: MemoryItem | None = latest
            if filters.as_of_us is not None:
                version = versioning.as_of(self.engine.history(cube, latest.id), filters.as_of_us)
            if version is not None and matches(version, filters):
                out.append(version)
        return out

    def _record_hits(self, hits: list[SearchHit]) -> None:
        by_cube: dict[str, list[str]] = {}
        for hit in hits:
            by_cube.setdefault(hit.item.cube, []).append(hit.item.id)
        now_us = time.time_ns() // 1000
        for cube, ids in by_cube.items():
            with contextlib.suppress(NotFound):  # dropped meanwhile
                self.engine.record_hits(cube, ids, now_us=now_us)

    # --- status -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        status = self.indexer.status()
        try:
            applied = self.indexer.engine_lsn()
        except Exception:
            applied = None
        status["applied_lsn"] = applied
        status["lag"] = None if applied is None else max(0, applied - status["indexed_lsn"])
        status["embedder"] = {"model": self.embedder.model_name, "dim": self.embedder.dim}
        dtype = getattr(self.embedder, "dtype", None)  # sentence-transformers: the precision
        if isinstance(dtype, str):
            status["embedder"]["dtype"] = dtype
        status["query_cache"] = self.queries.stats()
        status["inline_searches"] = self.inline_searches
        return status
