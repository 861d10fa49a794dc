"""The plaintext tier policy end to end, on an injected clock.

A scripted conversation of 200 turns over five simulated days; restatement
and contradiction of facts; forgetting; the mid-tier capacity.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from memosd.embed import HashingEmbedder
from memosd.engine import Engine
from memosd.index import SearchService
from memosd.memcube.model import CubeConfig
from memosd.scheduler.driver import TierScheduler, build_registry
from memosd.scheduler.policies_builtin import SEGMENT_FORM, builtin_policies
from memosd.scheduler.policy import PolicyRegistry
from memosd.scheduler.runner import JobContext, JobRunner

from .conftest import FakeClock  # type: ignore[import-not-found]

HOUR = 3600.0
DAY = 24 * HOUR
ALL = 1_000_000


@dataclass
class Tiered:
    engine: Engine
    clock: FakeClock
    runner: JobRunner
    scheduler: TierScheduler

    def settle(self) -> None:
        """Feed pending change events to the policies and run every due job, until quiet."""
        self.scheduler.settle(timeout=60)

    def items(self, cube: str, **filters: Any) -> list[Any]:
        return self.engine.list_items(cube, limit=ALL, **filters)

    def jobs(self, kind: str) -> list[Any]:
        return self.engine.list_jobs(kind=kind, limit=ALL)


@pytest.fixture
def tiered(tmp_path: Path, clock: FakeClock) -> Iterator[Tiered]:
    with Engine.open(tmp_path / "data", clock=clock) as engine:
        registry = PolicyRegistry(builtin_policies(embedder=HashingEmbedder(512)))
        runner = JobRunner(engine, registry.handlers(), clock=clock, poll_s=0.05)
        scheduler = TierScheduler(engine, registry, runner, clock=clock)
        scheduler.listen()
        runner.start()
        try:
            yield Tiered(engine, clock, runner, scheduler)
        finally:
            runner.close()


def make_cube(t: Tiered, name: str, **settings: Any) -> None:
    # The scripted clock only moves between turns: evict as soon as a write asks.
    settings.setdefault("evict_delay_s", 0.0)
    config = CubeConfig(tier_policy={"policies": ["plaintext"], "plaintext": settings})
    t.engine.create_cube(name, owner="uid:0", config=config)


# --- the scripted conversation ------------------------------------------------------

TOPICS: dict[str, tuple[str, list[str]]] = {
    "garden": (
        "Gardening diary: greenhouse seedlings, mulch, pruning shears, trellis and hedges.",
        [
            "I planted tomatoes near the fence.",
            "The roses need water every morning.",
            "Slugs keep eating my lettuce leaves.",
            "Compost makes the soil much richer.",
            "Sunflowers grew taller than the shed.",
            "Basil thrives on the sunny windowsill.",
        ],
    ),
    "travel": (
        "Travel journal: passports, itineraries, airport lounges, suitcases and visas.",
        [
            "My flight to Lisbon leaves in June.",
            "Hostels near the station were cheap.",
            "The museum pass saved us money.",
            "Trains across Italy run very late.",
            "A ferry ride to Crete took hours.",
            "Packing light avoids baggage fees.",
        ],
    ),
    "cooking": (
        "Kitchen notebook: simmering sauces, spices, cast iron skillets and whisks.",
        [
            "Sourdough bread needs a strong starter.",
            "Curry tastes better the next day.",
            "Fresh pasta dough rests thirty minutes.",
            "Roasted garlic makes soup creamy.",
            "Pancakes burn when the pan overheats.",
            "Lemon zest brightens grilled fish.",
        ],
    ),
    "work": (
        "Office log: spreadsheets, sprint planning, quarterly targets, payroll and invoices.",
        [
            "The quarterly report is due Friday.",
            "Our manager approved the new budget.",
            "Standup meetings start at nine sharp.",
            "The client wants a redesigned dashboard.",
            "Code reviews take most afternoons.",
            "Hiring two engineers is planned soon.",
        ],
    ),
}
NAMES = list(TOPICS)


def script() -> list[tuple[int, str, str]]:
    """200 turns: (day, topic, text).  5 days x 40 turns; topics in blocks of 5."""
    used: Counter[str] = Counter()
    out = []
    for day in range(5):
        for i in range(40):
            topic = NAMES[(i // 5 + day) % 4]
            anchor, facts = TOPICS[topic]
            fact = facts[used[topic] % len(facts)]
            used[topic] += 1
            out.append((day, topic, f"Alice: {anchor} {fact}"))
    return out


def test_scripted_conversation_200_turns_over_5_days(tiered: Tiered) -> None:
    t = tiered
    make_cube(t, "chat")
    topic_of: dict[str, str] = {}
    for day, topic, text in script():
        item = t.engine.add("chat", text, session=f"day{day}")
        topic_of[item.id] = topic
        t.clock.advance(180)  # a turn every 3 minutes
        t.settle()
        if len(topic_of) % 40 == 0:
            t.clock.advance(DAY - 40 * 180)  # next morning
            t.scheduler.tick()
            t.settle()

    turns = [i for i in t.items("chat", status=None) if i.form == "plaintext" and i.id in topic_of]
    by_tier = Counter(i.tier for i in turns)
    # Short: the latest 10 turns of each of the 5 sessions; everything else evicted to mid.
    assert by_tier == {"short": 50, "mid": 150}
    for day in range(5):
        short = [i for i in turns if i.tier == "short" and i.provenance.session == f"day{day}"]
        assert len(short) == 10
        assert {topic_of[i.id] for i in short} == {NAMES[(6 + day) % 4], NAMES[(7 + day) % 4]}

    # Segments: exactly one per topic, each pure (every member turn of its topic).
    segments = t.items("chat", form=SEGMENT_FORM)
    assert len(segments) == 4
    members: dict[str, str] = {}
    for segment in segments:
        ids = segment.metadata["segment"]["turns"]
        assert len({topic_of[i] for i in ids}) == 1
        members.update(dict.fromkeys(ids, segment.id))
    for turn in turns:
        if turn.tier == "mid":
            assert turn.metadata["segment"] == members[turn.id]
            assert turn.provenance.operation == "migrate"
    evicted_per_topic = Counter(topic_of[i] for i in members)
    # Per day the first 30 turns (6 blocks) are evicted: topics (b + day) % 4 for b < 6.
    expected = Counter(NAMES[(b + day) % 4] for day in range(5) for b in range(6) for _ in range(5))
    assert evicted_per_topic == expected
    assert sum(expected.values()) == 150

    # Promotions: a segment is consolidated each time 4 new turns make its heat
    # 4 * beta + gamma * exp(0) = 5.0 (no search hits in this script).
    consolidations = [j for j in t.jobs("tiers.consolidate") if j.result and j.result["segments"]]
    consolidated_turns = sum(len(s.metadata["segment"]["consolidated"]) for s in segments)
    assert consolidated_turns == sum(4 * (n // 4) for n in expected.values())
    assert all(j.state == "succeeded" for j in t.engine.list_jobs(limit=ALL))
    assert len(consolidations) == sum(n // 4 for n in expected.values())

    # Long-term facts: per topic its anchor + its six facts, each once (restatements
    # reinforce), each with provenance pointing at source turns of that topic.
    facts = t.items("chat", tier="long")
    assert len(facts) == 4 * 7
    assert len({f.text for f in facts}) == len(facts)
    for fact in facts:
        assert fact.provenance.operation == "consolidate"
        sources = {topic_of[p_id] for p_id, _ in fact.provenance.parents}
        assert len(sources) == 1
        assert fact.text.split(": ", 1)[1] in " ".join(
            [TOPICS[sources.pop()][0], *TOPICS[topic_of[fact.provenance.parents[0][0]]][1]]
        )
    reinforced = sum(len(j.result["reinforced"]) for j in consolidations)
    assert reinforced > 0

    # The tier report agrees.
    report = t.scheduler.report("chat")["plaintext"]
    assert report["short"]["items"]["active"] == 50
    assert report["mid"]["items"]["active"] == 150
    assert report["mid"]["segments"] == 4
    assert report["long"]["facts"] == 28
    assert sum(b["count"] for b in report["mid"]["heat_histogram"]) == 4


def test_search_hits_heat_a_segment_into_consolidation(tiered: Tiered) -> None:
    t = tiered
    make_cube(t, "hits", short_capacity=1)
    anchor, facts = TOPICS["garden"]
    first = t.engine.add("hits", f"Alice: {anchor} {facts[0]}", session="s")
    t.clock.advance(60)
    t.engine.add("hits", f"Alice: {TOPICS['work'][0]} {TOPICS['work'][1][0]}", session="s")
    t.settle()  # first turn evicted: a segment of length 1, heat 1 + 1 < 5
    assert t.items("hits", tier="long") == []
    t.engine.record_hits("hits", [first.id] * 3)
    t.engine.checkpoint()  # flush usage
    t.clock.advance(HOUR)
    # heat = 3 visits + 1 turn + exp(-1h/24h) = 4.96 < 5: no work, so no job is queued
    assert t.scheduler.tick() == []
    assert t.items("hits", tier="long") == []
    t.engine.record_hits("hits", [first.id])
    t.engine.checkpoint()
    t.clock.advance(600)  # the periodic consolidation interval (300 s) passed
    assert [j.kind for j in t.scheduler.tick()] == ["tiers.consolidate"]
    t.settle()
    long = t.items("hits", tier="long")
    assert {f.text for f in long} == {f"Alice: {anchor}", f"Alice: {facts[0]}"}
    assert all(f.provenance.parents == ((first.id, 2),) for f in long)


# --- restatement and contradiction ------------------------------------------------------


def test_restatement_reinforces_and_contradiction_supersedes(tiered: Tiered) -> None:
    t = tiered
    # Every evicted turn is consolidated at once (heat 1 + 1 >= 1).
    make_cube(t, "me", short_capacity=1, promote_heat=1.0)

    def say(text: str) -> None:
        t.engine.add("me", text, session="s")
        t.clock.advance(60)
        t.settle()

    say("Alice: I live in Berlin with my partner.")
    say("Alice: The weather report promised heavy rain showers.")  # evicts Berlin
    facts = [f for f in t.items("me", tier="long") if f.metadata.get("subject")]
    assert [(f.text, f.metadata["subject"], f.metadata["value"]) for f in facts] == [
        ("Alice: I live in Berlin with my partner.", "alice|lives_in", "berlin")
    ]
    berlin = facts[0]
    before_paris = t.clock()

    # A restatement: reinforced (usage), no new item, no new version.
    say("Alice: I live in Berlin.")
    say("Alice: Sourdough bread needs a strong starter culture.")  # evicts the restatement
    t.engine.checkpoint()  # flush usage
    again = t.engine.get("me", berlin.id)
    assert again.version == 1
    assert again.usage.hits == 1
    assert [f.id for f in t.items("me", tier="long") if f.metadata.get("subject")] == [berlin.id]

    # A contradiction: a new fact, the old one archived with valid_to.
    say("Alice: I live in Paris now.")
    say("Alice: Curry tastes better the next day, honestly.")  # evicts Paris
    current = [f for f in t.items("me", tier="long") if f.metadata.get("subject")]
    assert [(f.text, f.metadata["value"]) for f in current] == [
        ("Alice: I live in Paris now.", "paris")
    ]
    paris = current[0]
    old = t.engine.get("me", berlin.id)
    assert old.status == "archived"
    assert old.valid_to_us is not None
    assert old.valid_to_us >= before_paris
    assert old.provenance.parents == ((berlin.id, 1), (paris.id, 1))
    assert (berlin.id, 1) in paris.provenance.parents
    # "As of" before the move, Berlin was the active fact; history keeps both versions.
    assert t.engine.get("me", berlin.id, as_of_us=before_paris).status == "active"
    assert [v.status for v in t.engine.history("me", berlin.id)] == ["active", "archived"]
    # Provenance of the new fact lists its source turn.
    source_ids = [p for p, _ in paris.provenance.parents if p != berlin.id]
    assert [t.engine.get("me", s).text for s in source_ids] == ["Alice: I live in Paris now."]


# --- forgetting and capacity ---------------------------------------------------------------


def test_forgetting_archives_expired_and_cold_items_never_purges(tiered: Tiered) -> None:
    t = tiered
    make_cube(t, "f", long_cold_days=2.0)
    ttl = t.engine.add("f", "A reminder that expires in an hour.", tier="long", ttl_s=3600)
    cold = t.engine.add("f", "An old long-term fact nobody reads.", tier="long")
    warm = t.engine.add("f", "A long-term fact that search keeps finding.", tier="long")
    t.clock.advance(2 * HOUR)
    job = t.runner.run_now("tiers.forget", "f", timeout=30)
    assert job.result == {"expired": [ttl.id], "decayed": []}
    expired = t.engine.get("f", ttl.id)
    assert expired.status == "archived"
    assert expired.valid_to_us == ttl.expires_at_us
    t.clock.advance(DAY)
    t.engine.record_hits("f", [warm.id], now_us=t.clock())
    t.engine.checkpoint()
    t.clock.advance(DAY + HOUR)
    job = t.runner.run_now("tiers.forget", "f", timeout=30)
    assert job.result == {"expired": [], "decayed": [cold.id]}
    assert t.engine.get("f", cold.id).status == "archived"
    assert t.engine.get("f", warm.id).status == "active"
    assert t.engine.purges("f") == []
    # The periodic pass queues a forget job only when something is due.
    assert t.scheduler.tick() == []
    short_lived = t.engine.add("f", "Gone in a minute.", ttl_s=60)
    t.clock.advance(2 * HOUR)
    assert [j.kind for j in t.scheduler.tick()] == ["tiers.forget"]
    t.settle()
    assert t.engine.get("f", short_lived.id).status == "archived"


def test_mid_capacity_demotes_the_coldest_segment_to_long(tiered: Tiered) -> None:
    t = tiered
    make_cube(t, "cap", short_capacity=1, mid_capacity=2, promote_heat=100.0)
    texts = [f"Alice: {TOPICS[name][0]} {TOPICS[name][1][0]}" for name in NAMES]
    ids = []
    for text in texts:  # 4 topics; the 4th turn stays short
        ids.append(t.engine.add("cap", text, session="s").id)
        t.clock.advance(HOUR)
        t.settle()
    segments = t.items("cap", form=SEGMENT_FORM, status=None)
    assert Counter(s.status for s in segments) == {"active": 2, "archived": 1}
    # The oldest (coldest: same length and visits, least recent) went to long, not away.
    first = t.engine.get("cap", ids[0])
    assert (first.tier, first.status) == ("long", "active")
    assert [t.engine.get("cap", i).tier for i in ids] == ["long", "mid", "mid", "short"]
    demoted = next(s for s in segments if s.status == "archived")
    assert demoted.metadata["segment"]["turns"] == [ids[0]]


def test_unknown_setting_is_rejected_with_a_hint(tiered: Tiered) -> None:
    from memosd.errors import BadRequest

    make_cube(tiered, "bad", short_capacty=3)
    with pytest.raises(BadRequest, match="did you mean 'short_capacity'"):
        tiered.scheduler.report("bad")


def test_tier_run_on_demand(tiered: Tiered) -> None:
    t = tiered
    make_cube(t, "od", short_capacity=2)
    for i in range(5):
        t.engine.add("od", f"Alice: {TOPICS['travel'][0]} {TOPICS['travel'][1][i]}", session="s")
    ran = t.scheduler.run_policy("od", "plaintext", timeout=30)
    assert [j.kind for j in ran] == ["tiers.evict", "tiers.consolidate", "tiers.forget"]
    assert all(j.state == "succeeded" for j in ran)
    assert ran[0].result is not None
    assert ran[0].result["evicted"] == 3
    assert len(t.items("od", tier="short")) == 2


# --- a bulk load: eviction in committed steps -----------------------------------------


def _bulk(t: Tiered, cube: str, n: int) -> list[str]:
    """``n`` turns of one session written in one atomic step (a bulk import)."""

    def plan(p: Any) -> list[str]:
        return [
            p.add(cube, f"Alice: {TOPICS[NAMES[i % 4]][1][i % 5]} (turn {i})", session="s").id
            for i in range(n)
        ]

    ids: list[str] = t.engine.atomic(plan)
    return ids


def _assert_each_moved_turn_in_one_segment(t: Tiered, cube: str, moved: list[str]) -> None:
    members: Counter[str] = Counter()
    for segment in t.items(cube, form=SEGMENT_FORM):
        members.update(segment.metadata["segment"]["turns"])
    assert {i: members[i] for i in moved} == dict.fromkeys(moved, 1)
    for turn_id in moved:
        turn = t.engine.get(cube, turn_id)
        assert turn.tier == "mid"
        assert turn.metadata["segment"] in {s.id for s in t.items(cube, form=SEGMENT_FORM)}


def test_bulk_load_is_evicted_in_bounded_steps(tiered: Tiered) -> None:
    t = tiered
    make_cube(t, "bulk", short_capacity=2, evict_batch=7, promote_heat=1000.0)
    ids = _bulk(t, "bulk", 40)
    t.settle()
    job, *later = t.jobs("tiers.evict")  # later checks found nothing left to do
    assert job.state == "succeeded"
    assert job.result["evicted"] == 38
    assert job.result["steps"] == 6  # ceil(38 / 7) writes, the last one with the success
    assert [j.result["evicted"] for j in later] == [0] * len(later)
    assert [i for i in ids if t.engine.get("bulk", i).tier == "short"] == ids[-2:]
    _assert_each_moved_turn_in_one_segment(t, "bulk", ids[:-2])


def test_failed_step_keeps_earlier_steps_and_the_retry_moves_the_rest(
    tiered: Tiered, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tiered
    make_cube(t, "bulk", short_capacity=2, evict_batch=7, promote_heat=1000.0)
    real = JobContext.commit_step
    calls = []
    ids: list[str] = []
    at_failure: list[list[str]] = []

    def flaky(self: JobContext, fn: Any) -> Any:
        calls.append(fn)
        if len(calls) == 3:
            at_failure.append([i for i in ids if t.engine.get("bulk", i).tier == "mid"])
            raise RuntimeError("injected: the third step fails")
        return real(self, fn)

    monkeypatch.setattr(JobContext, "commit_step", flaky)
    ids.extend(_bulk(t, "bulk", 40))
    t.settle()
    assert at_failure == [ids[:14]]  # the two committed steps, oldest first
    failed = [j for j in t.jobs("tiers.evict") if j.error and "injected" in j.error["message"]]
    assert len(failed) == 1
    t.clock.advance(HOUR)  # past the retry's backoff
    t.settle()
    jobs = t.jobs("tiers.evict")
    assert all(j.state == "succeeded" for j in jobs)
    # Nothing was moved twice: the rest, 24 turns, by the retry or a later job.
    assert sum(j.result["evicted"] for j in jobs) == 24
    assert [i for i in ids if t.engine.get("bulk", i).tier == "short"] == ids[-2:]
    _assert_each_moved_turn_in_one_segment(t, "bulk", ids[:-2])


def test_steps_carry_segments_and_demotions_forward(tiered: Tiered) -> None:
    t = tiered
    make_cube(t, "bulk", short_capacity=2, evict_batch=5, mid_capacity=3, promote_heat=1000.0)
    ids = _bulk(t, "bulk", 60)
    t.settle()
    job = t.jobs("tiers.evict")[0]
    assert (job.state, job.attempts) == ("succeeded", 1)  # no step conflicted with another
    assert (job.result["evicted"], job.result["steps"]) == (58, 12)
    assert job.result["demoted"]  # segments were demoted between steps
    active = t.items("bulk", form=SEGMENT_FORM)
    assert len(active) <= 3
    archived = [s for s in t.items("bulk", form=SEGMENT_FORM, status=None) if s.status != "active"]
    assert {s.id for s in archived} == set(job.result["demoted"])
    members: Counter[str] = Counter()
    for segment in [*active, *archived]:
        members.update(segment.metadata["segment"]["turns"])
    assert {i: members[i] for i in ids[:-2]} == dict.fromkeys(ids[:-2], 1)
    in_archived = {tid for s in archived for tid in s.metadata["segment"]["turns"]}
    for turn_id in ids[:-2]:
        assert t.engine.get("bulk", turn_id).tier == ("long" if turn_id in in_archived else "mid")


class _GatedEmbedder(HashingEmbedder):
    """The index's embedder, held at a gate: an indexer that has not caught up."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.gate = threading.Event()

    def embed(self, texts: Any) -> Any:
        assert self.gate.wait(30)
        return super().embed(texts)


