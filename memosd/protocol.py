"""The memosd wire protocol, sans-IO: frames in, typed requests out (and back).

A message is one ZeroMQ multipart message::

    frame 0      msgpack header (a map)
    frame 1..n   raw binary payloads, referenced from the header as {"$frame": i}

Request header::

    {"v": PROTOCOL_VERSION, "id": int, "op": str, "args": map, "token": str?}

Event (pushed to a ``subscribe``d connection; no ``id``, no ``ok``)::

    {"v": PROTOCOL_VERSION, "event": {"kind": str, ...}}

Response header::

    {"v": PROTOCOL_VERSION, "id": int | nil, "ok": true,  "result": any}
    {"v": PROTOCOL_VERSION, "id": int | nil, "ok": false, "error": {"code", "message",
                                                                     "reason"?, "details"?}}

Nothing in this module touches a socket or a clock.  Every malformed input is
turned into :class:`BadRequest` or :class:`TooLarge` (never another
exception), carrying the request id when it could be read so the client can
match the error to its request.  docs/protocol.md is the reference.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from memosd.errors import BadRequest, InternalError, MemosError, TooLarge
from memosd.memcube.codec import pack_raw

__all__ = [
    "FRAME_KEY",
    "MAX_REQUEST_ID",
    "PROTOCOL_VERSION",
    "Limits",
    "Reply",
    "Request",
    "WireCache",
    "decode_event",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_event",
    "encode_event_message",
    "encode_request",
    "encode_response",
    "item_to_wire",
    "resolve_frames",
    "to_wire",
]

PROTOCOL_VERSION: Final = 1
FRAME_KEY: Final = "$frame"
MAX_REQUEST_ID: Final = (1 << 63) - 1
_HEADER_KEYS: Final = frozenset({"v", "id", "op", "args", "token"})


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to every incoming message before any handler sees it."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 4 * 1024 * 1024
    max_frames: int = 64
    max_str_len: int = 2 * 1024 * 1024
    max_bin_len: int = 4 * 1024 * 1024
    max_array_len: int = 100_000
    max_map_len: int = 10_000
    max_depth: int = 32


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]
    token: str | None = None
    frames: tuple[bytes, ...] = ()


@dataclass(slots=True)
class Reply:
    """What a handler returns: a msgpack-safe result and its out-of-band frames.

    The result refers to ``frames[i - 1]`` as ``{"$frame": i}``.  A handler
    that already holds its result msgpack-encoded (items from a
    :class:`WireCache`) passes ``packed`` instead: the reply then carries
    those bytes as its result, and ``result`` is not used.
    """

    result: Any
    frames: list[bytes] = field(default_factory=list)
    packed: bytes | None = None


# --- helpers --------------------------------------------------------------------


def _check_shape(value: Any, limits: Limits) -> bool:
    """Depth and type check of a decoded header, iteratively (no recursion).

    Returns whether any map holds a ``"$frame"`` key (a frame reference).
    Scalars are checked where they are found; only maps and lists are pushed.
    """
    has_refs = False
    max_depth = limits.max_depth
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict:
            if FRAME_KEY in item:
                has_refs = True
            children: Iterable[Any] = item.values()
        elif kind is list:
            children = item
        else:
            _check_scalar(kind)
            continue
        if depth >= max_depth:
            raise BadRequest(f"header nested deeper than {max_depth} levels", reason="too_deep")
        for child in children:
            child_kind = type(child)
            if child_kind is dict or child_kind is list:
                stack.append((child, depth + 1))
            elif child_kind not in _SCALARS:
                _check_scalar(child_kind)
    return has_refs


_SCALARS: Final = frozenset({type(None), bool, int, float, str, bytes})


def _check_scalar(kind: type) -> None:
    if kind not in _SCALARS:
        raise BadRequest(f"unsupported msgpack type {kind.__name__}", reason="malformed")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise BadRequest(f"msgpack extension type {code} is not allowed", reason="malformed")


def _unpack_header(data: bytes, limits: Limits) -> tuple[Any, bool]:
    bound = min(limits.max_header_bytes, limits.max_message_bytes)
    if len(data) > bound:
        raise TooLarge(f"header of {len(data)} bytes exceeds {bound}", reason="header")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except MemosError:
        raise
    except Exception as exc:  # msgpack raises many types; all mean "bad bytes"
        raise BadRequest(f"undecodable header: {type(exc).__name__}", reason="malformed") from None
    return value, _check_shape(value, limits)


def _header_id(header: Mapping[str, Any]) -> int | None:
    rid = header.get("id")
    if type(rid) is int and 0 <= rid <= MAX_REQUEST_ID:
        return rid
    return None


def resolve_frames(value: Any, frames: Sequence[bytes]) -> Any:
    """Replace every ``{"$frame": i}`` map in ``value`` by ``frames[i - 1]``.

    ``frames`` are the message's frames after the header (frame 1 is
    ``frames[0]``).  A reference to a missing frame is a BadRequest.
    """
    if not frames:
        return value
    return _resolve_refs(value, frames)


def _resolve_refs(value: Any, frames: Sequence[bytes]) -> Any:
    if type(value) is dict:
        if FRAME_KEY in value:
            index = value[FRAME_KEY]
            if len(value) != 1 or type(index) is not int or not 1 <= index <= len(frames):
                raise BadRequest(f"bad frame reference {index!r}", reason="bad_frame")
            return frames[index - 1]
        return {k: _resolve_refs(v, frames) for k, v in value.items()}
    if type(value) is list:
        return [_resolve_refs(v, frames) for v in value]
    return value


# --- requests -------------------------------------------------------------------


def decode_request(message: Sequence[bytes], limits: Limits) -> Request:
    """Parse one request message (frames without the ROUTER envelope).

    Raises BadRequest/TooLarge; ``err.details["id"]`` holds the request id if
    the header was readable far enough to find it.
    """
    if not message:
        raise BadRequest("empty message", reason="malformed")
    header, has_refs = _unpack_header(message[0], limits)
    if type(header) is not dict:
        raise BadRequest("header must be a map", reason="malformed")
    rid = _header_id(header)
    try:
        if len(message) > limits.max_frames:
            raise TooLarge(f"more than {limits.max_frames} frames", reason="frames")
        total = len(message[0]) if len(message) == 1 else sum(map(len, message))
        if total > limits.max_message_bytes:
            raise TooLarge(
                f"message of {total} bytes exceeds {limits.max_message_bytes}", reason="message"
            )
        return _request_from_header(header, rid, message[1:], has_refs)
    except MemosError as err:
        if rid is not None:
            err.details.setdefault("id", rid)
        raise


def _request_from_header(
    header: dict[str, Any], rid: int | None, frames: Sequence[bytes], has_refs: bool
) -> Request:
    version = header.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise BadRequest(
            f"protocol version {version!r} is not supported (this daemon speaks "
            f"{PROTOCOL_VERSION})",
            reason="protocol_version",
            supported=[PROTOCOL_VERSION],
        )
    if rid is None:
        raise BadRequest("header field 'id' must be an int in 0..2**63-1", reason="bad_header")
    if not header.keys() <= _HEADER_KEYS:
        unknown = set(header) - _HEADER_KEYS
        raise BadRequest(f"unknown header fields {sorted(unknown)}", reason="bad_header")
    op = header.get("op")
    if type(op) is not str or not op:
        raise BadRequest("header field 'op' must be a non-empty string", reason="bad_header")
    args = header.get("args", {})
    if type(args) is not dict:
        raise BadRequest("header field 'args' must be a map", reason="bad_header")
    token = header.get("token")
    if token is not None and type(token) is not str:
        raise BadRequest("header field 'token' must be a string", reason="bad_header")
    if has_refs:
        args = _resolve_refs(args, frames)
    # Positional: a frozen dataclass's keyword call costs ~0.5 us more.
    return Request(rid, op, args, token, tuple(frames) if frames else ())


def encode_request(
    rid: int,
    op: str,
    args: Mapping[str, Any],
    *,
    token: str | None = None,
    frames: Sequence[bytes] = (),
) -> list[bytes]:
    """Client side: the frames of one request."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": dict(args)}
    if token is not None:
        header["token"] = token
    return [pack_raw(header), *frames]


