"""The MemCube data model: cubes, memory item versions, purge records.

Everything here is an immutable value.  Constructors do not validate (the
codec and :mod:`memosd.memcube.versioning` do, so the read path pays for each
check once); the ``validate_*`` functions raise :class:`BadRequest` with a
message that names the field, and return the normalised value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from memosd.errors import BadRequest
from memosd.memcube.ids import is_valid_id

__all__ = [
    "BUILTIN_FORMS",
    "CUBE_NAME_RE",
    "CUBE_SCHEMA_VERSION",
    "FORM_NAME_RE",
    "MAX_METADATA_DEPTH",
    "MAX_TAGS",
    "MAX_TAG_LENGTH",
    "MAX_TEXT_FIELD_LENGTH",
    "OPERATIONS",
    "STATUSES",
    "TIERS",
    "CubeConfig",
    "Form",
    "MemCube",
    "MemoryItem",
    "Operation",
    "Provenance",
    "PurgeRecord",
    "Status",
    "Tier",
    "Usage",
    "new_cube",
    "validate_cube_config",
    "validate_cube_name",
    "validate_form_name",
    "validate_importance",
    "validate_metadata",
    "validate_operation",
    "validate_optional_text",
    "validate_optional_time",
    "validate_parents",
    "validate_payload",
    "validate_status",
    "validate_tags",
    "validate_text",
    "validate_tier",
    "validate_time",
    "validate_ttl",
    "validate_validity",
    "validate_version",
]


class Form(StrEnum):
    """Built-in memory forms; plugins may add others (see :func:`validate_form_name`)."""

    PLAINTEXT = "plaintext"
    ACTIVATION = "activation"
    PARAMETER = "parameter"


class Tier(StrEnum):
    SHORT = "short"
    MID = "mid"
    LONG = "long"


class Status(StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"
    DELETED = "deleted"


class Operation(StrEnum):
    """What wrote a version (``Provenance.operation``)."""

    ADD = "add"
    UPDATE = "update"
    ROLLBACK = "rollback"
    DELETE = "delete"
    ARCHIVE = "archive"
    RESTORE = "restore"
    MIGRATE = "migrate"
    CONSOLIDATE = "consolidate"


BUILTIN_FORMS: Final = frozenset(f.value for f in Form)
TIERS: Final = frozenset(t.value for t in Tier)
STATUSES: Final = frozenset(s.value for s in Status)
OPERATIONS: Final = frozenset(o.value for o in Operation)

#: Version of the cube layout (``MemCube.schema_version``); the store may
#: migrate cubes written at an older one.
CUBE_SCHEMA_VERSION: Final = 1
MAX_METADATA_DEPTH: Final = 16
MAX_TAGS: Final = 64
MAX_TAG_LENGTH: Final = 128
#: Bound on short free-text header fields (source, actor, session, owner, reason).
MAX_TEXT_FIELD_LENGTH: Final = 1024
_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 64) - 1  # msgpack's uint64
_TIME_MAX: Final = (1 << 63) - 1

FORM_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
CUBE_NAME_RE: Final = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")


# --- values --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Provenance:
    """Who and what wrote one version.

    ``parents`` are ``(item id, version)`` pairs this version derives from:
    the previous version for an update, also the target for a rollback, the
    merged items for a consolidation.
    """

    source: str | None
    actor: str | None
    session: str | None
    parents: tuple[tuple[str, int], ...]
    operation: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Access statistics.  Not versioned: a hit never writes a new version."""

    hits: int = 0
    last_hit_us: int | None = None
    heat: float = 0.0

    def hit(self, now_us: int) -> Usage:
        """This usage after one more access at ``now_us`` (heat is the policy's job)."""
        last = now_us if self.last_hit_us is None else max(self.last_hit_us, now_us)
        return Usage(self.hits + 1, last, self.heat)


@dataclass(frozen=True, slots=True)
class MemoryItem:
    """One immutable version of a memory item.

    ``created_us`` is the system time of version 1, ``recorded_us`` the
    system time this version was written (non-decreasing along versions);
    ``valid_from_us``/``valid_to_us`` are world time (when the fact holds).
    ``metadata`` and ``payload`` are plain dicts for speed: treat them as
    read-only.  ``tags`` are sorted and unique.  Not hashable (dict fields).
    """

    id: str
    cube: str
    version: int
    form: str
    tier: str
    status: str
    text: str
    metadata: dict[str, Any]
    payload: dict[str, Any] | None
    created_us: int
    recorded_us: int
    valid_from_us: int | None
    valid_to_us: int | None
    provenance: Provenance
    usage: Usage
    tags: tuple[str, ...]
    importance: float
    ttl_s: int | None

    @property
    def is_live(self) -> bool:
        """True while the item is active (neither archived nor deleted)."""
        return self.status == Status.ACTIVE

    @property
    def expires_at_us(self) -> int | None:
        """When the TTL runs out: ``recorded_us + ttl_s``; every new version restarts it."""
        if self.ttl_s is None:
            return None
        return self.recorded_us + self.ttl_s * 1_000_000

    def is_expired(self, now_us: int) -> bool:
        expires = self.expires_at_us
        return expires is not None and now_us >= expires

    @property
    def key(self) -> tuple[str, int]:
        """``(id, version)``, the form used in provenance parents."""
        return (self.id, self.version)


