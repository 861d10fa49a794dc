"""Model values and validation functions."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from memosd.errors import BadRequest
from memosd.memcube import (
    CUBE_SCHEMA_VERSION,
    CubeConfig,
    Form,
    Operation,
    Status,
    Tier,
    Usage,
    new_cube,
    validate_cube_name,
    validate_form_name,
    validate_metadata,
    validate_tags,
)
from memosd.memcube.model import (
    MAX_METADATA_DEPTH,
    validate_importance,
    validate_ttl,
    validate_validity,
)


def test_enum_values() -> None:
    assert [f.value for f in Form] == ["plaintext", "activation", "parameter"]
    assert [t.value for t in Tier] == ["short", "mid", "long"]
    assert [s.value for s in Status] == ["active", "archived", "deleted"]
    assert {o.value for o in Operation} == {
        "add", "update", "rollback", "delete", "archive", "restore", "migrate", "consolidate",
    }  # fmt: skip


@pytest.mark.parametrize("name", ["a", "x" * 128, "Cube_1.v-2", "0abc"])
def test_valid_cube_names(name: str) -> None:
    assert validate_cube_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 129, "_a", "-a", ".a", "a b", "a/b", "é", None, 5])
def test_invalid_cube_names(name: object) -> None:
    with pytest.raises(BadRequest):
        validate_cube_name(name)


@pytest.mark.parametrize("name", ["plaintext", "kv", "my.form-v2_x", "a" * 64])
def test_valid_form_names(name: str) -> None:
    assert validate_form_name(name) == name
    assert type(validate_form_name(Form.PLAINTEXT)) is str


@pytest.mark.parametrize("name", ["", "Kv", "1kv", "a" * 65, "a b", "a\n", None])
def test_invalid_form_names(name: object) -> None:
    with pytest.raises(BadRequest):
        validate_form_name(name)


def test_metadata_validation() -> None:
    value = {"a": [1, 2.5, None, True, b"x", {"b": "c"}], "big": (1 << 64) - 1}
    copied = validate_metadata(value)
    assert copied == value
    assert copied["a"] is not value["a"]
    assert validate_metadata(None) == {}


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {1: "int key"},
        {"t": (1, 2)},
        {"s": {1, 2}},
        {"o": object()},
        {"big": 1 << 64},
        {"neg": -(1 << 63) - 1},
        {"surrogate": "\ud800"},
        {"\ud800": 1},
    ],
)
def test_metadata_rejects(bad: Any) -> None:
    with pytest.raises(BadRequest):
        validate_metadata(bad)


def test_metadata_depth() -> None:
    # The metadata dict itself counts as the first level.
    ok: Any = 1
    for _ in range(MAX_METADATA_DEPTH):
        ok = {"k": ok}
    validate_metadata(ok)
    with pytest.raises(BadRequest, match="nested deeper"):
        validate_metadata({"k": ok})


def test_tags() -> None:
    assert validate_tags(["b", "a", "b"]) == ("a", "b")
    assert validate_tags(["t"] * 100) == ("t",)
    validate_tags([f"t{i}" for i in range(64)])
    for bad in (["t", ""], ["x" * 129], [1], "abc", [f"t{i}" for i in range(65)]):
        with pytest.raises(BadRequest):
            validate_tags(bad)


def test_scalar_validators() -> None:
    assert validate_importance(0) == 0.0
    assert validate_importance(1) == 1.0
    for bad in (-0.01, 1.01, float("nan"), True, "0.5"):
        with pytest.raises(BadRequest):
            validate_importance(bad)
    assert validate_ttl(None) is None
    assert validate_ttl(1) == 1
    for bad_ttl in (0, -1, 1.5, True):
        with pytest.raises(BadRequest):
            validate_ttl(bad_ttl)
    assert validate_validity(None, None) == (None, None)
    assert validate_validity(5, 5) == (5, 5)
    with pytest.raises(BadRequest):
        validate_validity(6, 5)
    with pytest.raises(BadRequest):
        validate_validity(-1, None)


def test_frozen_values() -> None:
    usage = Usage()
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.hits = 3  # type: ignore[misc]
    assert usage.hit(10) == Usage(1, 10, 0.0)
    assert usage.hit(10).hit(5) == Usage(2, 10, 0.0)  # last hit never goes back


def test_cube_config_copies_dicts() -> None:
    policy = {"capacity": 10}
    config = CubeConfig(tier_policy=policy)
    policy["capacity"] = 99
    assert config.tier_policy == {"capacity": 10}
    assert CubeConfig().embedding_model == "all-MiniLM-L6-v2"
    assert CubeConfig().embedding_dim == 384


def test_new_cube() -> None:
    cube = new_cube("demo", owner="alice", now_us=7)
    assert cube.schema_version == CUBE_SCHEMA_VERSION
    assert cube.created_us == 7
    assert cube.config == CubeConfig()
    with pytest.raises(BadRequest):
        new_cube("bad name", owner="alice", now_us=7)
    with pytest.raises(BadRequest):
        new_cube("demo", owner="", now_us=7)
    with pytest.raises(BadRequest):
        new_cube("demo", owner="alice", now_us=7, config=CubeConfig(embedding_dim=0))
    with pytest.raises(BadRequest):
        new_cube("demo", owner="alice", now_us=7, config=CubeConfig(extra={"t": (1,)}))
