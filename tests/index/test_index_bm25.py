"""BM25 and its tokenizer on a tiny corpus whose scores are computed by hand."""

from __future__ import annotations

import math

import pytest

from memosd.index.bm25 import BM25Index, stem, tokenize


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
