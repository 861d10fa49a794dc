"""Pure tier decisions: FIFO, segments, heat, claims, fact decisions, settings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memosd.embed import HashingEmbedder
from memosd.errors import BadRequest, Conflict, NotFound
from memosd.memcube import versioning
from memosd.memcube.ids import MonotonicIdFactory
from memosd.scheduler import tiers
from memosd.scheduler.policies_builtin import PlaintextTierPolicy, builtin_policies
from memosd.scheduler.policy import PolicyRegistry, policies_for_cube, resolve_settings

_ids = MonotonicIdFactory()


def turn(text: str, session: str | None, at_us: int) -> tiers.ShortTurn:
    item = versioning.new_item(id=_ids(at_us), cube="c", text=text, now_us=at_us, session=session)
    return tiers.ShortTurn.of(item)


def test_fifo_keeps_latest_n_per_session() -> None:
    turns = [turn(f"a{i}", "a", 1000 + i) for i in range(5)]
    turns += [turn(f"b{i}", "b", 2000 + i) for i in range(2)]
    turns += [turn(f"x{i}", None, 3000 + i) for i in range(4)]
    evicted = tiers.fifo_evictions(reversed(turns), 2)
    assert [t.text for t in evicted] == ["a0", "a1", "a2", "x0", "x1"]
    assert tiers.fifo_evictions(turns, 10) == []


def test_fifo_bounds_the_whole_short_tier_oldest_sessions_first() -> None:
    turns = [turn(f"s{s}-{i}", f"s{s}", 1000 * s + i) for s in range(1, 6) for i in range(3)]
    # 5 sessions x 3 turns, 3 per session allowed: only the cube-wide bound cuts.
    evicted = tiers.fifo_evictions(turns, 3, 7)
    assert [t.text for t in evicted] == [f"s{s}-{i}" for s in (1, 2) for i in range(3)] + [
        "s3-0",
        "s3-1",
    ]
    assert tiers.fifo_evictions(turns, 3, 0) == []  # 0: no cube-wide bound
    # Both rules at once: per-session first, then the cube-wide bound.
    got = [t.text for t in tiers.fifo_evictions(turns, 2, 4)]
    assert got == [f"s{s}-{i}" for s in (1, 2, 3) for i in range(3)] + ["s4-0", "s5-0"]


def test_segment_heat_formula_and_defaults() -> None:
    s = tiers.TierSettings()
    assert (s.heat_alpha, s.heat_beta, s.heat_gamma, s.heat_tau_hours) == (1.0, 1.0, 1.0, 24.0)
    assert tiers.segment_heat(visits=0, length=4, idle_us=0, settings=s) == 5.0
    day = tiers.US_PER_DAY
    got = tiers.segment_heat(visits=2, length=3, idle_us=day, settings=s)
    assert got == pytest.approx(2 + 3 + math.exp(-1))
    custom = tiers.TierSettings(heat_alpha=2.0, heat_beta=0.5, heat_gamma=3.0, heat_tau_hours=12)
    got = tiers.segment_heat(visits=1, length=4, idle_us=day, settings=custom)
    assert got == pytest.approx(2 + 2 + 3 * math.exp(-2))


def test_coldest_over_capacity() -> None:
    heats = {"a": (3.0, 10), "b": (1.0, 50), "c": (1.0, 20), "d": (9.0, 0)}
    assert tiers.coldest_over_capacity(heats, 4) == []
    assert tiers.coldest_over_capacity(heats, 2) == ["c", "b"]


def test_coldest_segments_go_until_their_turns_fit() -> None:
    heats = {"a": (3.0, 10), "b": (1.0, 50), "c": (1.0, 20), "d": (9.0, 0)}
    sizes = {"a": 5, "b": 4, "c": 3, "d": 6}
    assert tiers.coldest_over_capacity(heats, 4, sizes=sizes, max_items=18) == []
    assert tiers.coldest_over_capacity(heats, 4, sizes=sizes, max_items=11) == ["c", "b"]
    assert tiers.coldest_over_capacity(heats, 4, sizes=sizes, max_items=6) == ["c", "b", "a"]
    # The segment bound and the turn bound together.
    assert tiers.coldest_over_capacity(heats, 3, sizes=sizes, max_items=15) == ["c"]
    assert tiers.coldest_over_capacity(heats, 3, sizes=sizes, max_items=10) == ["c", "b", "a"]


def test_assign_segments_by_centroid_similarity() -> None:
    embedder = HashingEmbedder(512)
    texts = [
        ("t1", "garden greenhouse seedlings mulch pruning tomatoes"),
        ("t2", "garden greenhouse seedlings mulch pruning roses"),
        ("t3", "passport itinerary airport lounge suitcase visa"),
        ("t4", "garden greenhouse seedlings mulch pruning basil"),
    ]
    vectors = embedder.embed([t for _, t in texts])
    segments: list[tiers.SegmentState] = []
    got = tiers.assign_segments(texts, vectors, segments, threshold=0.6, now_us=5)
    assert got == {"t1": "new:0", "t2": "new:0", "t3": "new:1", "t4": "new:0"}
    assert [s.turns for s in segments] == [["t1", "t2", "t4"], ["t3"]]
    # Round trip through item metadata; an impossible threshold always starts a new one.
    stored = tiers.SegmentState.from_metadata("S1", segments[0].to_metadata(), 3)
    assert np.allclose(stored.centroid, segments[0].centroid)
    got = tiers.assign_segments(texts[:1], vectors[:1], [stored], threshold=1.01, now_us=6)
    assert got == {"t1": "new:0"}


def _assign_pairwise(
    turns: list[tuple[str, str]], vectors: Any, segments: list[tiers.SegmentState], theta: float
) -> dict[str, str]:
    """The definition, one centroid at a time (what the matrix version must equal)."""
    out: dict[str, str] = {}
    created = 0
    for (turn_id, text), vector in zip(turns, vectors, strict=True):
        best, best_score = None, -2.0
        for segment in segments:
            score = float(np.dot(segment.centroid, vector))
            if score > best_score:
                best, best_score = segment, score
        if best is None or best_score < theta or not np.any(vector):
            best = tiers.SegmentState(f"new:{created}", np.zeros_like(vector), summary=text)
            created += 1
            segments.append(best)
        best.vector_sum = (best.vector_sum + vector).astype(np.float32)
        best.turns.append(turn_id)
        out[turn_id] = best.key
    return out


def test_assign_segments_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(40, 32)).astype(np.float32)
    picks = rng.integers(0, 40, size=600)
    vectors = centres[picks] + rng.normal(scale=0.6, size=(600, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[5] = 0.0  # an empty text's vector always starts a segment
    turns = [(f"t{i}", f"text {i}") for i in range(600)]
    for theta in (0.3, 0.6, 0.9):
        fast: list[tiers.SegmentState] = []
        slow: list[tiers.SegmentState] = []
        got = tiers.assign_segments(turns, vectors, fast, threshold=theta, now_us=1)
        assert got == _assign_pairwise(turns, vectors, slow, theta)
        assert [s.turns for s in fast] == [s.turns for s in slow]
        assert 1 < len(fast) < 600  # both joins and new segments happened


@pytest.mark.parametrize(
    ("sentence", "subject", "value"),
    [
        ("I live in Berlin.", "user|lives_in", "berlin"),
        ("Alice: I live in Paris now.", "alice|lives_in", "paris"),
        ("I'm living in New York with my sister.", "user|lives_in", "new york"),
        ("Bob: I moved to Lisbon last spring", "bob|lives_in", "lisbon last spring"),
        ("Caroline lives in Boston.", "caroline|lives_in", "boston"),
        ("I work at Acme Corp.", "user|works_at", "acme corp"),
        ("I work as a nurse.", "user|works_as", "nurse"),
        ("I am 34 years old.", "user|age", "34"),
        ("My name is Dana Scully.", "user|name", "Dana Scully".lower()),
        ("My favourite colour is blue.", "user|my favorite colour", "blue"),
        ("My dog is a beagle.", "user|my dog", "beagle"),
    ],
)
def test_extract_claim(sentence: str, subject: str, value: str) -> None:
    assert tiers.extract_claim(sentence) == tiers.Claim(subject, value)


@pytest.mark.parametrize(
    "sentence",
    ["I don't live in Berlin anymore.", "I no longer work at Acme.", "The weather is nice."],
)
def test_no_claim(sentence: str) -> None:
    assert tiers.extract_claim(sentence) is None


def test_informative_sentences() -> None:
    text = "Alice: Hi there! How are you? I planted tomatoes near the fence. Ok."
    assert tiers.informative_sentences(text, min_words=4) == [
        ("Alice: I planted tomatoes near the fence.", 4.0)
    ]


def _decide(drafts: list[str], existing: list[str]) -> list[tiers.FactDecision]:
    embedder = HashingEmbedder(512)
    known = [
        tiers.ExistingFact(f"F{i}", text, embedder.embed([text])[0], tiers.extract_claim(text))
        for i, text in enumerate(existing)
    ]
    return tiers.decide_facts(
        [(d, [(f"T{i}", 1)]) for i, d in enumerate(drafts)],
        embedder.embed(drafts),
        known,
        duplicate_threshold=0.9,
    )


def test_decide_restatement_contradiction_and_new() -> None:
    got = _decide(
        ["I live in Berlin, near the river.", "I live in Paris.", "Sourdough needs a starter."],
        ["I live in Berlin."],
    )
    assert [(d.action, d.target) for d in got] == [
        ("reinforce", "F0"),
        ("supersede", "F0"),
        ("add", None),
    ]


def test_decide_within_one_batch() -> None:
    got = _decide(["I live in Berlin.", "I live in Berlin.", "I moved to Paris."], [])
    assert [(d.action, d.target, d.ref) for d in got] == [
        ("add", None, "new:0"),
        ("supersede", "new:0", "new:1"),
    ]
    assert got[0].sources == [("T0", 1), ("T1", 1)]  # the restatement merged its source


def test_decide_exact_duplicate_without_claim() -> None:
    got = _decide(["Compost makes the soil richer."], ["compost makes the soil RICHER"])
    assert [(d.action, d.target) for d in got] == [("reinforce", "F0")]


# --- settings and registry --------------------------------------------------------------


def test_every_setting_is_documented_and_typed() -> None:
    defaults = tiers.TierSettings()
    names = [s.name for s in tiers.SETTINGS]
    assert sorted(names) == sorted(defaults.__dataclass_fields__)
    for spec in tiers.SETTINGS:
        assert spec.help
        assert spec.help.endswith((".", ")"))
        assert getattr(defaults, spec.name) == spec.default
        assert type(spec.default) is spec.type
    text = (Path(__file__).parents[2] / "docs" / "scheduler.md").read_text(encoding="utf-8")
    missing = [n for n in names if f"`{n}`" not in text]
    assert missing == []


def test_resolve_settings_checks_types_and_names() -> None:
    policy = PlaintextTierPolicy(HashingEmbedder(8))
    got = resolve_settings(policy, {"short_capacity": 3, "heat_tau_hours": 12})
    assert got["short_capacity"] == 3
    assert got["heat_tau_hours"] == 12.0
    assert got["segment_threshold"] == 0.6
    with pytest.raises(BadRequest, match="must be int"):
        resolve_settings(policy, {"short_capacity": "3"})
    with pytest.raises(BadRequest, match=">= 1"):
        resolve_settings(policy, {"short_capacity": 0})
    with pytest.raises(BadRequest, match="one of"):
        resolve_settings(policy, {"mid_overflow": "delete"})
    with pytest.raises(BadRequest, match="did you mean 'promote_heat'"):
        resolve_settings(policy, {"promote_hot": 1.0})


def test_registry() -> None:
    registry = PolicyRegistry(builtin_policies(embedder=HashingEmbedder(8)))
    assert registry.names() == ["plaintext"]
    assert sorted(registry.handlers()) == ["tiers.consolidate", "tiers.evict", "tiers.forget"]
    with pytest.raises(Conflict):
        registry.register(PlaintextTierPolicy(HashingEmbedder(8)))
    with pytest.raises(NotFound):
        registry.get("nope")
    with pytest.raises(BadRequest):
        registry.register(object())  # type: ignore[arg-type]
    described: list[dict[str, Any]] = registry.describe()
    assert described[0]["settings"][0] == {
        "name": "short_capacity",
        "default": 10,
        "type": "int",
        "help": "Turns per session kept in the short tier (FIFO).",
    }
    assert policies_for_cube({}, ["plaintext"]) == ["plaintext"]
    assert policies_for_cube({"policies": []}, ["plaintext"]) == []


def test_item_vectors_take_what_the_index_holds_and_embed_the_rest() -> None:
    embedder = HashingEmbedder(64)
    policy = PlaintextTierPolicy(embedder)
    stored = embedder.embed(["indexed text"])[0]
    asked: list[Any] = []

    def lookup(cube: str, entries: Any) -> dict[str, Any]:
        asked.append((cube, list(entries)))
        return {"a": stored}

    policy.use_vector_lookup(lookup)
    before = embedder.texts_embedded
    got = policy._item_vectors("c", [("b", "fresh text"), ("a", "indexed text")])
    assert asked == [("c", [("b", "fresh text"), ("a", "indexed text")])]
    assert embedder.texts_embedded - before == 1  # only "b"
    assert np.allclose(got[0], embedder.embed(["fresh text"])[0])
    assert np.allclose(got[1], stored)
    assert policy.vectors_reused == 1
