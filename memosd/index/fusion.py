"""Rank fusion and score boosts (pure functions).

Two fusions of named, scored candidate lists:

*Score fusion* (the default, :func:`score_fusion`): each list's scores are
scaled to [0, 1] - min-max over the list for cosine similarities (their
floor is arbitrary), divided by the list's maximum for BM25 (0 is a natural
floor) - and summed with weights; an item missing from a list gets 0 there.
On LoCoMo it beat RRF clearly (turn recall@10 0.65 vs 0.54 with the same
lists): RRF throws away how *much* better the lexical top hit is, which
matters when one retriever is much stronger than the other.

Reciprocal rank fusion (Cormack et al., 2009) combines ranked lists without
calibrating their scores against each other::

    rrf(d) = sum over lists L containing d of  weight(L) / (rrf_k + rank_L(d))

with ranks starting at 1.  Boosts then scale the fused score by
``1 + sum(boost_i)``, each boost in ``[0, weight_i]``:

* recency    ``weight * 0.5 ** (age / half_life)`` where age is now minus the
  item's world time (``valid_from_us``) or, failing that, its ``recorded_us``;
* heat       ``weight * heat / (heat + heat_scale)`` (saturating);
* importance ``weight * importance`` (importance is in [0, 1]).

A boost never turns a poor match into a top hit on its own: it multiplies.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "Boosts",
    "boost_components",
    "fuse_scores",
    "reciprocal_rank_fusion",
    "score_fusion",
]

K = TypeVar("K", bound=Hashable)


def reciprocal_rank_fusion(
    rankings: Mapping[str, Sequence[K]],
    *,
    rrf_k: float = 60.0,
    weights: Mapping[str, float] | None = None,
) -> list[tuple[K, float, dict[str, int]]]:
    """Fuse named rankings (best first) into ``(key, score, {name: rank})``, best first.

    Ties are broken by the best single rank, then by first appearance, so the
    output is deterministic.
    """
    scores: dict[K, float] = {}
    ranks: dict[K, dict[str, int]] = {}
    order: dict[K, int] = {}
    for name, ranking in rankings.items():
        weight = 1.0 if weights is None else weights.get(name, 1.0)
        for position, key in enumerate(ranking, start=1):
            if key in ranks and name in ranks[key]:
                continue  # a duplicate within one list counts once, at its best rank
            scores[key] = scores.get(key, 0.0) + weight / (rrf_k + position)
            ranks.setdefault(key, {})[name] = position
            order.setdefault(key, len(order))
    keyed = sorted(scores, key=lambda key: (-scores[key], min(ranks[key].values()), order[key]))
    return [(key, scores[key], ranks[key]) for key in keyed]


def score_fusion(
    lists: Mapping[str, Sequence[tuple[K, float]]],
    *,
    weights: Mapping[str, float] | None = None,
    scaling: Mapping[str, str] | None = None,
) -> list[tuple[K, float, dict[str, float]]]:
    """Weighted sum of per-list scaled scores: ``(key, score, {name: scaled})``, best first.

    ``scaling[name]`` is ``"minmax"`` (the default) or ``"max"``.  Lists are
    ``(key, score)`` best first.  Ties keep first appearance.
    """
    ranking, scaled = fuse_scores(lists, weights=weights, scaling=scaling)
    return [
        (key, score, {name: values[key] for name, values in scaled.items() if key in values})
        for key, score in ranking
    ]


def fuse_scores(
    lists: Mapping[str, Sequence[tuple[K, float]]],
    *,
    weights: Mapping[str, float] | None = None,
    scaling: Mapping[str, str] | None = None,
) -> tuple[list[tuple[K, float]], dict[str, dict[K, float]]]:
    """:func:`score_fusion` without a parts dict per key (the search hot path).

    Returns the ``(key, score)`` ranking, best first, and each non-empty list's
    scaled scores by key (a key listed twice in one list counts once, at its
    first - best - entry).
    """
    totals: dict[K, float] = {}
    scaled_by: dict[str, dict[K, float]] = {}
    for name, entries in lists.items():
        if not entries:
            continue
        weight = 1.0 if weights is None else weights.get(name, 1.0)
        values = [score for _, score in entries]
        hi = max(values)
        lo = 0.0 if (scaling or {}).get(name, "minmax") == "max" else min(values)
        span = hi - lo
        scaled: dict[K, float] = {}
        for key, score in entries:
            if key not in scaled:
                scaled[key] = (score - lo) / span if span > 0 else 1.0
        scaled_by[name] = scaled
        get = totals.get
        for key, value in scaled.items():
            totals[key] = get(key, 0.0) + weight * value
    # reverse=True keeps a stable sort stable: ties stay in first-appearance order.
    keyed = sorted(totals, key=totals.__getitem__, reverse=True)
    return [(key, totals[key]) for key in keyed], scaled_by


@dataclass(frozen=True, slots=True)
class Boosts:
    """Optional multiplicative boosts; every weight 0 (off) by default.

    ``now_us`` pins "now" for recency (tests, reproducible benchmarks); None
    means the wall clock at search time.
    """

    recency: float = 0.0
    recency_half_life_s: float = 30 * 24 * 3600.0
    heat: float = 0.0
    heat_scale: float = 5.0
    importance: float = 0.0
    now_us: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.recency or self.heat or self.importance)


def boost_components(
    boosts: Boosts,
    *,
    now_us: int,
    time_us: int,
    heat: float,
    importance: float,
) -> dict[str, float]:
    """Each active boost's value for one item (the fused score is scaled by 1 + their sum)."""
    out: dict[str, float] = {}
    if boosts.recency:
        age_s = max(0.0, (now_us - time_us) / 1e6)
        half_life = max(boosts.recency_half_life_s, 1e-9)
        out["recency"] = boosts.recency * 0.5 ** (age_s / half_life)
    if boosts.heat:
        h = max(0.0, heat)
        out["heat"] = boosts.heat * h / (h + boosts.heat_scale) if h else 0.0
    if boosts.importance:
        out["importance"] = boosts.importance * min(1.0, max(0.0, importance))
    return out