@dataclass(frozen=True, slots=True)
class CubeConfig:
    """Per-cube settings.  The dicts are copied on construction; treat them as read-only."""

    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_dim: int = 384
    tier_policy: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A caller's later mutation of the dict it passed must not leak in.
        object.__setattr__(self, "tier_policy", dict(self.tier_policy))
        object.__setattr__(self, "extra", dict(self.extra))


@dataclass(frozen=True, slots=True)
class MemCube:
    """A named container of memory items, owned by one principal."""

    name: str
    owner: str
    config: CubeConfig
    schema_version: int
    created_us: int


@dataclass(frozen=True, slots=True)
class PurgeRecord:
    """That a purge happened (which item, how many versions, by whom), never what it held."""

    cube: str
    id: str
    versions: int
    purged_us: int
    actor: str | None
    reason: str | None


# --- validation ----------------------------------------------------------------


def validate_form_name(name: object) -> str:
    """A built-in form or a plugin form name: lowercase ``[a-z][a-z0-9_.-]{0,63}``."""
    if type(name) is str and name in BUILTIN_FORMS:
        return name
    if isinstance(name, str) and FORM_NAME_RE.fullmatch(name):
        return str(name)
    raise BadRequest(f"form must match [a-z][a-z0-9_.-]{{0,63}}, got {name!r}", reason="bad_form")


def validate_cube_name(name: object) -> str:
    """A cube name: ``[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}``."""
    if isinstance(name, str) and CUBE_NAME_RE.fullmatch(name):
        return str(name)
    raise BadRequest(
        f"cube name must match [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,127}}, got {name!r}",
        reason="bad_cube_name",
    )


def _validate_member(value: object, allowed: frozenset[str], what: str) -> str:
    if isinstance(value, str) and value in allowed:
        return str(value)  # plain str, also for StrEnum members
    raise BadRequest(
        f"{what} must be one of {sorted(allowed)}, got {value!r}", reason=f"bad_{what}"
    )


def validate_tier(tier: object) -> str:
    return _validate_member(tier, TIERS, "tier")


def validate_status(status: object) -> str:
    return _validate_member(status, STATUSES, "status")


def validate_operation(operation: object) -> str:
    return _validate_member(operation, OPERATIONS, "operation")


