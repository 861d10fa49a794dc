"""Reciprocal rank fusion and boosts on known inputs."""

from __future__ import annotations

import pytest

from memosd.index.fusion import Boosts, boost_components, reciprocal_rank_fusion, score_fusion


def test_rrf_known_rankings() -> None:
    fused = reciprocal_rank_fusion({"dense": ["a", "b", "c"], "lexical": ["c", "a", "d"]}, rrf_k=60)
    scores = {key: score for key, score, _ in fused}
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["b"] == pytest.approx(1 / 62)
    assert scores["d"] == pytest.approx(1 / 63)
    assert [key for key, _, _ in fused] == ["a", "c", "b", "d"]
    assert fused[0][2] == {"dense": 1, "lexical": 2}


def test_rrf_weights_and_ties() -> None:
    fused = reciprocal_rank_fusion(
        {"dense": ["x", "y"], "lexical": ["y", "x"]}, rrf_k=0, weights={"dense": 2.0}
    )
    assert [key for key, _, _ in fused] == ["x", "y"]
    # Equal scores: the better single rank wins, then first appearance.
    tied = reciprocal_rank_fusion({"a": ["p", "q"], "b": ["q", "p"]})
    assert [key for key, _, _ in tied] == ["p", "q"]
    assert reciprocal_rank_fusion({"a": ["z", "z"]})[0][1] == pytest.approx(1 / 61)


def test_boosts() -> None:
    day = 24 * 3600 * 1_000_000
    boosts = Boosts(recency=1.0, recency_half_life_s=24 * 3600, heat=0.5, importance=0.2)
    got = boost_components(boosts, now_us=10 * day, time_us=9 * day, heat=5.0, importance=1.0)
    assert got == pytest.approx({"recency": 0.5, "heat": 0.25, "importance": 0.2})
    assert boost_components(Boosts(), now_us=0, time_us=0, heat=1, importance=1) == {}
    assert not Boosts().active


def test_score_fusion_scales_each_list() -> None:
    fused = score_fusion(
        {"dense": [("a", 0.9), ("b", 0.5), ("c", 0.1)], "lexical": [("c", 8.0), ("b", 2.0)]},
        weights={"dense": 0.5, "lexical": 0.5},
        scaling={"lexical": "max"},
    )
    scores = {key: score for key, score, _ in fused}
    assert scores["a"] == pytest.approx(0.5 * 1.0)
    assert scores["b"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)
    assert scores["c"] == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    assert [key for key, _, _ in fused] == ["a", "c", "b"]
    assert fused[1][2] == {"dense": 0.0, "lexical": 1.0}
    assert score_fusion({"dense": [("x", 0.3)], "lexical": []})[0][1] == 1.0
