"""WAL record types of the store and their payloads (pure).

Every record is one fully resolved change: ids, versions and timestamps were
decided by the writer before logging, so applying a record twice gives the
same state (replay is idempotent).  Payloads reuse the memcube codecs, which
carry their own schema version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

from memosd.errors import CodecError
from memosd.memcube import codec
from memosd.memcube.model import MemCube, MemoryItem, PurgeRecord, Usage
from memosd.scheduler.jobs import Job, decode_job, encode_job

__all__ = [
    "CubeDrop",
    "CubePut",
    "GrantSet",
    "ItemPurge",
    "ItemPut",
    "JobDelete",
    "JobPut",
    "Mutation",
    "RecordType",
    "TokenDelete",
    "TokenPut",
    "VersionPut",
    "decode_mutation",
    "decode_record",
    "encode_atomic",
    "encode_mutation",
]


_NO_USAGE = Usage()


class RecordType(IntEnum):
    CUBE_PUT = 1
    CUBE_DROP = 2
    ITEM_PUT = 3
    ITEM_PURGE = 4
    GRANT_SET = 5
    TOKEN_PUT = 6
    TOKEN_DELETE = 7
    JOB_PUT = 8
    # Several mutations of one request, all or nothing: payload is a msgpack
    # list of [record type, payload] pairs (never nested).
    ATOMIC = 9
    JOB_DELETE = 10


@dataclass(frozen=True, slots=True)
class CubePut:
    cube: MemCube


@dataclass(frozen=True, slots=True)
class CubeDrop:
    name: str


@dataclass(frozen=True, slots=True)
class ItemPut:
    item: MemoryItem


@dataclass(frozen=True, slots=True)
class VersionPut:
    """An ITEM_PUT record as replay reads it: its keys, not the whole item.

    The record's payload is stored as is, so replay never needs the item
    itself; ``keys.payload`` is only read for the blobs the version references.
    """

    keys: codec.ItemKeys


@dataclass(frozen=True, slots=True)
class ItemPurge:
    record: PurgeRecord


@dataclass(frozen=True, slots=True)
class GrantSet:
    cube: str
    principal: str
    level: str | None


@dataclass(frozen=True, slots=True)
class TokenPut:
    name: str
    principal: str
    token_hash: bytes
    created_us: int


@dataclass(frozen=True, slots=True)
class TokenDelete:
    name: str


@dataclass(frozen=True, slots=True)
class JobPut:
    job: Job


@dataclass(frozen=True, slots=True)
class JobDelete:
    """An ended job's record removed (job retention); ``cube`` routes its change event."""

    job_id: str
    cube: str | None


Mutation = (
    CubePut
    | CubeDrop
    | ItemPut
    | VersionPut
    | ItemPurge
    | GrantSet
    | TokenPut
    | TokenDelete
    | JobPut
    | JobDelete
)


def encode_atomic(records: Sequence[tuple[int, bytes]]) -> tuple[int, bytes]:
    """One WAL record carrying several already-encoded mutations."""
    return RecordType.ATOMIC, codec.packb([[rtype, payload] for rtype, payload in records])


def decode_record(
    rtype: int, payload: bytes, *, item_keys_only: bool = False
) -> list[tuple[Mutation, bytes]]:
    """The mutations in one WAL record, each with its own encoded payload.

    ``item_keys_only`` (replay) reads item versions as :class:`VersionPut`.
    """
    if rtype != RecordType.ATOMIC:
        return [(decode_mutation(rtype, payload, item_keys_only=item_keys_only), payload)]
    parts = codec.unpackb(payload)
    if not isinstance(parts, list):
        raise CodecError("malformed ATOMIC WAL record")
    out: list[tuple[Mutation, bytes]] = []
    for part in parts:
        if not (isinstance(part, list) and len(part) == 2 and isinstance(part[1], bytes)):
            raise CodecError("malformed ATOMIC WAL record part")
        inner_type, inner_payload = part
        if inner_type == RecordType.ATOMIC:
            raise CodecError("nested ATOMIC WAL record")
        mutation = decode_mutation(int(inner_type), inner_payload, item_keys_only=item_keys_only)
        out.append((mutation, inner_payload))
    return out


