"""Chained chunk keys and reuse planning (pure logic)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from memosd.kv.chunks import PartialCandidate, chunk_key, chunk_spans, plan_reuse
from memosd.testing import fuzz_examples

FP = "ab" * 32


def test_spans_tile_and_chain() -> None:
    ids = list(range(600))
    spans = chunk_spans(FP, ids, 256)
    assert [(s.start, s.end) for s in spans] == [(0, 256), (256, 512), (512, 600)]
    assert spans[0].parent == ""
    assert spans[1].parent == spans[0].key
    assert spans[2].key == chunk_key(FP, spans[1].key, ids[512:600])


def test_key_depends_on_everything_before() -> None:
    a = chunk_spans(FP, [1] * 10 + [2] * 10, 10)
    b = chunk_spans(FP, [3] * 10 + [2] * 10, 10)
    assert a[1].key != b[1].key  # same tokens in chunk 1, different history
    assert chunk_spans("cd" * 32, [1] * 10, 10)[0].key != a[0].key  # other model


def test_key_is_byte_exact() -> None:
    # Pinned: the key format is part of the stored data.
    key = chunk_key(FP, "", [1, 2, 3])
    assert key == chunk_key(FP, "", (1, 2, 3))
    assert len(key) == 64
    assert chunk_key(FP, "", [1, 2]) != key
    assert chunk_key(FP, "", [258]) != chunk_key(FP, "", [2, 1])


@settings(max_examples=fuzz_examples(60), deadline=None)
@given(
    old=st.lists(st.integers(0, 300), min_size=1, max_size=80),
    extra=st.lists(st.integers(0, 300), min_size=0, max_size=40),
    size=st.integers(1, 17),
)
def test_extension_reuses_full_chunks_and_partial(
    old: list[int], extra: list[int], size: int
) -> None:
    stored = chunk_spans(FP, old, size)
    keys = {s.key for s in stored}
    partials: dict[str, list[PartialCandidate]] = {}
    for s in stored:
        cand = PartialCandidate(s.key, tuple(old[s.start : s.end]))
        partials.setdefault(s.parent, []).append(cand)
    new = old + extra
    plan = plan_reuse(
        FP,
        new,
        has_chunk=keys.__contains__,
        partials_after=lambda p: partials.get(p, []),
        chunk_tokens=size,
    )
    if extra:
        # Everything the old prefix covered is reused (full chunks by key, its
        # partial tail chunk by parent), only the extension is computed.
        assert plan.compute_from == len(old)
    else:
        assert plan.compute_from == len(new)
    assert [s.key for s in plan.reused] == [s.key for s in plan.spans[: len(plan.reused)]]


def test_divergent_prefix_reuses_common_tokens() -> None:
    old = list(range(40))
    new = list(range(25)) + [999] * 15
    stored = chunk_spans(FP, old, 10)
    keys = {s.key for s in stored}
    by_parent = {s.parent: [PartialCandidate(s.key, tuple(old[s.start : s.end]))] for s in stored}
    plan = plan_reuse(FP, new, has_chunk=keys.__contains__, chunk_tokens=10)
    assert plan.compute_from == 20
    assert plan.partial is None
    plan = plan_reuse(
        FP,
        new,
        has_chunk=keys.__contains__,
        partials_after=lambda p: by_parent.get(p, []),
        chunk_tokens=10,
    )
    assert plan.compute_from == 25  # chunk 2's first 5 tokens come from the old chunk 2
    assert plan.partial is not None
    assert plan.partial.key == stored[2].key


def test_lying_candidate_is_ignored() -> None:
    old = list(range(10))
    stored = chunk_spans(FP, old, 10)
    liar = PartialCandidate(stored[0].key, (7, 7, 7))
    plan = plan_reuse(
        FP,
        [7, 7, 7, 7],
        has_chunk=lambda _k: False,
        partials_after=lambda _p: [liar],
        chunk_tokens=10,
    )
    assert plan.compute_from == 0
