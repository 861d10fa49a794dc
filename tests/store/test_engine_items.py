"""Engine behaviour: cubes, versions, history, rollback, as-of, delete, purge."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memosd.engine import ChangeEvent, Engine, EngineSettings
from memosd.errors import BadRequest, Conflict, NotFound, TooLarge
from memosd.memcube.model import CubeConfig, Usage
from memosd.store.view import HitCounts


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(tmp_path: Path, clock: FakeClock) -> Iterator[Engine]:
    with Engine.open(
        tmp_path / "data", clock=clock, settings=EngineSettings(max_text_bytes=1000)
    ) as eng:
        eng.create_cube("notes", owner="uid:1000")
        yield eng


def test_cube_lifecycle(engine: Engine) -> None:
    assert [c.name for c in engine.list_cubes()] == ["notes"]
    assert engine.get_cube("notes").owner == "uid:1000"
    with pytest.raises(Conflict):
        engine.create_cube("notes", owner="uid:1")
    with pytest.raises(BadRequest):
        engine.create_cube("bad\x00name", owner="uid:1")
    engine.add("notes", "one")
    assert engine.drop_cube("notes") == 1
    with pytest.raises(NotFound):
        engine.get_cube("notes")
    assert engine.list_cubes() == []


def test_add_get_update_history(engine: Engine) -> None:
    item = engine.add(
        "notes", "I live in Berlin", tags=("home", "fact"), session="s1", source="chat"
    )
    assert item.version == 1
    assert item.tags == ("fact", "home")
    assert item.provenance.session == "s1"
    assert engine.get("notes", item.id) == item
    v2 = engine.update("notes", item.id, text="I live in Paris", actor="uid:1000")
    assert v2.version == 2
    assert v2.created_us == item.created_us
    assert v2.recorded_us > item.recorded_us
    assert (item.id, 1) in v2.provenance.parents
    assert [v.text for v in engine.history("notes", item.id)] == [
        "I live in Berlin",
        "I live in Paris",
    ]
    assert engine.get("notes", item.id, version=1).text == "I live in Berlin"
    with pytest.raises(Conflict):
        engine.update("notes", item.id, text="stale", expected_version=1)


def test_as_of_and_rollback(engine: Engine, clock: FakeClock) -> None:
    item = engine.add("notes", "v1")
    t_after_v1 = clock.now
    engine.update("notes", item.id, text="v2")
    assert engine.get("notes", item.id, as_of_us=t_after_v1).text == "v1"
    with pytest.raises(NotFound):
        engine.get("notes", item.id, as_of_us=item.recorded_us - 1)
    v3 = engine.rollback("notes", item.id, 1)
    assert (v3.version, v3.text) == (3, "v1")
    assert v3.provenance.operation == "rollback"
    with pytest.raises(NotFound):
        engine.rollback("notes", item.id, 9)


def test_delete_is_a_tombstone_and_purge_erases(engine: Engine) -> None:
    item = engine.add("notes", "secret")
    engine.update("notes", item.id, text="secret 2")
    tomb = engine.delete("notes", item.id)
    assert tomb.status == "deleted"
    with pytest.raises(NotFound) as info:
        engine.get("notes", item.id)
    assert info.value.reason == "deleted"
    assert [v.text for v in engine.history("notes", item.id)][:2] == ["secret", "secret 2"]
    record = engine.purge("notes", item.id, reason="gdpr")
    assert record.versions == 3
    with pytest.raises(NotFound) as info:
        engine.history("notes", item.id)
    assert info.value.reason == "purged"
    purges = engine.purges("notes")
    assert [(p.id, p.versions, p.reason) for p in purges] == [(item.id, 3, "gdpr")]
    # No content survives anywhere in the export either.
    exported = engine.export_cube("notes")
    assert exported.items == []


def test_limits_and_bad_arguments(engine: Engine) -> None:
    with pytest.raises(TooLarge):
        engine.add("notes", "x" * 1001)
    with pytest.raises(NotFound):
        engine.add("nope", "x")
    with pytest.raises(BadRequest):
        engine.add("notes", "x", importance=3.0)
    with pytest.raises(NotFound):
        engine.get("notes", "01ARZ3NDEKTSV4RRFFQ69G5FAV")


def test_list_filters_and_counts(engine: Engine) -> None:
    a = engine.add("notes", "a", tier="short")
    engine.add("notes", "b", tier="long")
    c = engine.add("notes", "c", tier="long")
    engine.delete("notes", c.id)
    assert [i.text for i in engine.list_items("notes", tier="long")] == ["b"]
    assert len(engine.list_items("notes", status=None)) == 3
    assert [i.id for i in engine.list_items("notes", limit=1)] == [a.id]
    assert [i.text for i in engine.list_items("notes", after=a.id)] == ["b"]
    assert engine.count_items("notes") == {"active": 2, "archived": 0, "deleted": 1}


def test_filtered_listing_matches_filtering_every_item(engine: Engine) -> None:
    """Filters are judged from the records' fields; the result is the full-item filter's."""
    made = []
    for i in range(60):
        tier = ("short", "mid", "long")[i % 3]
        form = "plaintext" if i % 4 else "tier-segment"
        made.append(engine.add("notes", f"t{i}", tier=tier, form=form))
    for it in made[::5]:
        engine.update("notes", it.id, tier="long")  # the latest version decides
    engine.delete("notes", made[7].id)
    engine.record_hits("notes", [made[8].id], now_us=5)
    engine.checkpoint()  # flushes pending usage
    everything = engine.list_items("notes", status=None, limit=1000)
    for status in (None, "active", "deleted"):
        for tier in (None, "short", "mid", "long"):
            for form in (None, "plaintext", "tier-segment"):
                want = [
                    i
                    for i in everything
                    if (status is None or i.status == status)
                    and (tier is None or i.tier == tier)
                    and (form is None or i.form == form)
                ]
                got = engine.list_items("notes", status=status, tier=tier, form=form, limit=1000)
                assert got == want, (status, tier, form)
    # Paging through a filter: limit and after, as an unfiltered list pages.
    longs = engine.list_items("notes", tier="long", limit=1000)
    first = engine.list_items("notes", tier="long", limit=4)
    rest = engine.list_items("notes", tier="long", limit=1000, after=first[-1].id)
    assert first + rest == longs
    assert engine.list_items("notes", tier="long", limit=0) == []
    # Streamed a few at a time, the same items.
    assert list(engine.iter_items("notes", tier="long", page=4)) == longs
    assert list(engine.iter_items("notes", status=None, page=7)) == everything
    with pytest.raises(BadRequest):
        next(engine.iter_items("notes", page=0))
    assert next(i for i in longs if i.id == made[8].id).usage.hits == 1  # usage merged in


def test_flushed_hits_add_up_keep_heat_and_skip_items_gone(engine: Engine) -> None:
    kept, purged, deleted = (engine.add("notes", t) for t in ("kept", "purged", "deleted"))
    engine.record_hits("notes", [kept.id, kept.id, purged.id, deleted.id], now_us=10)
    engine.checkpoint()
    # Heat is the tier policy's to set (usage records it without touching hits).
    engine._write_txn(
        lambda view: view.put_usage("notes", kept.id, Usage(hits=2, last_hit_us=10, heat=4.5))
    )
    engine.purge("notes", purged.id)
    engine.delete("notes", deleted.id)  # a tombstone is still an item: its hits count
    engine.record_hits(
        "notes", [kept.id, purged.id, deleted.id, "01M80PSCB9NQEF9VE49P0A27P0"], now_us=20
    )
    engine.checkpoint()
    assert engine.get("notes", kept.id).usage == Usage(hits=3, last_hit_us=20, heat=4.5)
    assert engine.history("notes", deleted.id)[-1].usage.hits == 2
    with pytest.raises(NotFound):
        engine.get("notes", purged.id)
    # Neither the purged item nor the unknown id got a usage record back.
    assert engine._read(lambda view: view.usage("notes", purged.id)) is None
    assert engine._read(lambda view: view.usage("notes", "01M80PSCB9NQEF9VE49P0A27P0")) is None


def test_hits_flush_in_slices_over_cubes_with_a_pause_between(engine: Engine) -> None:
    engine.create_cube("other", owner="alice")
    # More items than one slice, hit in an order unlike the key order.
    notes = engine.atomic(lambda p: [p.add("notes", f"n{i}").id for i in range(150)])
    others = engine.atomic(lambda p: [p.add("other", f"o{i}").id for i in range(70)])
    hit_notes = notes[::-1] + notes[::3]  # every item once, each third one twice
    engine.record_hits("notes", hit_notes, now_us=40)
    engine.record_hits("other", others, now_us=41)
    with engine._usage_lock:
        pending, engine._pending_hits = engine._pending_hits, HitCounts()
    pauses: list[int] = []
    engine._write_txn(
        lambda view: pauses.append(view.add_hits(pending, pause=lambda: pauses.append(-1)))
    )
    assert pauses[-1] == 150 + 70  # every record written
    # A pause between two slices: ceil(150 / 64) + ceil(70 / 64) slices.
    assert pauses.count(-1) == 3 + 2 - 1
    twice = set(notes[::3])
    for item_id in notes:
        want = 1 + (item_id in twice)
        assert engine.get("notes", item_id).usage == Usage(hits=want, last_hit_us=40)
    assert {engine.get("other", i).usage.hits for i in others} == {1}


def test_usage_hits_are_batched_without_new_versions(engine: Engine) -> None:
    item = engine.add("notes", "hot")
    lsn = engine.status()["last_lsn"]
    engine.record_hits("notes", [item.id, item.id], now_us=123)
    engine.checkpoint()  # flushes pending usage
    got = engine.get("notes", item.id)
    assert (got.usage.hits, got.usage.last_hit_us, got.version) == (2, 123, 1)
    assert engine.status()["last_lsn"] == lsn  # no WAL record per hit


def test_grants_and_tokens(engine: Engine) -> None:
    engine.set_grant("notes", "uid:7", "read")
    engine.set_grant("notes", "token:bob", "write")
    assert engine.grants("notes") == {"uid:7": "read", "token:bob": "write"}
    engine.set_grant("notes", "uid:7", None)
    assert engine.grants("notes") == {"token:bob": "write"}
    with pytest.raises(BadRequest):
        engine.set_grant("notes", "uid:7", "admin")
    engine.put_token("bob", token_hash=b"h" * 32, principal="token:bob")
    with pytest.raises(Conflict):
        engine.put_token("bob", token_hash=b"i" * 32, principal="token:bob")
    assert engine.token_by_hash(b"h" * 32) is not None
    engine.delete_token("bob")
    assert engine.token_by_hash(b"h" * 32) is None
    assert engine.tokens() == []


def test_export_import_roundtrip(engine: Engine) -> None:
    item = engine.add("notes", "v1", metadata={"k": [1, 2]})
    engine.update("notes", item.id, text="v2")
    engine.set_grant("notes", "uid:9", "read")
    exported = engine.export_cube("notes")
    engine.import_cube(exported, name="copy", owner="uid:5")
    assert [v.text for v in engine.history("copy", item.id)] == ["v1", "v2"]
    assert engine.get_cube("copy").owner == "uid:5"
    assert engine.grants("copy") == {"uid:9": "read"}
    with pytest.raises(Conflict):
        engine.import_cube(exported)


def test_listeners_hear_acknowledged_changes(engine: Engine) -> None:
    events: list[ChangeEvent] = []
    engine.add_listener(events.append)
    item = engine.add("notes", "x")
    engine.delete("notes", item.id)
    assert [(e.kind, e.item_id, e.version) for e in events] == [
        ("item_written", item.id, 1),
        ("item_deleted", item.id, 2),
    ]
    assert events[0].lsn < events[1].lsn


def test_state_survives_reopen(tmp_path: Path) -> None:
    with Engine.open(tmp_path) as eng:
        eng.create_cube("c", owner="uid:0")
        item = eng.add("c", "persist me")
        eng.update("c", item.id, text="persisted")
    with Engine.open(tmp_path) as eng:
        assert [v.text for v in eng.history("c", item.id)] == ["persist me", "persisted"]
        assert eng.recovery["replayed_records"] == 0  # clean close checkpointed everything


def test_get_many_reads_latest_versions_in_one_call(engine: Engine) -> None:
    a = engine.add("notes", "first")
    b = engine.add("notes", "second")
    c = engine.add("notes", "third")
    engine.update("notes", a.id, text="first, edited")
    engine.delete("notes", b.id)
    engine.purge("notes", c.id)
    got = engine.get_many("notes", [a.id, b.id, c.id, "01NOTANITEM0000000000000000"])
    assert got[0] is not None
    assert (got[0].text, got[0].version) == ("first, edited", 2)
    assert got[1:] == [None, None, None]  # deleted, purged, never existed
    assert engine.get_many("nope", [a.id]) == [None]
    assert engine.get_many("notes", []) == []


def test_reads_reuse_decoded_records_but_never_serve_stale_ones(engine: Engine) -> None:
    item = engine.add("notes", "v1", metadata={"k": 1})
    first = engine.get("notes", item.id)
    assert engine.get("notes", item.id) is first  # decoded once, same bytes
    assert engine.get_many("notes", [item.id]) == [first]
    # New usage bytes: the cached decode is reused, the usage is not.
    engine.record_hits("notes", [item.id], now_us=77)
    engine.checkpoint()
    hit = engine.get("notes", item.id)
    assert (hit.usage.hits, hit.usage.last_hit_us, hit.text) == (1, 77, "v1")
    assert engine.get_many("notes", [item.id]) == [hit]  # the batch read merges usage too
    # New versions, rollback and history read what is stored now.
    engine.update("notes", item.id, text="v2")
    assert engine.get("notes", item.id).text == "v2"
    engine.rollback("notes", item.id, 1)
    assert [(v.version, v.text) for v in engine.history("notes", item.id)] == [
        (1, "v1"),
        (2, "v2"),
        (3, "v1"),
    ]
    assert all(v.usage.hits == 1 for v in engine.history("notes", item.id))
    engine.purge("notes", item.id)
    with pytest.raises(NotFound):
        engine.get("notes", item.id)
    assert engine.get_many("notes", [item.id]) == [None]


def test_a_recreated_cube_is_read_with_its_new_config(engine: Engine) -> None:
    engine.create_cube("tmp", owner="uid:1", config=CubeConfig(tier_policy={"short_max_items": 5}))
    assert engine.get_cube("tmp").config.tier_policy == {"short_max_items": 5}
    engine.drop_cube("tmp")
    with pytest.raises(NotFound):
        engine.get_cube("tmp")
    engine.create_cube("tmp", owner="uid:2")
    cube = engine.get_cube("tmp")
    assert (cube.owner, cube.config.tier_policy) == ("uid:2", {})