def encode_mutation(mutation: Mutation) -> tuple[int, bytes]:
    """The (record type, payload) pair that goes into the WAL."""
    # Item puts first, matched by type only (see engine._event_for).
    match mutation:
        case ItemPut():
            item = mutation.item
            # Usage statistics are side data, never part of a version record.
            usage = item.usage  # (field by field: cheaper than dataclass __eq__)
            if usage.hits != 0 or usage.last_hit_us is not None or usage.heat != 0.0:
                item = replace(item, usage=_NO_USAGE)
            return RecordType.ITEM_PUT, codec.encode_item(item, verify=False)
        case CubePut(cube):
            return RecordType.CUBE_PUT, codec.encode_cube(cube)
        case CubeDrop(name):
            return RecordType.CUBE_DROP, codec.packb({"name": name})
        case ItemPurge(record):
            return RecordType.ITEM_PURGE, codec.encode_purge(record)
        case GrantSet(cube, principal, level):
            return RecordType.GRANT_SET, codec.packb(
                {"cube": cube, "principal": principal, "level": level}
            )
        case TokenPut(name, principal, token_hash, created_us):
            return RecordType.TOKEN_PUT, codec.packb(
                {"name": name, "principal": principal, "hash": token_hash, "created_us": created_us}
            )
        case TokenDelete(name):
            return RecordType.TOKEN_DELETE, codec.packb({"name": name})
        case JobPut(job):
            return RecordType.JOB_PUT, encode_job(job)
        case JobDelete(job_id, cube):
            return RecordType.JOB_DELETE, codec.packb({"id": job_id, "cube": cube})
    raise TypeError(f"not a mutation: {mutation!r}")  # pragma: no cover


def _fields(payload: bytes, names: tuple[str, ...]) -> dict[str, Any]:
    doc = codec.unpackb(payload)
    if not isinstance(doc, dict) or not all(n in doc for n in names):
        raise CodecError(f"WAL record payload lacks fields {names}")
    return doc


def decode_mutation(rtype: int, payload: bytes, *, item_keys_only: bool = False) -> Mutation:
    """Inverse of :func:`encode_mutation`; CodecError on anything unexpected."""
    try:
        kind = RecordType(rtype)
    except ValueError:
        raise CodecError(f"unknown WAL record type {rtype}") from None
    try:
        if kind is RecordType.CUBE_PUT:
            return CubePut(codec.decode_cube(payload))
        if kind is RecordType.ITEM_PUT:
            if item_keys_only:
                return VersionPut(codec.decode_item_keys(payload))
            return ItemPut(codec.decode_item(payload))
        if kind is RecordType.ITEM_PURGE:
            return ItemPurge(codec.decode_purge(payload))
        if kind is RecordType.JOB_PUT:
            return JobPut(decode_job(payload))
        if kind is RecordType.ATOMIC:
            raise CodecError("ATOMIC records hold several mutations: use decode_record")
        if kind is RecordType.JOB_DELETE:
            doc = _fields(payload, ("id", "cube"))
            return JobDelete(str(doc["id"]), None if doc["cube"] is None else str(doc["cube"]))
        if kind is RecordType.CUBE_DROP:
            return CubeDrop(str(_fields(payload, ("name",))["name"]))
        if kind is RecordType.GRANT_SET:
            doc = _fields(payload, ("cube", "principal", "level"))
            level = doc["level"]
            return GrantSet(
                str(doc["cube"]), str(doc["principal"]), None if level is None else str(level)
            )
        if kind is RecordType.TOKEN_PUT:
            doc = _fields(payload, ("name", "principal", "hash", "created_us"))
            return TokenPut(
                str(doc["name"]), str(doc["principal"]), bytes(doc["hash"]), int(doc["created_us"])
            )
        doc = _fields(payload, ("name",))
        return TokenDelete(str(doc["name"]))
    except (TypeError, ValueError) as exc:
        raise CodecError(f"malformed WAL record of type {kind.name}: {exc}") from exc
