"""Byte budget for activation memory and pluggable eviction policies (pure).

The budget bounds the bytes of chunk blobs referenced by live KV items, over
all cubes (a chunk shared by several caches counts once).  When a build takes
the total over the budget, :meth:`memosd.kv.build.KvStore.enforce_budget`
asks the policy for an eviction order and drops (purges) KV items in that
order until the total fits; the item just built is protected.  A KV item is
derived data: evicting it loses nothing but the compute to rebuild it.

Policies implement :class:`EvictionPolicy` (one method, pure: entries in,
order out), so a plugin can supply its own:

* :class:`LRUPolicy` (default) - least recently used first: last load
  (``usage.last_hit_us``), else the build time.
* :class:`HeatAwarePolicy` - lowest heat first, where heat decays
  exponentially with the time since the last use
  (``score = (hits + 1) * exp(-age / half_life * ln 2)``, or the item's
  ``usage.heat`` when a tier policy maintains one), so a cache loaded often
  an hour ago outlives one loaded once a minute ago.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["EvictionPolicy", "HeatAwarePolicy", "KvEntry", "LRUPolicy"]


@dataclass(frozen=True, slots=True)
class KvEntry:
    """What a policy knows about one KV item."""

    cube: str
    item_id: str
    nbytes: int
    built_us: int
    last_used_us: int | None
    hits: int
    heat: float = 0.0

    @property
    def recency_us(self) -> int:
        return self.last_used_us if self.last_used_us is not None else self.built_us


class EvictionPolicy(Protocol):
    """Orders KV items for eviction: the first entry goes first."""

    def eviction_order(self, entries: Sequence[KvEntry], now_us: int) -> list[KvEntry]: ...


class LRUPolicy:
    """Least recently used (loaded, else built) first."""

    def eviction_order(self, entries: Sequence[KvEntry], now_us: int) -> list[KvEntry]:
        return sorted(entries, key=lambda e: (e.recency_us, e.item_id))


@dataclass(frozen=True, slots=True)
class HeatAwarePolicy:
    """Coldest first; heat = hits decayed by time since last use (see the module doc)."""

    half_life_s: float = 3600.0

    def score(self, entry: KvEntry, now_us: int) -> float:
        if entry.heat > 0.0:
            return entry.heat
        age_s = max(0, now_us - entry.recency_us) / 1e6
        return (entry.hits + 1) * math.exp(-age_s / self.half_life_s * math.log(2))

    def eviction_order(self, entries: Sequence[KvEntry], now_us: int) -> list[KvEntry]:
        return sorted(entries, key=lambda e: (self.score(e, now_us), e.recency_us, e.item_id))