def test_eviction_waits_for_the_index_and_takes_its_vectors(
    tmp_path: Path, clock: FakeClock
) -> None:
    index_embedder = _GatedEmbedder(512)
    job_embedder = HashingEmbedder(512)  # the same model, counted apart
    waiting = threading.Event()
    with Engine.open(tmp_path / "data", clock=clock) as engine:
        svc = SearchService(engine, tmp_path / "data", embedder=index_embedder)
        svc.start()

        def wait(timeout: float) -> bool:
            waiting.set()
            return svc.wait_caught_up(timeout)

        registry = build_registry(
            builtin_policies(embedder=job_embedder),
            vector_lookup=svc.known_vectors,
            index_wait=wait,
        )
        runner = JobRunner(engine, registry.handlers(), clock=clock, poll_s=0.05)
        runner.start()
        try:
            config = svc.cube_config(
                tier_policy={"policies": ["plaintext"], "plaintext": {"short_capacity": 2}}
            )
            engine.create_cube("chat", owner="uid:0", config=config)
            # Turn 3 is indexed with its retrieval context, not its text alone:
            # the index holds no vector of that text, so the job embeds it.
            ids = [
                engine.add(
                    "chat",
                    f"Alice: {TOPICS[NAMES[i % 4]][1][i % 5]}",
                    session="s",
                    metadata={"context": "asked about plants"} if i == 3 else None,
                ).id
                for i in range(20)
            ]
            job = runner.submit("tiers.evict", cube="chat", max_attempts=1)
            assert waiting.wait(30)  # the job waits for the index ...
            # ... briefly in its worker, then deferred: the worker is free.
            deadline = time.monotonic() + 30
            while engine.get_job(job.id).state != "queued" and time.monotonic() < deadline:
                time.sleep(0.01)
            deferred = engine.get_job(job.id)
            assert (deferred.state, deferred.attempts) == ("queued", 0)
            assert "search index" in deferred.message
            assert job_embedder.texts_embedded == 0
            index_embedder.gate.set()  # the index catches up
            clock.advance(1.5)  # and the deferral is over
            runner.wake()
            job = runner.wait(job.id, timeout=30)
            assert (job.state, job.attempts) == ("succeeded", 1)
            assert job.result is not None
            assert job.result["evicted"] == 18
            assert registry.get("plaintext").vectors_reused == 17  # type: ignore[attr-defined]
            assert job_embedder.texts_embedded == 1
            assert all(engine.get("chat", i).tier == "mid" for i in ids[:18])
        finally:
            index_embedder.gate.set()
            runner.close()
            svc.close()