# --- responses ------------------------------------------------------------------


# dataclass type -> its field names (dataclasses.fields() is slow for a hot path).
_DATACLASS_FIELDS: dict[type, tuple[str, ...]] = {}


def to_wire(value: Any) -> Any:
    """A msgpack-safe form of ``value``: dataclasses become maps, tuples lists, enums values."""
    kind = type(value)
    if kind in _SCALARS:  # exact types: enum members (also str or int) go below
        return value
    names = _DATACLASS_FIELDS.get(kind)
    if names is not None:
        return {name: to_wire(getattr(value, name)) for name in names}
    if isinstance(value, enum.Enum):  # StrEnum members are also str: unwrap first
        return to_wire(value.value)
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = tuple(f.name for f in dataclasses.fields(value))
        _DATACLASS_FIELDS[kind] = names
        return {name: to_wire(getattr(value, name)) for name in names}
    if isinstance(value, Mapping):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_wire(v) for v in value]
    raise InternalError(f"cannot put a {type(value).__name__} on the wire")


def item_to_wire(item: Any) -> dict[str, Any]:
    """The wire map of a :class:`~memosd.memcube.model.MemoryItem` (hot path).

    Equal to ``to_wire(item)`` (a test keeps them in step), without the
    generic dataclass walk.
    """
    prov = item.provenance
    usage = item.usage
    return {
        "id": item.id,
        "cube": item.cube,
        "version": item.version,
        "form": item.form,
        "tier": item.tier,
        "status": item.status,
        "text": item.text,
        "metadata": item.metadata,
        "payload": item.payload,
        "created_us": item.created_us,
        "recorded_us": item.recorded_us,
        "valid_from_us": item.valid_from_us,
        "valid_to_us": item.valid_to_us,
        "provenance": {
            "source": prov.source,
            "actor": prov.actor,
            "session": prov.session,
            "parents": [[pid, pv] for pid, pv in prov.parents],
            "operation": prov.operation,
        },
        "usage": {"hits": usage.hits, "last_hit_us": usage.last_hit_us, "heat": usage.heat},
        "tags": list(item.tags),
        "importance": item.importance,
        "ttl_s": item.ttl_s,
    }


