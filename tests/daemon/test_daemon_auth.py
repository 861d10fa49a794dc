"""Pure tests of memosd.auth: peer parsing, principals, levels."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from memosd.auth import (
    Identity,
    Peer,
    access_level,
    hash_token,
    parse_peer_address,
    require_level,
    resolve_identity,
    validate_principal,
)
from memosd.errors import BadRequest, Forbidden, NotFound, Unauthorized


@pytest.mark.parametrize(
    ("raw", "peer"),
    [
        ("localhost:1234:4321:4352", Peer(1234, 4321, 4352)),  # libzmq 4.3.5 here
        ("1000:1000:77", Peer(1000, 1000, 77)),
        ("", None),
        (None, None),
        ("garbage", None),
        ("a:b:c", None),
    ],
)
def test_parse_peer_address(raw: str | None, peer: Peer | None) -> None:
    assert parse_peer_address(raw) == peer


@dataclass
class Tok:
    name: str
    principal: str


class Tokens:
    def __init__(self) -> None:
        self.by_hash = {hash_token("s3cret"): Tok("bob", "token:bob")}

    def token_by_hash(self, token_hash: bytes) -> Tok | None:
        return self.by_hash.get(token_hash)


def test_identity_from_uid_and_token() -> None:
    peer = Peer(1000, 1000, 1)
    ident = resolve_identity(peer, None, Tokens(), [0])
    assert (ident.principal, ident.admin) == ("uid:1000", False)
    assert resolve_identity(Peer(0, 0, 1), None, Tokens(), [0]).admin
    via = resolve_identity(Peer(0, 0, 1), "s3cret", Tokens(), [0])
    assert (via.principal, via.admin, via.token) == ("token:bob", False, "bob")
    with pytest.raises(Unauthorized):
        resolve_identity(peer, "wrong", Tokens(), [0])
    with pytest.raises(Unauthorized):
        resolve_identity(None, None, Tokens(), [0])


def test_levels() -> None:
    alice = Identity("uid:1", None, admin=False)
    admin = Identity("uid:0", None, admin=True)
    assert access_level(alice, "uid:1", {}) == "owner"
    assert access_level(admin, "uid:1", {}) == "owner"
    assert access_level(alice, "uid:2", {"uid:1": "read"}) == "read"
    assert access_level(alice, "uid:2", {}) is None
    with pytest.raises(NotFound):
        require_level(None, "read", "c")
    with pytest.raises(Forbidden):
        require_level("read", "write", "c")
    require_level("write", "read", "c")


def test_validate_principal() -> None:
    assert validate_principal("uid:5") == "uid:5"
    assert validate_principal("token:x") == "token:x"
    for bad in ("uid:", "uid:x", "root", "token:", 5):
        with pytest.raises(BadRequest):
            validate_principal(bad)
