"""BM25 and its tokenizer on a tiny corpus whose scores are computed by hand."""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgpack
import pytest

from memosd.index import bm25
from memosd.index.bm25 import BM25Index, stem, tokenize
from memosd.index.cube import CubeIndex
from memosd.index.snapshot import write_snapshot

_SNAPSHOT_ARGS: dict[str, Any] = {"lsn": 1, "model": "none", "dim": 0}


def test_tokenizer_lowercases_drops_stop_words_and_stems() -> None:
    assert tokenize("I'm painting the Sunrises, and she PAINTED it!") == [
        "paint",
        "sunrise",
        "paint",
    ]
    assert tokenize("Größe café") == ["größe", "café"]
    assert [stem(w) for w in ("stories", "class", "boxes", "walked", "sing")] == [
        "story",
        "class",
        "box",
        "walk",
        "sing",
    ]


def _idf(n: int, df: int) -> float:
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def test_scores_match_the_formula() -> None:
    index = BM25Index(k1=1.2, b=0.75)
    index.add(1, "berlin berlin city")
    index.add(2, "paris city")
    index.add(3, "rome")
    # Lengths after tokenizing: 3, 2, 1 -> avgdl 2.
    avgdl = 2.0

    def term(tf: int, length: int, df: int) -> float:
        norm = 1.2 * (1 - 0.75 + 0.75 * length / avgdl)
        return _idf(3, df) * tf * 2.2 / (tf + norm)

    scores = index.scores(tokenize("berlin city"))
    assert scores[1] == pytest.approx(term(2, 3, 1) + term(1, 3, 2))
    assert scores[2] == pytest.approx(term(1, 2, 2))
    assert 3 not in scores
    assert [label for label, _ in index.search("berlin city", 5)] == [1, 2]


def test_incremental_add_remove_equals_fresh_build() -> None:
    index = BM25Index()
    index.add(1, "alpha beta")
    index.add(2, "beta gamma")
    index.add(3, "gamma delta")
    index.remove(2)
    index.add(1, "alpha alpha epsilon")  # replaces label 1
    fresh = BM25Index()
    fresh.add(1, "alpha alpha epsilon")
    fresh.add(3, "gamma delta")
    for query in ("alpha", "gamma", "beta", "epsilon delta"):
        assert index.search(query, 10) == fresh.search(query, 10)
    assert not index.remove(2)
    assert index.search("beta", 10) == []
    assert len(index) == 2


def test_state_round_trip() -> None:
    index = BM25Index(k1=1.5, b=0.5)
    for label, text in enumerate(["one two", "two three", "three four four"]):
        index.add(label, text)
    copy = BM25Index.from_state(index.to_state())
    assert (copy.k1, copy.b, len(copy)) == (1.5, 0.5, 3)
    assert copy.search("four two", 3) == index.search("four two", 3)


# --- the vectorised scorer against a plain-Python reference on random corpora -----------

_VOCAB = [f"w{i}" for i in range(40)] + ["common"] * 20  # "common": in most documents


def _reference(
    docs: dict[int, list[str]], query: list[str], k1: float, b: float
) -> dict[int, float]:
    """BM25 by the module docstring's formula, in float64, straight from the documents."""
    n = len(docs)
    avgdl = sum(len(t) for t in docs.values()) / n
    counts = {label: Counter(terms) for label, terms in docs.items()}
    out: dict[int, float] = {}
    for term in dict.fromkeys(query):
        df = sum(1 for c in counts.values() if term in c)
        if not df:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for label, c in counts.items():
            tf = c.get(term, 0)
            if tf:
                norm = k1 * (1 - b + b * len(docs[label]) / avgdl)
                out[label] = out.get(label, 0.0) + idf * tf * (k1 + 1) / (tf + norm)
    return out


def _check_search(index: BM25Index, docs: dict[int, list[str]], query: list[str], k: int) -> None:
    ref = _reference(docs, query, index.k1, index.b)
    got = index.search(query, k)
    best = sorted(ref.values(), reverse=True)[:k]
    assert len(got) == len(best)
    for rank, (label, score) in enumerate(got):
        assert score == pytest.approx(ref[label], rel=1e-5)
        # The label at each rank has the reference's score at that rank (ties aside).
        assert ref[label] == pytest.approx(best[rank], rel=1e-5)
    # Best first, ties by label.
    assert all((a[1] > b[1]) or (a[1] == b[1] and a[0] < b[0]) for a, b in pairwise(got))
    assert index.scores(query) == pytest.approx(ref, rel=1e-5)


