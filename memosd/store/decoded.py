"""Decoded records kept by their bytes (pure: no LMDB, no I/O).

A stored version record never changes, and decoding is a pure function of
its bytes, so a decoded :class:`MemoryItem` can be reused whenever the same
key still holds the same bytes.  Readers fetch the bytes from LMDB as usual
(a lookup costs ~2 us) and compare them with the cached copy (a memcmp), so a
purged, rewritten or re-imported record can never be served stale: only the
decode (~25 us) and the usage merge (~10 us) are skipped.

Items and cubes are immutable values; their ``metadata``/``payload`` (and a
cube's config) dicts are shared between readers and must not be mutated.
"""

from __future__ import annotations

import threading
from typing import Generic, NamedTuple, TypeVar

from memosd.memcube.model import MemCube, MemoryItem

__all__ = ["DecodedCache", "DecodedItem", "StoreCaches"]

V = TypeVar("V")


class DecodedItem(NamedTuple):
    """A version record, its decoded item, and that item merged with one usage record."""

    record: bytes
    base: MemoryItem
    usage_record: bytes | None
    item: MemoryItem


class DecodedCache(Generic[V]):
    """A bounded map from a key to a value decoded from that key's bytes.

    Thread-safe: lookups are single dict reads; inserts and evictions (oldest
    first) take a lock.  Callers check that the entry's bytes still match.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._entries: dict[bytes, V] = {}
        self._lock = threading.Lock()

    def get(self, key: bytes) -> V | None:
        return self._entries.get(key)

    def put(self, key: bytes, value: V) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            entries = self._entries
            if key not in entries and len(entries) >= self.capacity:
                del entries[next(iter(entries))]
            entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)


class StoreCaches:
    """The decoded-record caches one engine's views share."""

    def __init__(self, items: int = 8192, cubes: int = 1024) -> None:
        self.items: DecodedCache[DecodedItem] = DecodedCache(items)
        self.cubes: DecodedCache[tuple[bytes, MemCube]] = DecodedCache(cubes)
