"""Version rules: update chains, rollback, tombstones, archive, as_of, diff, conflicts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memosd.errors import BadRequest, Conflict, NotFound
from memosd.memcube import (
    CONTENT_FIELDS,
    NOT_GIVEN,
    REVISABLE_FIELDS,
    MemoryItem,
    Operation,
    Status,
    archive,
    as_of,
    conversation,
    diff,
    latest,
    new_id,
    new_item,
    restore,
    revise,
    rollback,
    tombstone,
)

T0 = 1_700_000_000_000_000
ID = new_id(T0, lambda n: b"\x01" * n)
OTHER = new_id(T0, lambda n: b"\x02" * n)


def first(**kw: object) -> MemoryItem:
    args: dict[str, object] = {"id": ID, "cube": "cube-1", "text": "v1", "now_us": T0}
    args.update(kw)
    return new_item(**args)  # type: ignore[arg-type]


def test_new_item_defaults() -> None:
    item = first(tags=["b", "a", "b"], actor="alice", metadata={"k": [1]})
    assert item.version == 1
    assert item.status == Status.ACTIVE
    assert item.is_live
    assert item.form == "plaintext"
    assert item.tier == "short"
    assert item.created_us == item.recorded_us == T0
    assert item.tags == ("a", "b")
    assert item.provenance.operation == Operation.ADD
    assert item.provenance.parents == ()
    assert item.provenance.actor == "alice"
    assert item.usage.hits == 0
    assert item.importance == 0.5
    assert item.expires_at_us is None


def test_new_item_copies_metadata() -> None:
    meta = {"k": [1, 2]}
    item = first(metadata=meta)
    meta["k"].append(3)
    assert item.metadata == {"k": [1, 2]}


@pytest.mark.parametrize(
    "kw",
    [
        {"id": "not-an-id"},
        {"cube": "bad cube"},
        {"form": "Bad"},
        {"tier": "huge"},
        {"text": 5},
        {"importance": 1.5},
        {"importance": float("nan")},
        {"ttl_s": 0},
        {"valid_from_us": 10, "valid_to_us": 5},
        {"tags": [""]},
        {"tags": "abc"},
        {"metadata": {"k": (1, 2)}},
        {"parents": [("nope", 1)]},
        {"operation": "frobnicate"},
        {"now_us": -1},
    ],
)
def test_new_item_rejects(kw: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        first(**kw)


def test_plugin_form_and_ttl() -> None:
    item = first(form="kv.llama-3_8b", ttl_s=60)
    assert item.form == "kv.llama-3_8b"
    assert item.expires_at_us == T0 + 60_000_000
    assert not item.is_expired(T0 + 59_999_999)
    assert item.is_expired(T0 + 60_000_000)


def test_update_chain() -> None:
    v1 = first(tags=["x"], ttl_s=10, metadata={"a": 1})
    v2 = revise(v1, now_us=T0 + 5, actor="bob", text="v2", session="s1")
    v3 = revise(v2, now_us=T0 + 9, actor="bob", ttl_s=None, metadata=None, importance=1)
    assert [v.version for v in (v1, v2, v3)] == [1, 2, 3]
    assert v2.text == "v2"
    assert v2.tags == ("x",)  # not given: kept
    assert v2.ttl_s == 10
    assert v3.ttl_s is None  # None is a value, not "not given"
    assert v3.metadata == {}
    assert v3.importance == 1.0
    assert isinstance(v3.importance, float)
    assert v3.created_us == T0
    assert v3.recorded_us == T0 + 9
    assert v2.provenance.parents == ((ID, 1),)
    assert v3.provenance.parents == ((ID, 2),)
    assert v2.provenance.operation == Operation.UPDATE
    assert v2.provenance.session == "s1"
    assert v3.provenance.session is None
    # the old version is untouched
    assert v1.text == "v1"
    assert v1.version == 1


def test_revise_explicit_not_given_keeps() -> None:
    v1 = first(payload={"blob": "sha256:ab"})
    v2 = revise(v1, now_us=T0, actor=None, payload=NOT_GIVEN, text=NOT_GIVEN)
    assert v2.payload == {"blob": "sha256:ab"}
    v3 = revise(v2, now_us=T0, actor=None, payload=None)
    assert v3.payload is None


def test_recorded_time_is_clamped() -> None:
    v1 = first()
    v2 = revise(v1, now_us=T0 - 1_000_000, actor=None, text="clock stepped back")
    assert v2.recorded_us == T0


def test_extra_parents_and_operation() -> None:
    v1 = first()
    v2 = revise(
        v1,
        now_us=T0 + 1,
        actor="consolidator",
        operation=Operation.CONSOLIDATE,
        extra_parents=[(OTHER, 3), (ID, 1)],
        tier="long",
    )
    assert v2.provenance.parents == ((ID, 1), (OTHER, 3))
    assert v2.provenance.operation == "consolidate"
    assert v2.tier == "long"


def test_expected_version_conflict() -> None:
    v1 = first()
    v2 = revise(v1, now_us=T0 + 1, actor=None, text="b", expected_version=1)
    with pytest.raises(Conflict) as info:
        revise(v2, now_us=T0 + 2, actor=None, text="c", expected_version=1)
    assert info.value.reason == "version_mismatch"
    with pytest.raises(Conflict):
        tombstone(v2, now_us=T0 + 2, actor=None, expected_version=1)
    with pytest.raises(Conflict):
        rollback([v1, v2], 1, now_us=T0 + 2, actor=None, expected_version=1)


def test_tombstone_and_update_of_deleted() -> None:
    v1 = first(tags=["secret"], metadata={"a": 1}, payload={"p": 1}, tier="mid")
    v2 = tombstone(v1, now_us=T0 + 1, actor="alice")
    assert v2.status == Status.DELETED
    assert not v2.is_live
    assert (v2.text, v2.metadata, v2.payload, v2.tags) == ("", {}, None, ())
    assert v2.tier == "mid"
    assert v2.provenance.operation == Operation.DELETE
    assert v2.provenance.parents == ((ID, 1),)
    with pytest.raises(Conflict) as info:
        revise(v2, now_us=T0 + 2, actor=None, text="again")
    assert info.value.reason == "deleted"
    with pytest.raises(Conflict) as info:
        tombstone(v2, now_us=T0 + 2, actor=None)
    assert info.value.reason == "deleted"
    with pytest.raises(Conflict):
        archive(v2, now_us=T0 + 2, actor=None)


def test_revise_cannot_delete() -> None:
    v1 = first()
    with pytest.raises(BadRequest):
        revise(v1, now_us=T0, actor=None, status=Status.DELETED)
    with pytest.raises(BadRequest):
        revise(v1, now_us=T0, actor=None, operation=Operation.DELETE)


def test_archive_and_restore() -> None:
    v1 = first()
    v2 = archive(v1, now_us=T0 + 1, actor=None, valid_to_us=T0 + 1)
    assert v2.status == Status.ARCHIVED
    assert v2.valid_to_us == T0 + 1
    assert v2.provenance.operation == Operation.ARCHIVE
    with pytest.raises(Conflict):
        archive(v2, now_us=T0 + 2, actor=None)
    v3 = restore(v2, now_us=T0 + 2, actor=None)
    assert v3.status == Status.ACTIVE
    assert v3.provenance.operation == Operation.RESTORE
    with pytest.raises(Conflict):
        restore(v3, now_us=T0 + 3, actor=None)


def test_revise_validity_checked_against_kept_bound() -> None:
    v1 = first(valid_from_us=100)
    with pytest.raises(BadRequest):
        revise(v1, now_us=T0, actor=None, valid_to_us=50)


def test_rollback() -> None:
    v1 = first(tags=["a"], metadata={"m": 1}, ttl_s=5)
    v2 = revise(v1, now_us=T0 + 1, actor=None, text="v2", tags=["b"], metadata={}, ttl_s=None)
    v3 = tombstone(v2, now_us=T0 + 2, actor=None)
    history = [v3, v1, v2]  # any order
    v4 = rollback(history, 1, now_us=T0 + 3, actor="alice")
    assert v4.version == 4
    for name in CONTENT_FIELDS:
        assert getattr(v4, name) == getattr(v1, name), name
    assert v4.status == Status.ACTIVE  # rollback undeletes
    assert v4.provenance.operation == Operation.ROLLBACK
    assert v4.provenance.parents == ((ID, 3), (ID, 1))
    assert v4.created_us == T0
    assert v4.recorded_us == T0 + 3
    with pytest.raises(NotFound):
        rollback(history, 9, now_us=T0 + 3, actor=None)
    same = rollback([v1], 1, now_us=T0 + 4, actor=None)
    assert same.provenance.parents == ((ID, 1),)
    assert same.version == 2


def test_history_checks() -> None:
    v1 = first()
    other = new_item(id=OTHER, cube="cube-1", text="x", now_us=T0)
    with pytest.raises(BadRequest):
        latest([])
    with pytest.raises(BadRequest):
        latest([v1, other])
    with pytest.raises(BadRequest):
        latest([v1, v1])


def test_as_of_boundaries() -> None:
    v1 = first()
    v2 = revise(v1, now_us=T0 + 10, actor=None, text="v2")
    v3 = revise(v2, now_us=T0 + 10, actor=None, text="v3")  # same instant as v2
    v4 = tombstone(v3, now_us=T0 + 20, actor=None)
    history = [v4, v2, v3, v1]
    assert as_of(history, T0 - 1) is None
    assert as_of(history, T0) is v1
    assert as_of(history, T0 + 9) is v1
    assert as_of(history, T0 + 10) is v3  # the higher version wins a tie
    assert as_of(history, T0 + 19) is v3
    assert as_of(history, T0 + 20) is v4
    assert as_of(history, T0 + 10**9) is v4
    assert as_of([], T0) is None


def test_conversation_is_the_latest_session_named() -> None:
    v1 = first(session="s1")
    v2 = revise(v1, now_us=T0 + 1, actor="scheduler", tier="mid")  # outside any session
    assert v2.provenance.session is None
    assert conversation([v2, v1]) == "s1"
    v3 = revise(v2, now_us=T0 + 2, actor="bob", text="moved", session="s2")
    v4 = revise(v3, now_us=T0 + 3, actor=None, tags=["x"])
    assert conversation([v4, v1, v3, v2]) == "s2"  # any order: the highest version decides
    assert conversation([first()]) is None
    assert conversation([]) is None


def test_diff() -> None:
    v1 = first(tags=["a"])
    v2 = revise(v1, now_us=T0 + 1, actor="bob", text="new", tags=["a"])
    changes = diff(v1, v2)
    assert set(changes) == {"version", "text", "recorded_us", "provenance"}
    assert changes["text"] == ("v1", "new")
    assert changes["version"] == (1, 2)
    assert diff(v1, v1) == {}


_edits = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=20)}),
    st.fixed_dictionaries({"tags": st.lists(st.sampled_from(["a", "b", "c"]), max_size=3)}),
    st.fixed_dictionaries({"tier": st.sampled_from(["short", "mid", "long"])}),
    st.fixed_dictionaries({"importance": st.floats(0, 1)}),
    st.fixed_dictionaries({"ttl_s": st.none() | st.integers(1, 10**6)}),
    st.just({"delete": True}),
    st.integers(1, 8).map(lambda v: {"rollback": v}),
)


@given(st.lists(st.tuples(_edits, st.integers(-5, 50)), max_size=15))
def test_random_chains_keep_invariants(steps: list[tuple[dict[str, object], int]]) -> None:
    history = [first()]
    now = T0
    for edit, dt in steps:
        now += dt
        current = history[-1]
        try:
            if "delete" in edit:
                nxt = tombstone(current, now_us=now, actor=None)
            elif "rollback" in edit:
                nxt = rollback(history, edit["rollback"], now_us=now, actor=None)  # type: ignore[arg-type]
            else:
                nxt = revise(current, now_us=now, actor=None, **edit)  # type: ignore[arg-type]
        except Conflict:
            assert current.status == Status.DELETED
            continue
        except NotFound:
            assert edit["rollback"] > current.version  # type: ignore[operator]
            continue
        assert nxt.version == current.version + 1
        assert nxt.recorded_us >= current.recorded_us
        assert nxt.created_us == T0
        assert nxt.provenance.parents[0] == (ID, current.version)
        assert list(nxt.tags) == sorted(set(nxt.tags))
        history.append(nxt)
    for item in history:
        assert as_of(history, item.recorded_us).recorded_us == item.recorded_us  # type: ignore[union-attr]
    assert latest(history) is history[-1]


def test_revisable_fields_are_revise_keywords() -> None:
    import inspect

    params = inspect.signature(revise).parameters
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in REVISABLE_FIELDS)
    v1 = first()
    samples = {"extra_parents": [(OTHER, 1)], "source": "api", "session": "s"}
    for name in REVISABLE_FIELDS:
        value = samples.get(name, getattr(v1, name, None))
        revise(v1, now_us=T0, actor=None, **{name: value})