def encode_response(rid: int | None, reply: Reply) -> list[bytes]:
    """The frames of a success response."""
    if reply.packed is not None:
        # "result" is the header's last key: pack it as nil, then put the
        # packed result in place of that one byte.
        head = pack_raw({"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": None})
        return [head[:-1] + reply.packed, *reply.frames]
    header = {"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": reply.result}
    return [pack_raw(header), *reply.frames]


class WireCache:
    """The packed wire maps of recently sent items, by object identity.

    Reads return the very same :class:`MemoryItem` object for an unchanged
    version and usage record (the store's decode cache), so a popular item
    (a search hit, a hot ``get``) is turned into its wire map and packed
    once instead of on every reply: ~4 us per item in a hot loop, 2-3x that
    inside the daemon.  An entry holds its item, so its ``id()`` cannot be
    reused while cached; the cache is emptied when full.  Safe to share
    between threads (single dict operations under the GIL).
    """

    __slots__ = ("_entries", "_max")

    def __init__(self, max_items: int = 4096) -> None:
        self._entries: dict[int, tuple[Any, bytes]] = {}
        self._max = max_items

    def item(self, item: Any) -> bytes:
        """``pack_raw(item_to_wire(item))``, cached."""
        entry = self._entries.get(id(item))
        if entry is not None and entry[0] is item:
            return entry[1]
        data = pack_raw(item_to_wire(item))
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[id(item)] = (item, data)
        return data

    def hits(self, hits: Iterable[Any]) -> bytes:
        """The packed list of search hits ``{"item", "score", "components"}``."""
        parts = []
        for hit in hits:
            parts.append(_HIT_HEAD)
            parts.append(self.item(hit.item))
            # A 2-entry map without its header byte: the hit's other two entries.
            parts.append(pack_raw({"score": hit.score, "components": hit.components})[1:])
        return _array_header(len(parts) // 3) + b"".join(parts)


# A 3-entry map header and the key "item" (its value follows).
_HIT_HEAD: Final = b"\x83" + pack_raw("item")


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_error(rid: int | None, err: MemosError) -> list[bytes]:
    wire = err.to_wire()
    details = wire.get("details")
    if isinstance(details, dict):
        details = {k: v for k, v in details.items() if k != "id"}
        if details:
            try:
                pack_raw(details)
                wire["details"] = details
            except Exception:
                wire.pop("details")
        else:
            wire.pop("details")
    header = {"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": wire}
    return [pack_raw(header)]


def decode_response(message: Sequence[bytes]) -> tuple[int | None, bool, Any]:
    """Client side: ``(id, ok, result or error wire map)`` with frames resolved.

    The daemon is trusted more than clients, but a garbled reply is still a
    BadRequest (reason "bad_response") rather than a crash.
    """
    if not message:
        raise BadRequest("empty response", reason="bad_response")
    try:
        header = msgpack.unpackb(message[0], raw=False, strict_map_key=False)
    except Exception as exc:
        raise BadRequest(
            f"undecodable response: {type(exc).__name__}", reason="bad_response"
        ) from None
    if type(header) is not dict or type(header.get("ok")) is not bool:
        raise BadRequest("response header is not a map with 'ok'", reason="bad_response")
    rid = header.get("id")
    rid = rid if type(rid) is int else None
    if header["ok"]:
        return rid, True, resolve_frames(header.get("result"), message[1:])
    error = header.get("error")
    return rid, False, error if type(error) is dict else {"code": "internal"}


# --- change feed ----------------------------------------------------------------


def encode_event(event: Any) -> list[bytes]:
    """The two frames of a change-feed message: topic (cube name) and msgpack payload."""
    payload = to_wire(event)
    cube = payload.get("cube") if isinstance(payload, dict) else None
    topic = cube.encode() if isinstance(cube, str) else b""
    return [topic, pack_raw(payload)]


def encode_event_message(event: Mapping[str, Any]) -> bytes:
    """A subscription's pushed event: one frame ``{"v", "event": {...}}``.

    It has no ``id`` and no ``ok``, so it cannot be mistaken for a response.
    """
    data: bytes = pack_raw({"v": PROTOCOL_VERSION, "event": dict(event)})
    return data


def decode_event(message: Sequence[bytes]) -> dict[str, Any] | None:
    """Client side: the event map of a pushed event message, or None for a response."""
    if not message:
        return None
    try:
        header = msgpack.unpackb(message[0], raw=False, strict_map_key=False)
    except Exception:
        return None
    if type(header) is not dict or "ok" in header:
        return None
    event = header.get("event")
    return event if type(event) is dict else None
