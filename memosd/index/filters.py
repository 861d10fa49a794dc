"""Search filters over item headers (pure).

A :class:`SearchFilters` is a conjunction: an item passes when every set field
matches.  Fields left ``None`` (or empty) do not filter.

* ``tiers``, ``forms``, ``sessions``: the item's value is one of these.
* ``tags``: the item carries every one of these tags; ``any_tags``: at least one.
* ``time_from_us`` / ``time_to_us``: an inclusive range over ``time_field``:
  ``"recorded"`` (system time of the version), ``"created"`` (system time of
  version 1) or ``"valid"`` (world time: the item's validity interval
  ``[valid_from_us, valid_to_us)`` overlaps the range; open ends are unbounded).
* ``status``: ``"active"`` (the default) or ``"archived"``/``"deleted"``; ``None`` means any.
* ``as_of_us``: search the state of each item at that system time (the version
  current then) instead of the latest version.

The live indexes hold only the latest active version of each item.  Filters
for which :func:`needs_history` is true (``as_of_us`` set, or a status other
than active) are served by a scan of the engine instead (see
:mod:`memosd.index.service`): correct, linear in the cube size, meant for
audits and time travel rather than hot paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from memosd.errors import BadRequest
from memosd.memcube.model import STATUSES, TIERS, MemoryItem

__all__ = ["TIME_FIELDS", "SearchFilters", "matches", "needs_history", "validate_filters"]

TIME_FIELDS: Final = ("recorded", "created", "valid")


@dataclass(frozen=True, slots=True)
class SearchFilters:
    tiers: tuple[str, ...] | None = None
    forms: tuple[str, ...] | None = None
    tags: tuple[str, ...] = ()
    any_tags: tuple[str, ...] = ()
    sessions: tuple[str, ...] | None = None
    time_from_us: int | None = None
    time_to_us: int | None = None
    time_field: str = "recorded"
    status: str | None = "active"
    as_of_us: int | None = None

    @property
    def restrictive(self) -> bool:
        """True if some item of the live index could be filtered out."""
        return bool(
            self.tiers is not None
            or self.forms is not None
            or self.tags
            or self.any_tags
            or self.sessions is not None
            or self.time_from_us is not None
            or self.time_to_us is not None
        )


def validate_filters(filters: SearchFilters) -> SearchFilters:
    """``filters`` itself, or BadRequest naming the bad field."""
    if filters.tiers is not None:
        for tier in filters.tiers:
            if tier not in TIERS:
                raise BadRequest(f"filter tier must be one of {sorted(TIERS)}, got {tier!r}")
    if filters.status is not None and filters.status not in STATUSES:
        raise BadRequest(f"filter status must be one of {sorted(STATUSES)} or None")
    if filters.time_field not in TIME_FIELDS:
        raise BadRequest(f"time_field must be one of {TIME_FIELDS}, got {filters.time_field!r}")
    lo, hi = filters.time_from_us, filters.time_to_us
    if lo is not None and hi is not None and lo > hi:
        raise BadRequest("time_from_us is after time_to_us")
    return filters


def needs_history(filters: SearchFilters | None) -> bool:
    """True if the filters ask for versions the live index does not hold."""
    if filters is None:
        return False
    return filters.as_of_us is not None or filters.status != "active"


def _in_time_range(item: MemoryItem, filters: SearchFilters) -> bool:
    lo, hi = filters.time_from_us, filters.time_to_us
    if lo is None and hi is None:
        return True
    if filters.time_field == "valid":
        start = item.valid_from_us
        end = item.valid_to_us
        if hi is not None and start is not None and start > hi:
            return False
        return not (lo is not None and end is not None and end <= lo)
    t = item.created_us if filters.time_field == "created" else item.recorded_us
    if lo is not None and t < lo:
        return False
    return not (hi is not None and t > hi)


def matches(item: MemoryItem, filters: SearchFilters | None) -> bool:
    """True if ``item`` (one version) passes every set filter."""
    if filters is None:
        return item.status == "active"
    if filters.status is not None and item.status != filters.status:
        return False
    if filters.tiers is not None and item.tier not in filters.tiers:
        return False
    if filters.forms is not None and item.form not in filters.forms:
        return False
    if filters.sessions is not None and item.provenance.session not in filters.sessions:
        return False
    if filters.tags and not set(filters.tags).issubset(item.tags):
        return False
    if filters.any_tags and set(filters.any_tags).isdisjoint(item.tags):
        return False
    return _in_time_range(item, filters)
