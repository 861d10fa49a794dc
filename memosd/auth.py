"""Who is asking, and may they do this?  Principals, tokens and cube access.

Pure policy over values the engine stores; the engine itself checks nothing.

* The default principal of a request is its peer's uid, ``uid:N``, which the
  kernel reports for every IPC connection (ZeroMQ's ``Peer-Address`` message
  property, read by the server).
* A ``token`` in the request header, if its SHA-256 matches a stored token,
  replaces that principal by the token's principal (``token:NAME`` unless the
  admin chose another).  An unknown token is :class:`Unauthorized`.
* Admins are ``uid:0``, the daemon's own uid and ``settings.auth.admin_uids``.
* Cube access levels, lowest to highest: ``read`` < ``write`` < ``owner``;
  admins act as owner of every cube.  A principal with no level on a cube gets
  :class:`NotFound` (it must not learn the cube exists); one with a level too
  low gets :class:`Forbidden`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from memosd.errors import BadRequest, Forbidden, NotFound, Unauthorized

__all__ = [
    "LEVELS",
    "Identity",
    "Level",
    "Peer",
    "TokenLookup",
    "access_level",
    "hash_token",
    "new_token_secret",
    "parse_peer_address",
    "require_admin",
    "require_level",
    "resolve_identity",
    "validate_principal",
]

Level = Literal["read", "write", "owner"]
LEVELS: Final[dict[str, int]] = {"read": 1, "write": 2, "owner": 3}
TOKEN_PREFIX: Final = "mtk_"
MAX_TOKEN_LENGTH: Final = 256


@dataclass(frozen=True, slots=True)
class Peer:
    """The kernel's view of the connected process (SO_PEERCRED at connect time)."""

    uid: int
    gid: int
    pid: int


@dataclass(frozen=True, slots=True)
class Identity:
    principal: str
    peer: Peer | None
    admin: bool
    token: str | None = None  # token name when a token was used


class _TokenRecord(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def principal(self) -> str: ...


class TokenLookup(Protocol):
    def token_by_hash(self, token_hash: bytes) -> _TokenRecord | None: ...


def parse_peer_address(value: str | None) -> Peer | None:
    """Parse ZeroMQ's ``Peer-Address`` property of an ipc connection.

    libzmq 4.3 on Linux reports ``"<host>:<uid>:<gid>:<pid>"`` (measured here:
    ``"localhost:1234:4321:4352"``); older builds omit the host part.  The last
    three fields are taken, so both shapes parse.
    """
    if not value:
        return None
    parts = value.rsplit(":", 3)
    if len(parts) < 3:
        return None
    try:
        uid, gid, pid = (int(p) for p in parts[-3:])
    except ValueError:
        return None
    if uid < 0 or gid < 0:
        return None
    return Peer(uid=uid, gid=gid, pid=pid)


def hash_token(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def new_token_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def resolve_identity(
    peer: Peer | None,
    token: str | None,
    tokens: TokenLookup,
    admin_uids: Iterable[int],
) -> Identity:
    """The principal a request acts as.  Raises Unauthorized for a bad token."""
    admins = {f"uid:{u}" for u in admin_uids}
    if token is not None:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("invalid token", reason="bad_token")
        record = tokens.token_by_hash(hash_token(token))
        if record is None:
            raise Unauthorized("invalid or revoked token", reason="bad_token")
        principal = record.principal
        return Identity(principal, peer, principal in admins, token=record.name)
    if peer is None:
        raise Unauthorized(
            "peer credentials are not available; present a token", reason="no_credentials"
        )
    principal = f"uid:{peer.uid}"
    return Identity(principal, peer, principal in admins)


def access_level(identity: Identity, owner: str, grants: Mapping[str, str]) -> str | None:
    """The identity's level on a cube with this owner and these grants, or None."""
    if identity.admin or identity.principal == owner:
        return "owner"
    level = grants.get(identity.principal)
    return level if level in LEVELS else None


def require_level(level: str | None, needed: str, cube: str) -> None:
    """NotFound without any access (hides existence), Forbidden when too low."""
    if level is None:
        raise NotFound(f"cube {cube!r} not found", reason="cube")
    if LEVELS[level] < LEVELS[needed]:
        raise Forbidden(f"{needed} access to cube {cube!r} is required (you have {level})")


def validate_principal(value: object, what: str = "principal") -> str:
    """``uid:N`` or ``token:NAME`` (the two shapes the daemon produces)."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string", reason="bad_principal")
    kind, _, rest = value.partition(":")
    if kind == "uid" and rest.isdigit() and len(rest) <= 10:
        return value
    if kind == "token" and rest and len(rest) <= 128 and rest.isprintable() and ":" not in rest:
        return value
    raise BadRequest(
        f"{what} must look like 'uid:N' or 'token:NAME', got {value!r}", reason="bad_principal"
    )


def require_admin(identity: Identity, op: str) -> None:
    if not identity.admin:
        raise Forbidden(f"{op} needs an admin", reason="admin_only")
