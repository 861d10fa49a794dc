"""Access control: every op for every role, through the real daemon.

Roles are tokens created by the admin (tests run as root, which is admin):
owner (created the cube), writer (write grant), reader (read grant),
stranger (no grant) and admin (uid 0, no token).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from memosd.client import Client
from memosd.errors import Forbidden, MemosError, NotFound, Unauthorized
from memosd.testing import DaemonHandle

ROLES = ("owner", "writer", "reader", "stranger", "admin")
OK = None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    daemon = DaemonHandle(tmp_path_factory.mktemp("acl")).start()
    admin = daemon.client()
    clients = {"admin": admin}
    for role in ("owner", "writer", "reader", "stranger"):
        clients[role] = daemon.client(token=admin.token_create(role))
    yield {"daemon": daemon, "clients": clients, "n": itertools.count()}
    for c in clients.values():
        c.close()
    daemon.cleanup()


def fresh_cube(world: dict[str, Any]) -> tuple[str, str]:
    """A new cube owned by token:owner with grants, holding one item (two versions)."""
    owner: Client = world["clients"]["owner"]
    name = f"cube{next(world['n'])}"
    owner.create_cube(name)
    owner.grant(name, "token:writer", "write")
    owner.grant(name, "token:reader", "read")
    item = owner.add(name, "secret plans for the weekend")
    owner.update(name, item.id, "new plans")
    return name, item.id


def _export(c: Client, cube: str, item: str) -> Any:
    return c.export_cube(cube)


OPS: dict[str, Callable[[Client, str, str], Any]] = {
    "get_cube": lambda c, cube, item: c.get_cube(cube),
    "get": lambda c, cube, item: c.get(cube, item),
    "history": lambda c, cube, item: c.history(cube, item),
    "list_items": lambda c, cube, item: c.list_items(cube),
    "search": lambda c, cube, item: c.search(cube, "plans"),
    "add": lambda c, cube, item: c.add(cube, "more"),
    "add_many": lambda c, cube, item: c.add_many(cube, ["more", {"text": "and more"}]),
    "update": lambda c, cube, item: c.update(cube, item, "changed"),
    "rollback": lambda c, cube, item: c.rollback(cube, item, 1),
    "delete": lambda c, cube, item: c.delete(cube, item),
    "purge": lambda c, cube, item: c.purge(cube, item),
    "grant": lambda c, cube, item: c.grant(cube, "uid:4242", "read"),
    "revoke": lambda c, cube, item: c.revoke(cube, "token:reader"),
    "drop_cube": lambda c, cube, item: c.drop_cube(cube),
    "export_cube": _export,
}

READ, WRITE, OWN = "read", "write", "owner"
NEEDS = {
    "get_cube": READ,
    "get": READ,
    "history": READ,
    "list_items": READ,
    "search": READ,
    "add": WRITE,
    "add_many": WRITE,
    "update": WRITE,
    "rollback": WRITE,
    "delete": WRITE,
    "purge": WRITE,
    "grant": OWN,
    "revoke": OWN,
    "drop_cube": OWN,
    "export_cube": OWN,
}
RANK = {"stranger": 0, "reader": 1, "writer": 2, "owner": 3, "admin": 3}
LEVEL_RANK = {READ: 1, WRITE: 2, OWN: 3}


def expected(op: str, role: str) -> type[MemosError] | None:
    have = RANK[role]
    if have == 0:
        return NotFound
    return OK if have >= LEVEL_RANK[NEEDS[op]] else Forbidden


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_cube_op_per_role(world: dict[str, Any], op: str, role: str) -> None:
    cube, item = fresh_cube(world)
    client: Client = world["clients"][role]
    want = expected(op, role)
    if want is None:
        OPS[op](client, cube, item)
    else:
        with pytest.raises(want) as info:
            OPS[op](client, cube, item)
        assert type(info.value) is want
        if want is NotFound:
            assert "secret" not in info.value.message


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    "op", ["token_create", "token_list", "token_revoke", "checkpoint", "wal_verify"]
)
def test_admin_ops_per_role(world: dict[str, Any], op: str, role: str) -> None:
    client: Client = world["clients"][role]
    admin: Client = world["clients"]["admin"]
    name = f"tmp{next(world['n'])}"
    admin.token_create(name)
    calls: dict[str, Callable[[], Any]] = {
        "token_create": lambda: client.token_create(name + "x"),
        "token_list": client.token_list,
        "token_revoke": lambda: client.token_revoke(name),
        "checkpoint": client.checkpoint,
        "wal_verify": client.wal_verify,
    }
    if role == "admin":
        calls[op]()
    else:
        with pytest.raises(Forbidden):
            calls[op]()


@pytest.mark.parametrize("role", ROLES)
def test_list_cubes_shows_only_readable(world: dict[str, Any], role: str) -> None:
    cube, _ = fresh_cube(world)
    names = {c.name for c in world["clients"][role].list_cubes()}
    assert (cube in names) == (role != "stranger")


@pytest.mark.parametrize("role", ROLES)
def test_session_ops_for_everyone(world: dict[str, Any], role: str) -> None:
    client: Client = world["clients"][role]
    client.ping()
    who = client.whoami()
    assert who["principal"] == ("uid:0" if role == "admin" else f"token:{role}")
    status = client.status()
    assert ("engine" in status) == (role == "admin")
    assert ("process" in status) == (role == "admin")  # memory and GC pauses
    own = client.create_cube(f"own-{role}-{next(world['n'])}")
    assert own.owner == who["principal"]
    assert own.access == "owner"
    if role != "admin":
        with pytest.raises(Forbidden):
            client.create_cube(f"x{next(world['n'])}", owner="uid:999")
    data = world["clients"]["owner"].export_cube(fresh_cube(world)[0])
    imported = client.import_cube(data, name=f"imp-{role}-{next(world['n'])}")
    assert imported.owner == who["principal"]


def test_revoked_token_is_unauthorized(world: dict[str, Any]) -> None:
    admin: Client = world["clients"]["admin"]
    secret = admin.token_create("shortlived")
    daemon: DaemonHandle = world["daemon"]
    with daemon.client(token=secret) as c:
        c.ping()
        admin.token_revoke("shortlived")
        with pytest.raises(Unauthorized):
            c.ping()
    with daemon.client(token="mtk_forged") as c, pytest.raises(Unauthorized):
        c.ping()


def test_grant_and_revoke_take_effect(world: dict[str, Any]) -> None:
    cube, item = fresh_cube(world)
    owner: Client = world["clients"]["owner"]
    stranger: Client = world["clients"]["stranger"]
    with pytest.raises(NotFound):
        stranger.get(cube, item)
    owner.grant(cube, "token:stranger", "read")
    assert stranger.get(cube, item).text == "new plans"
    with pytest.raises(Forbidden):
        stranger.add(cube, "x")
    owner.revoke(cube, "token:stranger")
    with pytest.raises(NotFound):
        stranger.get(cube, item)