def test_an_eviction_stops_waiting_for_the_index_after_index_wait_s(
    tmp_path: Path, clock: FakeClock
) -> None:
    """An index that never catches up: after index_wait_s the job embeds the turns itself."""
    index_embedder = _GatedEmbedder(512)
    job_embedder = HashingEmbedder(512)
    with Engine.open(tmp_path / "data", clock=clock) as engine:
        svc = SearchService(engine, tmp_path / "data", embedder=index_embedder)
        svc.start()
        registry = build_registry(
            builtin_policies(embedder=job_embedder),
            vector_lookup=svc.known_vectors,
            index_wait=svc.wait_caught_up,
        )
        runner = JobRunner(engine, registry.handlers(), clock=clock, poll_s=0.05)
        runner.start()
        try:
            plain = {"short_capacity": 2, "index_wait_s": 10.0}
            config = svc.cube_config(tier_policy={"policies": ["plaintext"], "plaintext": plain})
            engine.create_cube("chat", owner="uid:0", config=config)
            for i in range(6):
                engine.add("chat", f"Alice: {TOPICS[NAMES[i % 4]][1][i % 5]}", session="s")
            job = runner.submit("tiers.evict", cube="chat", max_attempts=1)

            def until(state: str, *, now: bool) -> None:
                deadline = time.monotonic() + 30
                while (engine.get_job(job.id).state == state) != now:
                    assert time.monotonic() < deadline, f"job never {'' if now else 'left '}{state}"
                    time.sleep(0.01)

            until("running", now=True)
            for _ in range(3):  # deferred again and again while the index is behind
                until("queued", now=True)
                assert engine.get_job(job.id).attempts == 0
                clock.advance(1.5)
                runner.wake()
                until("queued", now=False)
            until("queued", now=True)
            clock.advance(10)  # index_wait_s after the job was queued: no more waiting
            runner.wake()
            job = runner.wait(job.id, timeout=30)
            assert (job.state, job.attempts) == ("succeeded", 1)
            assert job.result is not None
            assert job.result["evicted"] == 4
            assert job_embedder.texts_embedded == 4  # none came from the index
        finally:
            index_embedder.gate.set()
            runner.close()
            svc.close()


def test_an_edit_outside_the_session_keeps_the_turn_in_its_fifo(tiered: Tiered) -> None:
    t = tiered
    make_cube(t, "edit", short_capacity=2, promote_heat=1000.0)
    first = t.engine.add("edit", "Alice: I planted tomatoes near the fence.", session="s")
    second = t.engine.add("edit", "Alice: The roses need water every morning.", session="s")
    t.settle()
    edited = t.engine.update("edit", first.id, metadata={"note": "checked"})  # no session
    assert edited.provenance.session is None
    third = t.engine.add("edit", "Alice: Slugs keep eating my lettuce leaves.", session="s")
    t.settle()
    # The edited turn is still the oldest of session "s": it is the one evicted.
    assert [t.engine.get("edit", i.id).tier for i in (first, second, third)] == [
        "mid",
        "short",
        "short",
    ]
    assert t.scheduler.report("edit")["plaintext"]["short"]["items"]["active"] == 2
