"""Filters over item headers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memosd.errors import BadRequest
from memosd.index.filters import SearchFilters, matches, needs_history, validate_filters
from memosd.memcube.model import MemoryItem, Provenance, Usage


def _item(**changes: object) -> MemoryItem:
    base = MemoryItem(
        id="01ARZ3NDEKTSV4RRFFQ69G5FAV",
        cube="c",
        version=1,
        form="plaintext",
        tier="short",
        status="active",
        text="x",
        metadata={},
        payload=None,
        created_us=100,
        recorded_us=200,
        valid_from_us=1000,
        valid_to_us=2000,
        provenance=Provenance(None, None, "s1", (), "add"),
        usage=Usage(),
        tags=("a", "b"),
        importance=0.5,
        ttl_s=None,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_each_filter() -> None:
    item = _item()
    assert matches(item, None)
    assert matches(item, SearchFilters())
    assert not matches(_item(status="archived"), SearchFilters())
    assert matches(_item(status="archived"), SearchFilters(status=None))
    assert matches(item, SearchFilters(tiers=("short", "long")))
    assert not matches(item, SearchFilters(tiers=("long",)))
    assert not matches(item, SearchFilters(forms=("activation",)))
    assert matches(item, SearchFilters(tags=("a", "b")))
    assert not matches(item, SearchFilters(tags=("a", "z")))
    assert matches(item, SearchFilters(any_tags=("z", "b")))
    assert not matches(item, SearchFilters(any_tags=("z",)))
    assert matches(item, SearchFilters(sessions=("s1",)))
    assert not matches(item, SearchFilters(sessions=("s2",)))


def test_time_ranges() -> None:
    item = _item()
    assert matches(item, SearchFilters(time_from_us=200, time_to_us=200))
    assert not matches(item, SearchFilters(time_from_us=201))
    assert matches(item, SearchFilters(time_to_us=150, time_field="created"))
    # World time: [1000, 2000) overlaps the range.
    valid = SearchFilters(time_field="valid", time_from_us=1999)
    assert matches(item, valid)
    assert not matches(item, replace(valid, time_from_us=2000))
    assert not matches(item, SearchFilters(time_field="valid", time_to_us=999))
    open_ended = _item(valid_from_us=None, valid_to_us=None)
    assert matches(open_ended, SearchFilters(time_field="valid", time_from_us=5, time_to_us=6))


def test_validation_and_history() -> None:
    with pytest.raises(BadRequest):
        validate_filters(SearchFilters(tiers=("huge",)))
    with pytest.raises(BadRequest):
        validate_filters(SearchFilters(time_field="when"))
    with pytest.raises(BadRequest):
        validate_filters(SearchFilters(time_from_us=5, time_to_us=4))
    assert not needs_history(None)
    assert not needs_history(SearchFilters(tags=("a",)))
    assert needs_history(SearchFilters(as_of_us=5))
    assert needs_history(SearchFilters(status="archived"))
