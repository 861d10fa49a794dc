"""The decoded-record cache's bounds (its use by readers: test_engine_items)."""

from __future__ import annotations

import threading

import pytest

from memosd.store.decoded import DecodedCache


def test_oldest_entry_goes_first_when_full() -> None:
    cache: DecodedCache[int] = DecodedCache(3)
    for n in range(3):
        cache.put(bytes([n]), n)
    cache.put(b"\x01", 10)  # replacing keeps the size
    assert len(cache) == 3
    cache.put(b"\x09", 9)
    assert cache.get(b"\x00") is None
    assert [cache.get(bytes([n])) for n in (1, 2, 9)] == [10, 2, 9]


def test_capacity_zero_keeps_nothing_and_negative_is_refused() -> None:
    cache: DecodedCache[int] = DecodedCache(0)
    cache.put(b"k", 1)
    assert cache.get(b"k") is None
    with pytest.raises(ValueError, match="capacity"):
        DecodedCache(-1)


def test_concurrent_inserts_stay_within_capacity() -> None:
    cache: DecodedCache[int] = DecodedCache(64)

    def fill(base: int) -> None:
        for n in range(2000):
            cache.put(f"{base}:{n}".encode(), n)

    threads = [threading.Thread(target=fill, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 64


def test_merging_a_usage_record_is_dataclasses_replace() -> None:
    from dataclasses import replace

    from memosd.memcube.model import MemoryItem, Provenance, Usage
    from memosd.store.view import _replace_usage

    item = MemoryItem(
        id="01M80PSCB9NQEF9VE49P0A27P0",
        cube="c",
        version=3,
        form="plaintext",
        tier="mid",
        status="active",
        text="t",
        metadata={"a": 1},
        payload=None,
        created_us=1,
        recorded_us=2,
        valid_from_us=3,
        valid_to_us=None,
        provenance=Provenance("s", "uid:1", "sess", (("01M80PSCB9NQEF9VE49P0A27P0", 2),), "update"),
        usage=Usage(),
        tags=("x",),
        importance=0.5,
        ttl_s=10,
    )
    merged = _replace_usage(item, Usage(4, 5, 0.25))
    assert merged == replace(item, usage=Usage(4, 5, 0.25))
    assert repr(merged) == repr(replace(item, usage=Usage(4, 5, 0.25)))
    assert item.usage == Usage()  # the decoded base is untouched
    assert _replace_usage(item, None) == replace(item, usage=Usage())
    with pytest.raises(AttributeError):
        merged.usage = Usage()  # type: ignore[misc]