def _check_utf8(s: str, what: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{what} is not encodable as UTF-8", reason="bad_text") from None


def validate_text(text: object, what: str = "text") -> str:
    if not isinstance(text, str):
        raise BadRequest(f"{what} must be a string, got {type(text).__name__}")
    _check_utf8(text, what)
    return str(text)


def validate_optional_text(
    value: object, what: str, max_length: int = MAX_TEXT_FIELD_LENGTH
) -> str | None:
    """None, or a string of at most ``max_length`` characters (source, actor...)."""
    if value is None:
        return None
    text = validate_text(value, what)
    if len(text) > max_length:
        raise BadRequest(f"{what} is longer than {max_length} characters")
    return text


def validate_optional_time(value: object, what: str) -> int | None:
    """None or a non-negative int of microseconds."""
    return None if value is None else validate_time(value, what)


def validate_time(value: object, what: str) -> int:
    """A non-negative int of microseconds."""
    if type(value) is not int or not 0 <= value <= _TIME_MAX:
        raise BadRequest(
            f"{what} must be a non-negative int of microseconds, got {value!r}",
            reason="bad_time",
        )
    return value


def validate_version(value: object, what: str = "version") -> int:
    if type(value) is not int or not 1 <= value <= _TIME_MAX:
        raise BadRequest(f"{what} must be an int >= 1, got {value!r}", reason="bad_version")
    return value


def _copy_value(value: Any, what: str, depth: int) -> Any:
    """A deep copy of a msgpack-safe value, or BadRequest naming the first bad part."""
    kind = type(value)
    if value is None or kind is bool or kind is float or kind is bytes:
        return value
    if kind is str:
        _check_utf8(value, what)
        return value
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise BadRequest(f"{what}: integer {value} does not fit in 64 bits")
        return value
    if kind is dict or kind is list:
        if depth >= MAX_METADATA_DEPTH:
            raise BadRequest(f"{what}: nested deeper than {MAX_METADATA_DEPTH} levels")
        if kind is list:
            return [_copy_value(v, f"{what}[{i}]", depth + 1) for i, v in enumerate(value)]
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                raise BadRequest(f"{what}: keys must be strings, got {k!r}")
            _check_utf8(k, what)
            out[k] = _copy_value(v, f"{what}.{k}", depth + 1)
        return out
    if kind is tuple:
        raise BadRequest(f"{what}: use a list, not a tuple (it would come back as a list)")
    raise BadRequest(
        f"{what}: values must be None, bool, int, float, str, bytes, list or dict; "
        f"got {kind.__name__}"
    )


def validate_metadata(value: object, what: str = "metadata") -> dict[str, Any]:
    """A normalised deep copy of a msgpack-safe dict (``None`` becomes ``{}``).

    Allowed values: None, bool, int (64-bit), float, str, bytes, list, dict
    with str keys, nested at most :data:`MAX_METADATA_DEPTH` containers deep
    (the metadata dict itself is the first).
    Tuples are refused because they would decode as lists.
    """
    if value is None:
        return {}
    if type(value) is not dict:
        raise BadRequest(f"{what} must be a dict, got {type(value).__name__}")
    copied: dict[str, Any] = _copy_value(value, what, 0)
    return copied


def validate_payload(value: object) -> dict[str, Any] | None:
    """Like :func:`validate_metadata`, but ``None`` stays ``None`` (no payload)."""
    if value is None:
        return None
    return validate_metadata(value, "payload")


def validate_tags(tags: object) -> tuple[str, ...]:
    """Sorted, unique tags: non-empty strings of at most 128 characters, at most 64."""
    if isinstance(tags, str | bytes) or not isinstance(tags, tuple | list | set | frozenset):
        raise BadRequest(f"tags must be a list of strings, got {type(tags).__name__}")
    unique: set[str] = set()
    for tag in tags:
        if not isinstance(tag, str) or not tag:
            raise BadRequest(f"tags must be non-empty strings, got {tag!r}", reason="bad_tag")
        if len(tag) > MAX_TAG_LENGTH:
            raise BadRequest(f"tag longer than {MAX_TAG_LENGTH} characters", reason="bad_tag")
        _check_utf8(tag, "tag")
        unique.add(str(tag))
    if len(unique) > MAX_TAGS:
        raise BadRequest(f"at most {MAX_TAGS} tags, got {len(unique)}", reason="bad_tag")
    return tuple(sorted(unique))


def validate_importance(value: object) -> float:
    if type(value) is bool or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise BadRequest(f"importance must be a number in [0, 1], got {value!r}")
    return float(value)


def validate_ttl(ttl_s: object) -> int | None:
    if ttl_s is None:
        return None
    if type(ttl_s) is not int or not 0 < ttl_s <= _TIME_MAX // 1_000_000:
        raise BadRequest(f"ttl_s must be a positive int of seconds or None, got {ttl_s!r}")
    return ttl_s


def validate_validity(valid_from_us: object, valid_to_us: object) -> tuple[int | None, int | None]:
    """World-time validity: each bound optional, ``valid_from_us <= valid_to_us``."""
    start = validate_optional_time(valid_from_us, "valid_from_us")
    end = validate_optional_time(valid_to_us, "valid_to_us")
    if start is not None and end is not None and start > end:
        raise BadRequest(
            f"valid_from_us ({start}) is after valid_to_us ({end})", reason="bad_validity"
        )
    return start, end


def validate_parents(parents: object) -> tuple[tuple[str, int], ...]:
    """``(item id, version)`` pairs, in the given order."""
    if not isinstance(parents, tuple | list):
        raise BadRequest("parents must be a sequence of (id, version) pairs")
    out: list[tuple[str, int]] = []
    for pair in parents:
        if not isinstance(pair, tuple | list) or len(pair) != 2 or not is_valid_id(pair[0]):
            raise BadRequest(f"parent must be an (id, version) pair, got {pair!r}")
        out.append((pair[0], validate_version(pair[1], "parent version")))
    return tuple(out)


def validate_cube_config(config: object) -> CubeConfig:
    if not isinstance(config, CubeConfig):
        raise BadRequest("config must be a CubeConfig")
    validate_text(config.embedding_model, "embedding_model")
    if type(config.embedding_dim) is not int or not 0 < config.embedding_dim <= 65536:
        raise BadRequest(f"embedding_dim must be an int in 1..65536, got {config.embedding_dim!r}")
    validate_metadata(config.tier_policy, "tier_policy")
    validate_metadata(config.extra, "extra")
    return config


def new_cube(name: str, *, owner: str, now_us: int, config: CubeConfig | None = None) -> MemCube:
    """A validated new cube at the current :data:`CUBE_SCHEMA_VERSION`."""
    owner_ = validate_optional_text(owner, "owner")
    if not owner_:
        raise BadRequest("owner must be a non-empty string")
    return MemCube(
        name=validate_cube_name(name),
        owner=owner_,
        config=validate_cube_config(config if config is not None else CubeConfig()),
        schema_version=CUBE_SCHEMA_VERSION,
        created_us=validate_time(now_us, "now_us"),
    )
