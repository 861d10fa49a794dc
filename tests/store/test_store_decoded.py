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