def _random_doc(rng: random.Random) -> list[str]:
    return [rng.choice(_VOCAB) for _ in range(rng.randint(1, 15))]


@pytest.mark.parametrize("seed", range(6))
def test_random_corpora_rank_as_the_formula(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small sampling thresholds so the sampled top-k path runs on a small corpus too.
    if seed % 2:
        monkeypatch.setattr(bm25, "_SAMPLED_TOP", 64)
        monkeypatch.setattr(bm25, "_SAMPLE", 16)
    rng = random.Random(seed)
    index = BM25Index(k1=1.2, b=0.75)
    docs: dict[int, list[str]] = {}
    for label in range(1, 400):
        docs[label] = _random_doc(rng)
        index.add_terms(label, Counter(docs[label]))
    for _ in range(30):
        query = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 4))] + ["absent"]
        _check_search(index, docs, query, rng.choice([1, 5, 10, 100, 1000]))


@pytest.mark.parametrize("seed", range(4))
def test_stays_in_step_with_adds_updates_deletes_and_reload(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Searches interleaved with writes (cached posting arrays get appended to, dropped,
    slots reused) give the formula's ranking at every step, and so does a reload."""
    monkeypatch.setattr(bm25, "_SAMPLED_TOP", 64)
    monkeypatch.setattr(bm25, "_SAMPLE", 16)
    rng = random.Random(100 + seed)
    index = BM25Index(k1=1.5, b=0.6)
    docs: dict[int, list[str]] = {}
    next_label = 1
    for step in range(600):
        op = rng.random()
        if op < 0.55 or not docs:
            docs[next_label] = _random_doc(rng)
            index.add_terms(next_label, Counter(docs[next_label]))
            next_label += 1
        elif op < 0.75:  # update in place (same label, new text)
            label = rng.choice(list(docs))
            docs[label] = _random_doc(rng)
            index.add(label, " ".join(docs[label]))
        else:
            label = rng.choice(list(docs))
            del docs[label]
            assert index.remove(label)
        if step % 7 == 0 and docs:
            query = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 3))]
            _check_search(index, docs, query, rng.choice([3, 10, 50]))
    assert len(index) == len(docs)
    copy = BM25Index.from_state(index.to_state())
    for _ in range(20):
        query = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 3))]
        _check_search(copy, docs, query, 10)
        assert copy.search(query, 10) == index.search(query, 10)


