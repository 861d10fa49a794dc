"""The built-in plaintext tier policy: short -> mid -> long, and forgetting.

Storage layout (all ordinary items, so history, "as of" reads, export and
crash recovery need nothing special):

* **turns** are plaintext items.  ``tier="short"`` while among the latest
  ``short_capacity`` of their session; evicted turns get a new version with
  ``tier="mid"``, ``operation="migrate"`` and ``metadata["segment"] = <segment id>``.
* **segments** are items of form ``"tier-segment"``, ``tier="mid"``, empty
  text (so search never returns them), with ``metadata["segment"]`` =
  ``{"v": 1, "vector_sum": <float32 LE bytes>, "turns": [ids],
  "last_active_us", "visits_base", "length_base", "consolidated": [ids],
  "summary"}``.  Demoted segments are archived (never deleted) and their
  turns move to ``tier="long"`` (``mid_overflow="long"``) or are archived.
* **facts** are plaintext items with ``tier="long"``,
  ``operation="consolidate"``, ``metadata = {"tier_kind": "fact",
  "subject", "value", "segment"}`` and provenance parents = the source
  turns ``(id, version)`` (plus the superseded fact, for a contradiction).

Jobs (all ``exclusive_per_cube``; each commits its effects and its success
in one atomic write):

* ``tiers.evict`` - FIFO eviction, segment assignment, mid capacity; queues
  ``tiers.consolidate`` in the same commit when a segment is hot.
* ``tiers.consolidate`` - hot segments -> facts (add / reinforce / supersede).
* ``tiers.forget`` - TTL expiry and cold long-term decay, both to ``archived``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from memosd.embed import Embedder
from memosd.errors import Conflict, NotFound
from memosd.memcube import versioning
from memosd.memcube.model import MemoryItem, Operation, Status, Tier
from memosd.scheduler import tiers
from memosd.scheduler.consolidate import (
    Consolidator,
    ExtractiveConsolidator,
    FactDraft,
    OpenAICompatibleConsolidator,
    SourceTurn,
)
from memosd.scheduler.policy import JobRequest, PolicyContext, PolicySetting, resolve_settings
from memosd.scheduler.runner import JobContext, JobDeferred, JobHandler
from memosd.scheduler.tiers import SegmentState, ShortTurn, TierSettings

if TYPE_CHECKING:
    from memosd.engine import ChangeEvent
    from memosd.store.planner import Planner

__all__ = [
    "BUILTIN_CONSOLIDATORS",
    "CONSOLIDATE",
    "EVICT",
    "FORGET",
    "POLICY_NAME",
    "SEGMENT_FORM",
    "PlaintextTierPolicy",
    "builtin_policies",
    "make_extractive_consolidator",
    "make_openai_consolidator",
]

POLICY_NAME: Final = "plaintext"
SEGMENT_FORM: Final = "tier-segment"
EVICT: Final = "tiers.evict"
CONSOLIDATE: Final = "tiers.consolidate"
FORGET: Final = "tiers.forget"
_HEAT_BINS: Final = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)
# An eviction waiting for the search index waits this long in its worker,
# then gives the worker back and runs again this much later (JobDeferred).
_INDEX_WAIT_INLINE_S: Final = 0.5
_INDEX_RECHECK_S: Final = 1.0


#: (cube, [(item id, text)]) -> the vectors an index holds for exactly those texts, by id.
VectorLookup = Callable[[str, Sequence[tuple[str, str]]], Mapping[str, Any]]

#: Per turn id: (search hits, last hit time) - what segment heat needs of a member.
_Usage = dict[str, tuple[int, int]]


def _session_of(engine: Any, item: MemoryItem) -> str:
    """The conversation ``item`` belongs to ("" for none): the session of its latest
    version that names one.  A version written outside any session (an edit, a
    scheduler's move) leaves the turn in its session's FIFO, as in search's
    neighbour smoothing (memosd.index.cube)."""
    session = item.provenance.session
    if session is None and item.version > 1:
        with contextlib.suppress(NotFound):  # purged meanwhile: no session
            session = versioning.conversation(engine.history(item.cube, item.id))
    return session or ""


def _usage(item: MemoryItem) -> tuple[int, int]:
    return item.usage.hits, item.usage.last_hit_us or 0


def _fold(totals: Mapping[str, Any], step: Mapping[str, Any]) -> dict[str, Any]:
    """Eviction totals with one more step's result added."""
    return {
        "evicted": totals["evicted"] + step["evicted"],
        "segments_created": totals["segments_created"] + step["segments_created"],
        "segments_joined": totals["segments_joined"] + step["segments_joined"],
        "demoted": [*totals["demoted"], *step["demoted"]],
        "consolidate_job": step["consolidate_job"] or totals["consolidate_job"],
        "steps": totals["steps"] + 1,
    }


def _last_activity(item: MemoryItem) -> int:
    return max(item.recorded_us, item.usage.last_hit_us or 0)


class _Handler:
    """A job handler bound to a policy method; one job per cube at a time."""

    exclusive_per_cube = True
    needs_process = False

    def __init__(self, fn: Callable[[JobContext], dict[str, Any] | None]) -> None:
        self._fn = fn

    def __call__(self, ctx: JobContext) -> dict[str, Any] | None:
        return self._fn(ctx)


class PlaintextTierPolicy:
    """MemoryOS-style short/mid/long tiers for plaintext turns (see the module doc)."""

    name = POLICY_NAME
    settings: Sequence[PolicySetting] = tiers.SETTINGS

    def __init__(
        self,
        embedder: Embedder | Callable[[], Embedder] | None = None,
        *,
        consolidator: Consolidator | None = None,
        consolidators: Mapping[str, ConsolidatorFactory] | None = None,
        before_commit: Callable[[JobContext], None] | None = None,
    ) -> None:
        """``embedder``: an Embedder, a factory called on first use, or None for MiniLM.

        ``consolidators`` are the factories by name the ``consolidator``
        setting chooses from (default: the built-in ``extractive`` and
        ``openai``; the daemon adds those of ``register_consolidators``
        with :meth:`use_consolidators`).  ``consolidator`` overrides the
        setting (tests).  ``before_commit`` is a test hook called by the
        consolidation job right before its atomic commit.
        """
        self._embedder_source = embedder
        self._embedder: Embedder | None = None
        self._vector_lookup: VectorLookup | None = None
        self._index_wait: Callable[[float], bool] | None = None
        self.vectors_reused = 0  # turn vectors taken from the search index, not embedded
        self._embedder_lock = threading.Lock()
        self._consolidator = consolidator
        self._factories: dict[str, ConsolidatorFactory] = dict(
            BUILTIN_CONSOLIDATORS if consolidators is None else consolidators
        )
        self.before_commit = before_commit
        self._counts: dict[str, dict[str, int]] = {}
        # cube -> when the eviction queued by a write may start (evict_delay_s): until
        # then new turns need no look at all, that job will see them.
        self._evict_due: dict[str, int] = {}
        self._last_periodic: dict[tuple[str, str], int] = {}
        self._handlers: dict[str, JobHandler] = {
            EVICT: _Handler(self._run_evict),
            CONSOLIDATE: _Handler(self._run_consolidate),
            FORGET: _Handler(self._run_forget),
        }

    def use_embedder(self, embedder: Embedder | Callable[[], Embedder]) -> None:
        """Use this embedder (the daemon passes its search embedder, so models are shared)."""
        with self._embedder_lock:
            self._embedder_source = embedder
            self._embedder = None

    def use_vector_lookup(
        self, lookup: VectorLookup, wait: Callable[[float], bool] | None = None
    ) -> None:
        """Take turn vectors the search index already holds (``SearchService.known_vectors``)
        instead of embedding those texts a second time; the rest are embedded.

        ``wait(timeout)`` (``SearchService.wait_caught_up``) lets an eviction
        first wait, at most ``index_wait_s``, for the index to catch up: on
        2 cores, the indexer and the job embedding the same backlog side by
        side take about twice the CPU of the indexer alone.
        """
        self._vector_lookup = lookup
        self._index_wait = wait

    def use_consolidators(self, factories: Mapping[str, ConsolidatorFactory]) -> None:
        """Add consolidator factories by name (from the ``register_consolidators`` hook).

        A name this policy already knows keeps its factory: the built-in
        ``extractive``/``openai`` are called as ``factory(embedder=...,
        **plaintext settings)`` and cannot be replaced by another shape.
        """
        for name, factory in factories.items():
            self._factories.setdefault(name, factory)

    # --- plumbing ------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                source = self._embedder_source
                if source is None:
                    from memosd.embed import MiniLMEmbedder  # noqa: PLC0415 - heavy, lazy

                    self._embedder = MiniLMEmbedder()
                elif isinstance(source, Embedder):
                    self._embedder = source
                else:
                    self._embedder = source()
            return self._embedder

    def _embed(self, texts: Sequence[str]) -> tiers.Vector:
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.asarray(self.embedder.embed(list(texts)), dtype=np.float32)

    def _wait_for_index(self, ctx: JobContext, timeout_s: float) -> None:
        """Let the search index catch up first, until ``timeout_s`` after the job was queued.

        A short wait in the worker; if the index is still behind, the job is
        deferred (:class:`JobDeferred`) and checks again a second later, so
        a long catch-up does not hold one of the runner's few workers.
        Once ``timeout_s`` has passed the job goes on and embeds what the
        index does not hold yet.
        """
        wait = self._index_wait
        if wait is None or timeout_s <= 0:
            return
        left_s = timeout_s - (ctx.now_us() - ctx.job.created_us) / 1e6
        if left_s <= 0 or wait(min(_INDEX_WAIT_INLINE_S, left_s)):
            return
        ctx.check_cancelled()
        if left_s > _INDEX_WAIT_INLINE_S:
            raise JobDeferred(
                min(_INDEX_RECHECK_S, left_s - _INDEX_WAIT_INLINE_S),
                "waiting for the search index to catch up",
            )

    def _item_vectors(self, cube: str, items: Sequence[tuple[str, str]]) -> tiers.Vector:
        """Embeddings of ``(item id, text)``: the search index's where it holds exactly
        that text, else embedded now."""
        lookup = self._vector_lookup
        known = {} if lookup is None or not items else lookup(cube, items)
        missing = [i for i, (item_id, _) in enumerate(items) if item_id not in known]
        fresh = self._embed([items[i][1] for i in missing])
        if not known:
            return fresh
        self.vectors_reused += len(known)
        out = np.empty((len(items), fresh.shape[1]), dtype=np.float32)
        for row, i in enumerate(missing):
            out[i] = fresh[row]
        for i, (item_id, _) in enumerate(items):
            if item_id in known:
                out[i] = known[item_id]
        return out

    def _draft_vectors(self, drafts: Sequence[FactDraft]) -> tiers.Vector:
        """Vectors of the drafts: the consolidator's where given, else embedded now."""
        missing = [i for i, d in enumerate(drafts) if d.vector is None]
        fresh = self._embed([drafts[i].text for i in missing])
        out = np.zeros((len(drafts), self.embedder.dim), dtype=np.float32)
        for i, d in enumerate(drafts):
            if d.vector is not None:
                out[i] = d.vector
        for row, i in enumerate(missing):
            out[i] = fresh[row]
        return out

    def handlers(self) -> Mapping[str, JobHandler]:
        return dict(self._handlers)

    def cube_settings(self, engine: Any, cube: str) -> TierSettings:
        config = engine.get_cube(cube).config.tier_policy
        overrides = config.get(self.name) if isinstance(config, Mapping) else None
        return TierSettings.from_mapping(resolve_settings(self, overrides))

    def consolidator_for(self, settings: TierSettings) -> Consolidator:
        if self._consolidator is not None:
            return self._consolidator
        factory = self._factories.get(settings.consolidator)
        if factory is None:
            raise NotFound(
                f"no consolidator named {settings.consolidator!r} "
                f"(known: {sorted(self._factories)})",
                reason="no_consolidator",
            )
        return factory(embedder=self.embedder, **dataclasses.asdict(settings))

    # --- triggers --------------------------------------------------------------------

    def on_write(
        self, event: ChangeEvent, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]:
        """A new short turn that takes its session over capacity queues ``tiers.evict``.

        Counting is a cheap in-memory estimate (one scan per cube, then +1
        per new short turn, reset to capacity when a job is queued); the
        job itself recomputes exactly.  The job waits ``evict_delay_s``;
        writes meanwhile are not even looked at (that job sees them), so a
        burst of writes costs one job, not one per turn.  Turns added in
        that window are not counted, so a session may run a little over
        capacity until its next over-capacity write or the periodic check.
        """
        if event.kind == "cube_dropped" and event.cube is not None:
            self._counts.pop(event.cube, None)
            self._evict_due.pop(event.cube, None)
            return []
        if event.kind != "item_written" or event.version != 1 or event.cube is None:
            return []
        cube = event.cube
        clock = getattr(ctx, "clock", None)
        now = int(clock()) if callable(clock) else time.time_ns() // 1000
        due = self._evict_due.get(cube)
        if due is not None and now < due:
            return []
        try:
            item = ctx.engine.get(cube, event.item_id, version=1)
        except NotFound:
            return []
        if item.tier != Tier.SHORT or item.form != "plaintext" or item.status != Status.ACTIVE:
            return []
        counts = self._counts.get(cube)
        if counts is None:
            counts = {}
            for turn in ctx.engine.iter_items(cube, tier=Tier.SHORT, form="plaintext"):
                key = _session_of(ctx.engine, turn)
                counts[key] = counts.get(key, 0) + 1
            self._counts[cube] = counts
        else:
            key = item.provenance.session or ""
            counts[key] = counts.get(key, 0) + 1
        capacity = int(settings["short_capacity"])
        max_items = int(settings.get("short_max_items", 0))
        over = [k for k, n in counts.items() if n > capacity]
        if not over and not (max_items > 0 and sum(counts.values()) > max_items):
            return []
        for key in over:
            counts[key] = capacity
        if max_items > 0 and sum(counts.values()) > max_items:
            # Which sessions lose turns is the job's decision: count again
            # (the short tier is bounded, so that read is small).
            self._counts.pop(cube, None)
        delay_us = int(float(settings.get("evict_delay_s", 0.0)) * 1_000_000)
        if delay_us <= 0:
            return [self._request(EVICT, cube)]
        self._evict_due[cube] = now + delay_us
        return [dataclasses.replace(self._request(EVICT, cube), not_before_us=now + delay_us)]

    def periodic(
        self, cube: str, now_us: int, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]:
        """Every ``consolidate_interval_s``: evict / consolidate if there is work;
        every ``forget_interval_s``: forget if something expired or went cold.

        The checks are reads on the scheduler thread, so idle cubes do not
        pile up empty job records.
        """
        s = TierSettings.from_mapping(settings)
        out = []
        if self._due(cube, "tiers", now_us, s.consolidate_interval_s):
            counts: dict[str, int] = {}
            for turn in ctx.engine.iter_items(cube, tier=Tier.SHORT, form="plaintext"):
                key = _session_of(ctx.engine, turn)
                counts[key] = counts.get(key, 0) + 1
            if tiers.evictions_due(counts, s.short_capacity, s.short_max_items):
                out.append(self._request(EVICT, cube))
            if self._hot_segments(ctx.engine, cube, now_us, s)[0]:
                out.append(self._request(CONSOLIDATE, cube))
        if self._due(cube, "forget", now_us, s.forget_interval_s):
            expire, cold = self._forgettable(ctx.engine, cube, now_us, s)
            if expire or cold:
                out.append(self._request(FORGET, cube))
        return out

    def _due(self, cube: str, what: str, now_us: int, interval_s: float) -> bool:
        last = self._last_periodic.get((cube, what))
        if last is not None and now_us - last < interval_s * 1_000_000:
            return False
        self._last_periodic[(cube, what)] = now_us
        return True

    def on_demand(self, cube: str, settings: Mapping[str, Any]) -> list[JobRequest]:
        return [
            self._request(EVICT, cube),
            self._request(CONSOLIDATE, cube),
            self._request(FORGET, cube),
        ]

    @staticmethod
    def _request(kind: str, cube: str) -> JobRequest:
        return JobRequest(kind, cube, dedup_key=f"{kind}:{cube}")

    # --- reading the tiers --------------------------------------------------------------

    def _segments(self, engine: Any, cube: str) -> dict[str, tuple[MemoryItem, SegmentState]]:
        out = {}
        for item in engine.iter_items(cube, tier=Tier.MID, form=SEGMENT_FORM):
            out[item.id] = (
                item,
                SegmentState.from_metadata(item.id, item.metadata["segment"], item.version),
            )
        return out

    def _heat(
        self,
        segment: SegmentState,
        members: Mapping[str, tuple[int, int]],
        now_us: int,
        settings: TierSettings,
    ) -> tuple[float, int, int]:
        """(heat, last activity, total visits) of a segment over its current members."""
        visits = 0
        last = segment.last_active_us
        for turn_id in segment.turns:
            usage = members.get(turn_id)
            if usage is None:
                continue
            visits += usage[0]
            last = max(last, usage[1])
        heat = tiers.segment_heat(
            visits=max(0, visits - segment.visits_base),
            length=max(0, len(segment.turns) - segment.length_base),
            idle_us=now_us - last,
            settings=settings,
        )
        return heat, last, visits

    def _hot_segments(
        self, engine: Any, cube: str, now_us: int, settings: TierSettings
    ) -> tuple[list[tuple[float, SegmentState, int]], _Usage]:
        """The hottest segments at or above ``promote_heat`` (at most a batch), and mid usage."""
        members = self._mid_usage(engine, cube)
        scored = []
        for _, segment in self._segments(engine, cube).values():
            heat, _, visits = self._heat(segment, members, now_us, settings)
            if heat >= settings.promote_heat:
                scored.append((heat, segment, visits))
        scored.sort(key=lambda h: (-h[0], h[1].key))
        return scored[: settings.consolidate_batch], members

    @staticmethod
    def _mid_usage(engine: Any, cube: str) -> _Usage:
        """Usage of the active mid-tier turns, by id."""
        return {t.id: _usage(t) for t in engine.iter_items(cube, tier=Tier.MID, form="plaintext")}

    def _forgettable(
        self, engine: Any, cube: str, now_us: int, settings: TierSettings
    ) -> tuple[list[tuple[MemoryItem, int]], list[MemoryItem]]:
        """Active items whose TTL ran out (with the expiry time), and cold long-tier items."""
        expire: list[tuple[MemoryItem, int]] = []
        cold: list[MemoryItem] = []
        cold_us = int(settings.long_cold_days * tiers.US_PER_DAY)
        for item in engine.iter_items(cube, status=Status.ACTIVE):
            expires = item.expires_at_us
            if expires is not None and now_us >= expires:
                expire.append((item, expires))
            elif (
                cold_us > 0
                and item.tier == Tier.LONG
                and item.form == "plaintext"
                and now_us - _last_activity(item) >= cold_us
            ):
                cold.append(item)
        return expire, cold

    # --- tiers.evict --------------------------------------------------------------------

    def _run_evict(self, ctx: JobContext) -> dict[str, Any] | None:
        """FIFO eviction, in committed steps of at most ``evict_batch`` turns.

        The short tier is read once.  Each step moves the next (oldest)
        turns to mid: segment assignment against the segments as the
        previous step left them, mid capacity, and its own atomic write (a
        bulk load of 100k turns is one WAL record per step, not one record
        of ~80 MB).  A crash or a failed step leaves the earlier steps'
        turns in mid, consistently; the rerun evicts only the rest.
        """
        engine, cube = ctx.engine, _cube_of(ctx)
        settings = self.cube_settings(engine, cube)
        short = [
            ShortTurn.of(t, _session_of(engine, t))
            for t in engine.iter_items(cube, tier=Tier.SHORT, form="plaintext")
        ]
        turns = tiers.fifo_evictions(short, settings.short_capacity, settings.short_max_items)
        gone = {t.id for t in turns}
        kept: dict[str, int] = {}
        for turn in short:
            if turn.id not in gone:
                kept[turn.session] = kept.get(turn.session, 0) + 1
        del short, gone
        self._wait_for_index(ctx, settings.index_wait_s if turns else 0.0)
        size = settings.evict_batch
        steps = [turns[i : i + size] for i in range(0, len(turns), size)] or [[]]
        # Read once, then carried from step to step (the job is the only
        # writer of the cube's segments: exclusive per cube, and every
        # segment write checks its expected version).
        segments = [state for _, state in self._segments(engine, cube).values()]
        members = self._mid_usage(engine, cube)
        totals: dict[str, Any] = {
            "evicted": 0,
            "segments_created": 0,
            "segments_joined": 0,
            "demoted": [],
            "consolidate_job": None,
            "steps": 0,
        }
        for index, batch in enumerate(steps):
            ctx.check_cancelled()
            ctx.progress(index / len(steps), f"{totals['evicted']}/{len(turns)} turns moved")
            totals = self._evict_step(
                ctx,
                cube,
                settings,
                batch,
                segments=segments,
                members=members,
                totals=totals,
                final=index == len(steps) - 1,
            )
        # Exact counts as of this job's read replace on_write's estimate (which
        # skipped the turns written while this job was due; it saw them).
        self._counts[cube] = kept
        return totals

    def _evict_step(
        self,
        ctx: JobContext,
        cube: str,
        settings: TierSettings,
        evicted: list[ShortTurn],
        *,
        segments: list[SegmentState],
        members: _Usage,
        totals: dict[str, Any],
        final: bool,
    ) -> dict[str, Any]:
        """Move ``evicted`` to mid in one write (the job's last: also its success).

        ``segments`` and ``members`` (mid turns' usage) are the state the
        previous step left; both are updated in place to what this step
        wrote: new segments get their ids, written ones their versions,
        demoted ones (and their turns) leave.
        """
        now = ctx.now_us()
        before = {s.key: len(s.turns) for s in segments}
        vectors = self._item_vectors(cube, [(t.id, t.text) for t in evicted])
        ctx.check_cancelled()
        assignment = tiers.assign_segments(
            [(t.id, t.text) for t in evicted],
            vectors,
            segments,
            threshold=settings.segment_threshold,
            now_us=now,
        )
        members.update({t.id: (t.hits, t.last_hit_us) for t in evicted})
        heats = {}
        for segment in segments:
            heat, last, _ = self._heat(segment, members, now, settings)
            heats[segment.key] = (heat, last)
        demote = set(
            tiers.coldest_over_capacity(
                heats,
                settings.mid_capacity,
                sizes={seg.key: sum(t in members for t in seg.turns) for seg in segments},
                max_items=settings.mid_max_items,
            )
        )
        hot = any(h >= settings.promote_heat for k, (h, _) in heats.items() if k not in demote)
        changed = [s for s in segments if len(s.turns) != before.get(s.key)]

        written: dict[str, tuple[str, int]] = {}  # segment key -> (item id, version)

        def plan(p: Planner) -> dict[str, Any]:
            written.clear()  # (the engine may run a plan again)
            ids: dict[str, str] = {}
            for segment in changed:
                meta = {"segment": segment.to_metadata()}
                if segment.key.startswith("new:"):
                    item = p.add(
                        cube,
                        "",
                        form=SEGMENT_FORM,
                        tier=Tier.MID,
                        metadata=meta,
                        operation=Operation.MIGRATE,
                        actor="scheduler",
                    )
                else:
                    item = p.update(
                        cube,
                        segment.key,
                        expected_version=segment.version,
                        metadata=meta,
                        operation=Operation.MIGRATE,
                        actor="scheduler",
                    )
                ids[segment.key] = item.id
                written[segment.key] = (item.id, item.version)
            for turn in evicted:
                current = p.item(cube, turn.id)
                if current.version != turn.version or current.tier != Tier.SHORT:
                    raise Conflict(f"turn {turn.id} changed during eviction", reason="raced")
                p.update(
                    cube,
                    turn.id,
                    expected_version=turn.version,
                    tier=Tier.MID,
                    metadata={**current.metadata, "segment": ids[assignment[turn.id]]},
                    operation=Operation.MIGRATE,
                    actor="scheduler",
                )
            demoted = []
            for segment in segments:
                if segment.key not in demote:
                    continue
                seg_id = ids.get(segment.key, segment.key)
                _demote(p, cube, seg_id, segment, settings.mid_overflow)
                demoted.append(seg_id)
            job_id = None
            if hot:
                job_id = p.submit_job(
                    CONSOLIDATE,
                    cube=cube,
                    args={"heat_at_us": now},
                    dedup_key=f"{CONSOLIDATE}:{cube}",
                    actor="scheduler",
                ).id
            return {
                "evicted": len(evicted),
                "segments_created": sum(1 for k in ids if k.startswith("new:")),
                "segments_joined": sum(1 for k in ids if not k.startswith("new:")),
                "demoted": demoted,
                "consolidate_job": job_id,
            }

        if final:
            step = ctx.commit(plan, result=lambda step: _fold(totals, step))
        else:
            step = ctx.commit_step(plan)
        kept = []
        for segment in segments:
            if segment.key in demote:
                for turn_id in segment.turns:
                    members.pop(turn_id, None)
                continue
            if segment.key in written:
                segment.key, segment.version = written[segment.key]
            kept.append(segment)
        segments[:] = kept
        return _fold(totals, step)

    # --- tiers.consolidate ------------------------------------------------------------------

    def _run_consolidate(self, ctx: JobContext) -> dict[str, Any] | None:
        engine, cube = ctx.engine, _cube_of(ctx)
        settings = self.cube_settings(engine, cube)
        # Heat is judged at the time the evict job found the segment hot, when it
        # queued this job: recency decays by the microsecond, and a segment right
        # at the threshold must not flip between the two decisions.
        now = int(ctx.args.get("heat_at_us", ctx.now_us()))
        hot, members = self._hot_segments(engine, cube, now, settings)
        if not hot:
            return {"segments": [], "added": 0, "reinforced": [], "superseded": []}
        facts = [
            f
            for f in engine.iter_items(cube, tier=Tier.LONG, form="plaintext")
            if f.metadata.get("tier_kind") == "fact"
        ]
        ctx.progress(0.05, f"embedding {len(facts)} known facts")
        fact_vectors = self._item_vectors(cube, [(f.id, f.text) for f in facts])
        existing = [
            tiers.ExistingFact(f.id, f.text, v, tiers.extract_claim(f.text), f.version)
            for f, v in zip(facts, fact_vectors, strict=True)
        ]
        consolidator = self.consolidator_for(settings)
        decisions: list[tuple[str, tiers.FactDecision]] = []
        for index, (_, segment, visits) in enumerate(hot):
            ctx.check_cancelled()
            ctx.progress(0.1 + 0.8 * index / len(hot), f"segment {index + 1}/{len(hot)}")
            done = set(segment.consolidated)
            turns = [
                SourceTurn(t.id, t.version, t.text)
                for t in self._mid_turns(engine, cube, segment.turns, members)
                if t.id not in done
            ]
            drafts: list[FactDraft] = consolidator.consolidate(turns) if turns else []
            vectors = self._draft_vectors(drafts)
            for decision in tiers.decide_facts(
                [(d.text, d.sources) for d in drafts],
                vectors,
                existing,
                duplicate_threshold=settings.fact_duplicate_threshold,
            ):
                decisions.append((segment.key, decision))
            segment.consolidated = [*segment.consolidated, *(t.id for t in turns)]
            segment.visits_base = visits
            segment.length_base = len(segment.turns)
        ctx.check_cancelled()
        if self.before_commit is not None:
            self.before_commit(ctx)

        def plan(p: Planner) -> dict[str, Any]:
            created: dict[str, MemoryItem] = {}
            reinforced: list[str] = []
            superseded: list[list[str]] = []
            for seg_id, d in decisions:
                meta: dict[str, Any] = {"tier_kind": "fact", "segment": seg_id}
                if d.claim is not None:
                    meta["subject"] = d.claim.subject
                    meta["value"] = d.claim.value
                if d.action == "reinforce":
                    if d.target is not None and d.target not in created:
                        reinforced.append(d.target)
                    continue
                old: MemoryItem | None = None
                if d.action == "supersede" and d.target is not None:
                    old = created.get(d.target) or p.item(cube, d.target)
                    if old.status != Status.ACTIVE:
                        old = None
                parents = list(d.sources) + ([old.key] if old is not None else [])
                new = p.add(
                    cube,
                    d.text,
                    tier=Tier.LONG,
                    metadata=meta,
                    parents=parents,
                    operation=Operation.CONSOLIDATE,
                    actor="scheduler",
                    valid_from_us=p.now_us,
                )
                if d.ref is not None:
                    created[d.ref] = new
                if old is not None:
                    p.archive(
                        cube,
                        old.id,
                        actor="scheduler",
                        valid_to_us=p.now_us,
                        extra_parents=[new.key],
                    )
                    superseded.append([old.id, new.id])
            for _, segment, _ in hot:
                p.update(
                    cube,
                    segment.key,
                    expected_version=segment.version,
                    metadata={"segment": segment.to_metadata()},
                    operation=Operation.MIGRATE,
                    actor="scheduler",
                )
            return {
                "segments": [s.key for _, s, _ in hot],
                "added": len(created),
                "reinforced": sorted(set(reinforced)),
                "superseded": superseded,
            }

        result = ctx.commit(plan)
        if result["reinforced"]:
            # Reinforcement is usage (side data, like a search hit), not a new version.
            engine.record_hits(cube, result["reinforced"], now_us=ctx.now_us())
        return result

    @staticmethod
    def _mid_turns(
        engine: Any, cube: str, turn_ids: Sequence[str], members: _Usage
    ) -> list[MemoryItem]:
        """The active mid-tier turns among ``turn_ids`` (``members``: as read before)."""
        out = []
        for turn_id in turn_ids:
            if turn_id not in members:
                continue
            try:
                turn = engine.get(cube, turn_id)
            except NotFound:
                continue  # purged meanwhile
            if turn.status == Status.ACTIVE and turn.tier == Tier.MID and turn.form == "plaintext":
                out.append(turn)
        return out

    # --- tiers.forget ---------------------------------------------------------------------

    def _run_forget(self, ctx: JobContext) -> dict[str, Any] | None:
        engine, cube = ctx.engine, _cube_of(ctx)
        settings = self.cube_settings(engine, cube)
        now = ctx.now_us()
        expire, cold = self._forgettable(engine, cube, now, settings)

        def plan(p: Planner) -> dict[str, Any]:
            expired_ids: list[str] = []
            cold_ids: list[str] = []
            for item, valid_to in [*expire, *((i, now) for i in cold)]:
                current = p.item(cube, item.id)
                if current.version != item.version or current.status != Status.ACTIVE:
                    continue  # changed since we looked: the next pass decides again
                p.archive(cube, item.id, actor="scheduler", valid_to_us=valid_to)
                (expired_ids if item.expires_at_us is not None else cold_ids).append(item.id)
            return {"expired": expired_ids, "decayed": cold_ids}

        return ctx.commit(plan)

    # --- reporting ----------------------------------------------------------------------

    def report(
        self, cube: str, now_us: int, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> dict[str, Any]:
        """Per tier: items by status, active text bytes, heat histogram; and segments."""
        engine = ctx.engine
        s = TierSettings.from_mapping(settings)
        out: dict[str, Any] = {}
        for tier in (Tier.SHORT, Tier.MID, Tier.LONG):
            out[str(tier)] = {
                "items": {str(st): 0 for st in (Status.ACTIVE, Status.ARCHIVED, Status.DELETED)},
                "bytes": 0,
                "heat_histogram": _histogram([]),
            }
        heats: dict[str, list[float]] = {str(t): [] for t in Tier}
        segments = 0
        facts = 0
        members: _Usage = {}
        for item in engine.iter_items(cube, status=None):
            if item.tier == Tier.MID and item.status == Status.ACTIVE:
                members[item.id] = _usage(item)
            facts += (
                item.tier == Tier.LONG
                and item.status == Status.ACTIVE
                and item.metadata.get("tier_kind") == "fact"
            )
            if item.form == SEGMENT_FORM:
                segments += item.status == Status.ACTIVE
                continue
            entry = out[item.tier]
            entry["items"][item.status] = entry["items"].get(item.status, 0) + 1
            if item.status == Status.ACTIVE:
                entry["bytes"] += len(item.text.encode())
                if item.tier != Tier.MID:
                    heats[item.tier].append(
                        tiers.segment_heat(
                            visits=item.usage.hits,
                            length=1,
                            idle_us=now_us - _last_activity(item),
                            settings=s,
                        )
                    )
        for _, segment in self._segments(engine, cube).values():
            heats[Tier.MID].append(self._heat(segment, members, now_us, s)[0])
        for tier_name, values in heats.items():
            out[tier_name]["heat_histogram"] = _histogram(values)
        out[Tier.MID]["segments"] = segments
        out[Tier.LONG]["facts"] = facts
        return out


def _histogram(values: Sequence[float]) -> list[dict[str, Any]]:
    bins = []
    for low, high in zip(_HEAT_BINS, (*_HEAT_BINS[1:], None), strict=True):
        count = sum(1 for v in values if v >= low and (high is None or v < high))
        bins.append({"from": low, "to": high, "count": count})
    return bins


def _cube_of(ctx: JobContext) -> str:
    if ctx.cube is None:
        raise NotFound(f"job {ctx.job.id} names no cube")
    return ctx.cube


def _demote(p: Planner, cube: str, seg_id: str, segment: SegmentState, overflow: str) -> None:
    """Move a cold segment's turns to long (or archive them); archive the segment."""
    for turn_id in segment.turns:
        try:
            turn = p.item(cube, turn_id)
        except NotFound:
            continue  # purged meanwhile
        if turn.status != Status.ACTIVE or turn.tier != Tier.MID:
            continue
        if overflow == "long":
            p.update(cube, turn_id, tier=Tier.LONG, operation=Operation.MIGRATE, actor="scheduler")
        else:
            p.archive(cube, turn_id, actor="scheduler")
    p.archive(cube, seg_id, actor="scheduler")


def make_extractive_consolidator(*, embedder: Embedder, **settings: Any) -> Consolidator:
    """Factory of the ``extractive`` consolidator (``fact_*`` settings apply)."""
    return ExtractiveConsolidator(
        embedder,
        min_words=int(settings.get("fact_min_words", 4)),
        max_facts=int(settings.get("fact_max_per_segment", 20)),
        duplicate_threshold=float(settings.get("fact_duplicate_threshold", 0.9)),
    )


def make_openai_consolidator(*, embedder: Embedder | None = None, **settings: Any) -> Consolidator:
    """Factory of the ``openai`` consolidator (``llm_*`` settings apply)."""
    return OpenAICompatibleConsolidator(
        str(settings.get("llm_endpoint", "")),
        str(settings.get("llm_model", "")),
        api_key_env=str(settings.get("llm_api_key_env", "")),
        timeout_s=float(settings.get("llm_timeout_s", 30.0)),
    )


ConsolidatorFactory = Callable[..., Consolidator]
BUILTIN_CONSOLIDATORS: Final[Mapping[str, ConsolidatorFactory]] = {
    "extractive": make_extractive_consolidator,
    "openai": make_openai_consolidator,
}


def builtin_policies(
    *,
    embedder: Embedder | Callable[[], Embedder] | None = None,
    consolidator: Consolidator | None = None,
) -> list[PlaintextTierPolicy]:
    """The policies memosd ships (registered through the same hook as plugins)."""
    return [PlaintextTierPolicy(embedder, consolidator=consolidator)]
