"""The one error tree of memosd.

Every error the daemon, the client library or the CLI can raise on purpose is
a :class:`MemosError`.  Each class carries a stable machine ``code`` that
travels over the wire (see docs/protocol.md), so a client re-raises exactly
the class the server raised.  Subsystems add branches, never new wire codes:
the set of codes below is part of the protocol.

``reason`` is a finer, also stable, sub-code (``"disk_full"``,
``"wal_failed"``, ``"corrupt_record"``...) for callers that need to tell
cases apart without parsing messages.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

__all__ = [
    "WIRE_CODES",
    "BadRequest",
    "CodecError",
    "Conflict",
    "CorruptionError",
    "DiskFullError",
    "Forbidden",
    "InternalError",
    "MemosError",
    "NotFound",
    "PluginError",
    "StorageError",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "WalCorruptionError",
    "WalFailedError",
    "error_from_wire",
]


class MemosError(Exception):
    """Base of every deliberate memosd error."""

    code: ClassVar[str] = "internal"
    default_reason: ClassVar[str] = ""

    def __init__(self, message: str, *, reason: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason if reason is not None else self.default_reason
        self.details: dict[str, Any] = details

    def to_wire(self) -> dict[str, Any]:
        """The error as it travels in a response (msgpack-safe values only)."""
        wire: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.reason:
            wire["reason"] = self.reason
        if self.details:
            wire["details"] = self.details
        return wire

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


# --- wire-level classes (one per stable code) --------------------------------


class BadRequest(MemosError):
    """The request is malformed or its arguments are invalid."""

    code = "bad_request"


class Unauthorized(MemosError):
    """The caller could not be identified (bad or missing token)."""

    code = "unauthorized"


class Forbidden(MemosError):
    """The caller is known but may not do this."""

    code = "forbidden"


class NotFound(MemosError):
    """The cube, item, version or job does not exist (or is not visible)."""

    code = "not_found"


class Conflict(MemosError):
    """The request conflicts with the current state (exists, stale version...)."""

    code = "conflict"


class TooLarge(MemosError):
    """A message, payload or field exceeds a configured limit."""

    code = "too_large"


class Unavailable(MemosError):
    """The service cannot take this request now (shutting down, disk full...)."""

    code = "unavailable"


class InternalError(MemosError):
    """A bug or an unexpected failure inside memosd."""

    code = "internal"


# --- subsystem branches --------------------------------------------------------


class CodecError(BadRequest):
    """Bytes that do not decode to a valid record of the expected schema."""

    default_reason = "undecodable"


class StorageError(Unavailable):
    """The storage engine cannot serve the request."""

    default_reason = "storage"


class DiskFullError(StorageError):
    """The disk (or the WAL's volume) is full: the write was not made."""

    default_reason = "disk_full"


class WalFailedError(StorageError):
    """A WAL write or fsync failed; the log refuses all further writes.

    After a failed fsync the kernel may have dropped the dirty pages, so the
    only safe continuation is a restart that recovers from what is on disk.
    """

    default_reason = "wal_failed"


class CorruptionError(InternalError):
    """Data on disk fails its checksum or structure checks."""

    default_reason = "corrupt"


class WalCorruptionError(CorruptionError):
    """A WAL record in the middle of the log is damaged (not a torn tail)."""

    default_reason = "wal_corrupt"


class PluginError(InternalError):
    """A plugin hook failed; the request or job fails, the daemon keeps serving."""

    default_reason = "plugin"


WIRE_CODES: Final[dict[str, type[MemosError]]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        TooLarge,
        Unavailable,
        InternalError,
    )
}

_BY_REASON: Final[dict[tuple[str, str], type[MemosError]]] = {
    (cls.code, cls.default_reason): cls
    for cls in (
        CodecError,
        StorageError,
        DiskFullError,
        WalFailedError,
        CorruptionError,
        WalCorruptionError,
        PluginError,
    )
}


def error_from_wire(wire: dict[str, Any]) -> MemosError:
    """Rebuild the most specific error class from its wire form."""
    code = str(wire.get("code", "internal"))
    reason = str(wire.get("reason", ""))
    message = str(wire.get("message", ""))
    details = wire.get("details")
    cls = _BY_REASON.get((code, reason)) or WIRE_CODES.get(code, InternalError)
    err = cls(message, reason=reason or None)
    if isinstance(details, dict):
        err.details = {str(k): v for k, v in details.items()}
    return err