# --- the packed layout: merges, compactions, out-of-order labels, states ---------------


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_packed_layout_merges_and_compactions_keep_the_formula(
    seed: int, deferred: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tiny merge/compaction thresholds every write path folds the tail into the
    packed arrays or renumbers slots often; rankings, idf and membership stay exact,
    and a msgpack round trip of the state (mid-tail) reloads the same index.

    ``deferred``: the owner maintains the index (prepare aside, install later, as
    CubeIndex does outside its lock); a layout prepared before another write is
    refused as stale."""
    monkeypatch.setattr(bm25, "_SAMPLED_TOP", 64)
    monkeypatch.setattr(bm25, "_SAMPLE", 16)
    monkeypatch.setattr(bm25, "_MERGE_MIN", 5 + seed * 7)
    monkeypatch.setattr(bm25, "_MERGE_DIVISOR", 2)
    monkeypatch.setattr(bm25, "_COMPACT_MIN", 3 + seed)
    rng = random.Random(500 + seed)
    index = BM25Index(k1=1.2, b=0.75, auto_maintain=not deferred)
    docs: dict[int, list[str]] = {}
    next_label = 1
    held = None  # a prepared layout kept across one write: must be refused
    installed = stale = 0
    for step in range(700):
        if deferred:
            if held is not None:
                assert not index.install(held)
                stale += 1
                held = None
            prepared = index.prepare_maintenance()
            if prepared is not None and rng.random() < 0.2:
                held = prepared
            elif prepared is not None:
                _check_search(index, docs, [rng.choice(_VOCAB)], 10)  # reads meanwhile
                assert index.install(prepared)
                installed += 1
        op = rng.random()
        if op < 0.5 or not docs:
            label = next_label if rng.random() < 0.9 else rng.randint(-50, next_label + 50)
            next_label += 1
            docs[label] = _random_doc(rng)
            index.add_terms(label, Counter(docs[label]))
        elif op < 0.7:  # in-place update (an out-of-order label for the slot arrays)
            label = rng.choice(list(docs))
            docs[label] = _random_doc(rng)
            index.add(label, " ".join(docs[label]))
        else:
            label = rng.choice(list(docs))
            del docs[label]
            assert index.remove(label)
            assert label not in index
            assert not index.remove(label)
        if step % 5 == 0 and docs:
            query = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 3))]
            _check_search(index, docs, query, rng.choice([3, 10, 50]))
            term = rng.choice(_VOCAB)
            df = sum(1 for terms in docs.values() if term in terms)
            assert index.idf(term) == pytest.approx(_idf(len(docs), df))
        if step % 97 == 0:
            state = msgpack.unpackb(
                msgpack.packb(index.to_state(), use_bin_type=True),
                raw=False,
                strict_map_key=False,
            )
            index = BM25Index.from_state(state)
            index.auto_maintain = not deferred
            held = None  # built for the index just replaced
    assert len(index) == len(docs)
    assert all(label in index for label in docs)
    if deferred:
        assert installed > 10
        assert stale > 0


def test_reads_the_per_document_state_of_earlier_releases() -> None:
    docs = {3: ["alpha", "beta", "beta"], 1: ["beta", "gamma"], 7: ["delta"]}
    old_state = {
        "k1": 1.2,
        "b": 0.75,
        "labels": list(docs),
        "terms": [list(Counter(terms).items()) for terms in docs.values()],
    }
    index = BM25Index.from_state(old_state)
    assert len(index) == 3
    for query in (["beta"], ["alpha", "gamma"], ["delta", "beta"]):
        _check_search(index, docs, query, 10)
    assert index.to_state()["format"] == bm25.STATE_FORMAT


def test_rejects_an_inconsistent_state() -> None:
    index = BM25Index()
    index.add(1, "alpha beta")
    state = index.to_state()
    state["slots"] = state["slots"][:-4]
    with pytest.raises(ValueError, match="disagree"):
        BM25Index.from_state(state)
    with pytest.raises(ValueError, match="format"):
        BM25Index.from_state({**index.to_state(), "format": 99})


@pytest.mark.parametrize("via", ["upsert", "snapshot"])
def test_cube_builds_bm25_merges_without_holding_its_lock(
    via: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A merge (or compaction) of a large cube takes up to ~1 s: searches of the cube
    must go on while it is built, and see the new layout once it is swapped in."""
    # The upsert merges its own 12 tail postings; a snapshot folds in a tail below that.
    monkeypatch.setattr(bm25, "_MERGE_MIN", 8 if via == "upsert" else 100)
    monkeypatch.setattr(bm25, "_MERGE_DIVISOR", 1)
    cube = CubeIndex("notes", dense=None)
    building, release = threading.Event(), threading.Event()
    original = cube.bm25.prepare_maintenance

    def slow_prepare(**kwargs: bool) -> Any:
        prepared = original(**kwargs)
        if prepared is not None:
            building.set()
            assert release.wait(10)
        return prepared

    monkeypatch.setattr(cube.bm25, "prepare_maintenance", slow_prepare)
    entries = [(f"id{i}", 1, f"alpha beta gamma word{i}") for i in range(3)]
    if via == "snapshot":
        cube.upsert_many(entries, None)  # below the merge threshold: the tail stays
        assert cube.bm25._tail_tids
        writer = threading.Thread(
            target=write_snapshot, args=(tmp_path, {"notes": cube}), kwargs=_SNAPSHOT_ARGS
        )
    else:
        writer = threading.Thread(target=cube.upsert_many, args=(entries, None))
    writer.start()
    assert building.wait(10)
    # The writer is inside the build: a search that must not wait gets its answer.
    found = cube.search_lexical(["alpha"], 10, blocking=False)
    assert sorted(item_id for item_id, _ in found) == ["id0", "id1", "id2"]
    release.set()
    writer.join(10)
    assert not cube.bm25._tail_tids  # merged and swapped in
    assert sorted(i for i, _ in cube.search_lexical(["word1"], 10)) == ["id1"]
