"""Version rules: pure functions from item versions to the next version.

Nothing is ever changed in place.  Every function returns a NEW
:class:`MemoryItem` with ``version = current.version + 1`` that the caller
stores next to the old ones.

Rules (the store relies on them):

* ``created_us`` is kept from version 1; ``recorded_us`` is
  ``max(now_us, current.recorded_us)``: a clock that steps back is clamped,
  never an error, so ``recorded_us`` never decreases along versions.
  Equal ``recorded_us`` values are possible; the higher version wins.
* ``provenance.parents`` starts with ``(id, current.version)``; ``source``,
  ``actor``, ``session`` and ``operation`` describe the write of this version
  (they are not inherited).  ``usage`` is carried over unchanged.
* Optimistic concurrency: ``expected_version`` (when not None) must equal
  ``current.version``, else :class:`Conflict` (reason ``"version_mismatch"``).
* A deleted (tombstoned) item cannot be revised, archived, restored or
  deleted again: :class:`Conflict` (reason ``"deleted"``).  :func:`rollback`
  is the one way back from a tombstone, while older versions still exist
  (that is, until a purge).
* In :func:`revise`, an argument left at :data:`NOT_GIVEN` keeps the current
  value; ``None`` is a real value (e.g. ``ttl_s=None`` removes the TTL).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any, Final

from memosd.errors import BadRequest, Conflict, NotFound
from memosd.memcube.ids import is_valid_id
from memosd.memcube.model import (
    MemoryItem,
    Operation,
    Provenance,
    Status,
    Usage,
    validate_cube_name,
    validate_form_name,
    validate_importance,
    validate_metadata,
    validate_operation,
    validate_optional_text,
    validate_parents,
    validate_payload,
    validate_status,
    validate_tags,
    validate_text,
    validate_tier,
    validate_time,
    validate_ttl,
    validate_validity,
)

__all__ = [
    "CONTENT_FIELDS",
    "NOT_GIVEN",
    "REVISABLE_FIELDS",
    "NotGiven",
    "archive",
    "as_of",
    "build_new_item",
    "conversation",
    "diff",
    "latest",
    "new_item",
    "restore",
    "revise",
    "rollback",
    "tombstone",
]


class NotGiven(enum.Enum):
    """Type of :data:`NOT_GIVEN`, the "leave this field as it is" marker."""

    NOT_GIVEN = "NOT_GIVEN"

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Final = NotGiven.NOT_GIVEN

#: The fields a rollback copies from the target version.
CONTENT_FIELDS: Final = (
    "text",
    "metadata",
    "payload",
    "tags",
    "tier",
    "status",
    "importance",
    "ttl_s",
    "valid_from_us",
    "valid_to_us",
)

#: The keyword arguments :func:`revise` takes besides the bookkeeping ones
#: (``now_us``, ``actor``, ``operation``, ``expected_version``): a request
#: handler can reject other keys before calling it.
REVISABLE_FIELDS: Final = (
    *CONTENT_FIELDS,
    "extra_parents",
    "source",
    "session",
)

_ALL_FIELDS: Final = tuple(f.name for f in fields(MemoryItem))
_ACTIVE: Final = Status.ACTIVE.value
_NO_USAGE: Final = Usage()  # immutable: every new item can share it


def new_item(
    *,
    id: str,
    cube: str,
    text: str,
    now_us: int,
    form: str = "plaintext",
    tier: str = "short",
    actor: str | None = None,
    source: str | None = None,
    session: str | None = None,
    parents: Iterable[tuple[str, int]] = (),
    tags: Iterable[str] = (),
    metadata: dict[str, Any] | None = None,
    payload: dict[str, Any] | None = None,
    importance: float = 0.5,
    ttl_s: int | None = None,
    valid_from_us: int | None = None,
    valid_to_us: int | None = None,
    operation: str = Operation.ADD,
) -> MemoryItem:
    """Version 1 of a new item: active, ``created_us == recorded_us == now_us``.

    Every argument is validated (:class:`BadRequest`); ``metadata`` and
    ``payload`` are deep-copied, ``tags`` sorted and deduplicated.
    """
    return build_new_item(
        id,
        cube,
        text,
        now_us,
        form,
        tier,
        actor,
        source,
        session,
        parents,
        tags,
        metadata,
        payload,
        importance,
        ttl_s,
        valid_from_us,
        valid_to_us,
        operation,
    )


def build_new_item(  # noqa: PLR0917 - positional on purpose: the hot path
    id: str,
    cube: str,
    text: str,
    now_us: int,
    form: str,
    tier: str,
    actor: str | None,
    source: str | None,
    session: str | None,
    parents: Iterable[tuple[str, int]],
    tags: Iterable[str],
    metadata: dict[str, Any] | None,
    payload: dict[str, Any] | None,
    importance: float,
    ttl_s: int | None,
    valid_from_us: int | None,
    valid_to_us: int | None,
    operation: str,
    /,
) -> MemoryItem:
    """:func:`new_item` with every argument given by position, in that order.

    For the storage engine's add path: a call with 18 keyword arguments costs
    ~1.7 us more here than one with positional ones.
    """
    if not is_valid_id(id):
        raise BadRequest(f"not a valid item id: {id!r}", reason="bad_id")
    now = validate_time(now_us, "now_us")
    valid_from, valid_to = validate_validity(valid_from_us, valid_to_us)
    # Empty tags and parents (most adds) need no validation: skip the calls.
    return MemoryItem(
        id,
        validate_cube_name(cube),
        1,
        validate_form_name(form),
        validate_tier(tier),
        _ACTIVE,
        validate_text(text),
        validate_metadata(metadata),
        validate_payload(payload),
        now,
        now,
        valid_from,
        valid_to,
        _provenance(
            source,
            actor,
            session,
            () if _is_empty_seq(parents) else validate_parents(tuple(parents)),
            operation,
        ),
        _NO_USAGE,
        () if _is_empty_seq(tags) else validate_tags(_tag_seq(tags)),
        validate_importance(importance),
        validate_ttl(ttl_s),
    )


def revise(
    current: MemoryItem,
    *,
    now_us: int,
    actor: str | None,
    operation: str = Operation.UPDATE,
    expected_version: int | None = None,
    text: str | NotGiven = NOT_GIVEN,
    tags: Iterable[str] | NotGiven = NOT_GIVEN,
    metadata: dict[str, Any] | NotGiven | None = NOT_GIVEN,
    payload: dict[str, Any] | NotGiven | None = NOT_GIVEN,
    tier: str | NotGiven = NOT_GIVEN,
    status: str | NotGiven = NOT_GIVEN,
    importance: float | NotGiven = NOT_GIVEN,
    ttl_s: int | NotGiven | None = NOT_GIVEN,
    valid_from_us: int | NotGiven | None = NOT_GIVEN,
    valid_to_us: int | NotGiven | None = NOT_GIVEN,
    extra_parents: Iterable[tuple[str, int]] = (),
    source: str | None = None,
    session: str | None = None,
) -> MemoryItem:
    """The next version of ``current`` with the given fields changed.

    Raises :class:`Conflict` on a stale ``expected_version`` or a deleted
    item; :class:`BadRequest` for invalid values, for ``status="deleted"``
    or ``operation="delete"`` (use :func:`tombstone`, which also empties the
    content).  ``metadata=None`` means ``{}``; ``payload=None`` removes it.
    """
    _check_writable(current, expected_version)
    op = validate_operation(operation)
    if op == Operation.DELETE:
        raise BadRequest("use tombstone() to delete an item", reason="bad_operation")
    new_status = current.status if status is NOT_GIVEN else validate_status(status)
    if new_status == Status.DELETED:
        raise BadRequest("use tombstone() to delete an item", reason="bad_status")
    valid_from, valid_to = validate_validity(
        current.valid_from_us if valid_from_us is NOT_GIVEN else valid_from_us,
        current.valid_to_us if valid_to_us is NOT_GIVEN else valid_to_us,
    )
    return _next_version(
        current,
        now_us=now_us,
        provenance=_provenance(source, actor, session, _parents(current, (), extra_parents), op),
        text=current.text if text is NOT_GIVEN else validate_text(text),
        metadata=current.metadata if metadata is NOT_GIVEN else validate_metadata(metadata),
        payload=current.payload if payload is NOT_GIVEN else validate_payload(payload),
        tags=current.tags if tags is NOT_GIVEN else validate_tags(_tag_seq(tags)),
        tier=current.tier if tier is NOT_GIVEN else validate_tier(tier),
        status=new_status,
        importance=(
            current.importance if importance is NOT_GIVEN else validate_importance(importance)
        ),
        ttl_s=current.ttl_s if ttl_s is NOT_GIVEN else validate_ttl(ttl_s),
        valid_from_us=valid_from,
        valid_to_us=valid_to,
    )


def archive(
    current: MemoryItem,
    *,
    now_us: int,
    actor: str | None,
    valid_to_us: int | NotGiven | None = NOT_GIVEN,
    expected_version: int | None = None,
    extra_parents: Iterable[tuple[str, int]] = (),
    source: str | None = None,
    session: str | None = None,
) -> MemoryItem:
    """Archive an active item (a superseded fact): status ``archived``, op ARCHIVE.

    Pass ``valid_to_us`` to close the fact's world-time validity.  Only an
    active item can be archived (else :class:`Conflict`, reason ``"not_active"``).
    """
    _check_writable(current, expected_version)
    if current.status != Status.ACTIVE:
        raise Conflict(f"item {current.id} is {current.status}, not active", reason="not_active")
    return revise(
        current,
        now_us=now_us,
        actor=actor,
        operation=Operation.ARCHIVE,
        status=Status.ARCHIVED,
        valid_to_us=valid_to_us,
        extra_parents=extra_parents,
        source=source,
        session=session,
    )


def restore(
    current: MemoryItem,
    *,
    now_us: int,
    actor: str | None,
    expected_version: int | None = None,
    source: str | None = None,
    session: str | None = None,
) -> MemoryItem:
    """Make an archived item active again (op RESTORE); else :class:`Conflict`."""
    _check_writable(current, expected_version)
    if current.status != Status.ARCHIVED:
        raise Conflict(
            f"item {current.id} is {current.status}, not archived", reason="not_archived"
        )
    return revise(
        current,
        now_us=now_us,
        actor=actor,
        operation=Operation.RESTORE,
        status=Status.ACTIVE,
        source=source,
        session=session,
    )


def tombstone(
    current: MemoryItem,
    *,
    now_us: int,
    actor: str | None,
    expected_version: int | None = None,
    source: str | None = None,
    session: str | None = None,
) -> MemoryItem:
    """A delete marker: status ``deleted``, op DELETE, content emptied.

    ``text`` becomes ``""``, ``metadata`` ``{}``, ``payload`` None and
    ``tags`` ``()`` (tags can carry content too); the header (form, tier,
    importance, ttl, validity) stays.  Older versions keep their content until
    a purge.  Deleting a deleted item raises :class:`Conflict` (reason
    ``"deleted"``): callers wanting idempotent deletes catch that reason.
    """
    _check_writable(current, expected_version)
    return _next_version(
        current,
        now_us=now_us,
        provenance=_provenance(source, actor, session, _parents(current, (), ()), Operation.DELETE),
        text="",
        metadata={},
        payload=None,
        tags=(),
        tier=current.tier,
        status=Status.DELETED.value,
        importance=current.importance,
        ttl_s=current.ttl_s,
        valid_from_us=current.valid_from_us,
        valid_to_us=current.valid_to_us,
    )


def rollback(
    history: Sequence[MemoryItem],
    target_version: int,
    *,
    now_us: int,
    actor: str | None,
    expected_version: int | None = None,
    source: str | None = None,
    session: str | None = None,
) -> MemoryItem:
    """A new version whose content (:data:`CONTENT_FIELDS`) equals ``target_version``'s.

    ``history`` holds versions of one item in any order and must include the
    latest one and the target.  Parents are ``(id, latest), (id, target)``
    (one pair when they are the same).  Works on a tombstoned item (undelete).
    :class:`NotFound` (reason ``"version"``) when the target is not in history.
    """
    current = latest(history)
    if expected_version is not None and expected_version != current.version:
        raise _stale(current, expected_version)
    target = next((v for v in history if v.version == target_version), None)
    if target is None:
        raise NotFound(
            f"item {current.id} has no version {target_version!r}",
            reason="version",
            id=current.id,
            version=target_version,
        )
    return _next_version(
        current,
        now_us=now_us,
        provenance=_provenance(
            source,
            actor,
            session,
            _parents(current, (target.key,) if target is not current else (), ()),
            Operation.ROLLBACK,
        ),
        text=target.text,
        metadata=target.metadata,
        payload=target.payload,
        tags=target.tags,
        tier=target.tier,
        status=target.status,
        importance=target.importance,
        ttl_s=target.ttl_s,
        valid_from_us=target.valid_from_us,
        valid_to_us=target.valid_to_us,
    )


def latest(history: Sequence[MemoryItem]) -> MemoryItem:
    """The highest version in ``history`` (versions of one item, any order)."""
    if not history:
        raise BadRequest("history is empty")
    first = history[0]
    best = first
    seen: set[int] = set()
    for item in history:
        if item.id != first.id or item.cube != first.cube:
            raise BadRequest("history mixes versions of different items")
        if item.version in seen:
            raise BadRequest(f"history holds version {item.version} twice")
        seen.add(item.version)
        if item.version > best.version:
            best = item
    return best


def conversation(history: Sequence[MemoryItem]) -> str | None:
    """The session of the highest version in ``history`` that names one, or None.

    Provenance is per version: an edit or a scheduler's tier move written
    outside any session has none, yet the item still belongs to the
    conversation it was written in (search's neighbour smoothing and the tier
    FIFO both place it there).
    """
    best: MemoryItem | None = None
    for item in history:
        if item.provenance.session is not None and (best is None or item.version > best.version):
            best = item
    return None if best is None else best.provenance.session


def as_of(history: Sequence[MemoryItem], at_us: int) -> MemoryItem | None:
    """The version current at system time ``at_us``, or None if none existed yet.

    That is the highest version with ``recorded_us <= at_us`` (the boundary is
    inclusive).  Tombstones and archived versions are returned as they are;
    whether they are visible is the caller's decision.
    """
    best: MemoryItem | None = None
    for item in history:
        if item.recorded_us <= at_us and (best is None or item.version > best.version):
            best = item
    return best


def diff(a: MemoryItem, b: MemoryItem) -> dict[str, tuple[Any, Any]]:
    """``{field: (value in a, value in b)}`` for every header or content field that differs.

    Includes bookkeeping (``version``, ``recorded_us``, ``provenance``...).
    """
    out: dict[str, tuple[Any, Any]] = {}
    for name in _ALL_FIELDS:
        old, new = getattr(a, name), getattr(b, name)
        if old != new:
            out[name] = (old, new)
    return out


# --- helpers ---------------------------------------------------------------------


def _stale(current: MemoryItem, expected_version: int) -> Conflict:
    return Conflict(
        f"item {current.id} is at version {current.version}, not {expected_version}",
        reason="version_mismatch",
        id=current.id,
        version=current.version,
        expected_version=expected_version,
    )


def _check_writable(current: MemoryItem, expected_version: int | None) -> None:
    if expected_version is not None and expected_version != current.version:
        raise _stale(current, expected_version)
    if current.status == Status.DELETED:
        raise Conflict(f"item {current.id} is deleted", reason="deleted", id=current.id)


def _is_empty_seq(value: object) -> bool:
    return (type(value) is tuple or type(value) is list) and not value


def _tag_seq(tags: Iterable[str]) -> Any:
    return tags if isinstance(tags, str | list | tuple | set | frozenset) else tuple(tags)


def _parents(
    current: MemoryItem,
    also: tuple[tuple[str, int], ...],
    extra: Iterable[tuple[str, int]],
) -> tuple[tuple[str, int], ...]:
    pairs = (current.key, *also, *validate_parents(tuple(extra)))
    return tuple(dict.fromkeys(pairs))  # drop repeats, keep order


# Provenances without parents (every add), by (source, actor, session,
# operation): a Provenance is immutable, so versions may share one, and a
# writer's adds repeat the same few (~1.3 us each to validate and build).
_PROVENANCES: Final[dict[tuple[object, ...], Provenance]] = {}
_PROVENANCES_MAX: Final = 1024


def _plain(value: object) -> bool:
    return value is None or type(value) is str


def _provenance(
    source: str | None,
    actor: str | None,
    session: str | None,
    parents: tuple[tuple[str, int], ...],
    operation: str,
) -> Provenance:
    if parents or not (_plain(source) and _plain(actor) and _plain(session)):
        return _new_provenance(source, actor, session, parents, operation)
    if type(operation) is not str and type(operation) is not Operation:
        return _new_provenance(source, actor, session, parents, operation)
    key = (source, actor, session, operation)
    provenance = _PROVENANCES.get(key)
    if provenance is None:
        provenance = _new_provenance(source, actor, session, parents, operation)
        if len(_PROVENANCES) >= _PROVENANCES_MAX:
            _PROVENANCES.clear()
        _PROVENANCES[key] = provenance
    return provenance


def _new_provenance(
    source: str | None,
    actor: str | None,
    session: str | None,
    parents: tuple[tuple[str, int], ...],
    operation: str,
) -> Provenance:
    return Provenance(
        source=validate_optional_text(source, "source"),
        actor=validate_optional_text(actor, "actor"),
        session=validate_optional_text(session, "session"),
        parents=parents,
        operation=validate_operation(operation),
    )


def _next_version(
    current: MemoryItem,
    *,
    now_us: int,
    provenance: Provenance,
    text: str,
    metadata: dict[str, Any],
    payload: dict[str, Any] | None,
    tags: tuple[str, ...],
    tier: str,
    status: str,
    importance: float,
    ttl_s: int | None,
    valid_from_us: int | None,
    valid_to_us: int | None,
) -> MemoryItem:
    now = validate_time(now_us, "now_us")
    return MemoryItem(
        id=current.id,
        cube=current.cube,
        version=current.version + 1,
        form=current.form,
        tier=tier,
        status=status,
        text=text,
        metadata=metadata,
        payload=payload,
        created_us=current.created_us,
        recorded_us=max(now, current.recorded_us),
        valid_from_us=valid_from_us,
        valid_to_us=valid_to_us,
        provenance=provenance,
        usage=current.usage,
        tags=tags,
        importance=importance,
        ttl_s=ttl_s,
    )
