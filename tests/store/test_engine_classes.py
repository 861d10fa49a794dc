"""The ``classes`` index: a cube's items by (status, tier, form), for tier scans.

A scan that names all three (the scheduler's "active short plaintext")
reads through the index; every other scan reads every item.  Both must
list the same items, in id order, after any history of writes, a replay
and a rebuild of the index for a store written without it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import lmdb

from memosd.engine import Engine, EngineSettings
from memosd.memcube.model import Status, Tier
from memosd.store import view as view_module

FORMS = ("plaintext", "segment")
STATUSES = (Status.ACTIVE, Status.ARCHIVED, Status.DELETED)
TIERS = (Tier.SHORT, Tier.MID, Tier.LONG)


def _write_history(engine: Engine, rng: random.Random, n: int) -> None:
    """Adds, tier moves, archives, deletes, rollbacks and purges, at random."""
    ids: list[str] = []
    for i in range(n):
        roll = rng.random()
        if not ids or roll < 0.4:
            form = rng.choice(FORMS)
            ids.append(engine.add("c", f"m{i}", form=form, tier=rng.choice(TIERS)).id)
            continue
        item_id = rng.choice(ids)
        latest = engine.history("c", item_id)[-1]
        alive = latest.status != Status.DELETED
        if roll < 0.6 and alive:
            engine.update("c", item_id, tier=rng.choice(TIERS))
        elif roll < 0.7 and alive:
            engine.update("c", item_id, text=f"text {i}")  # same class
        elif roll < 0.8 and latest.status == Status.ACTIVE:
            engine.archive("c", item_id)
        elif roll < 0.88 and latest.status != Status.DELETED:
            engine.delete("c", item_id)
        elif roll < 0.96 and latest.version > 1:
            engine.rollback("c", item_id, rng.randrange(1, latest.version))
        else:
            engine.purge("c", item_id)
            ids.remove(item_id)


def _assert_index_matches_scan(engine: Engine) -> None:
    everything = engine.list_items("c", status=None, limit=100_000)
    for status in STATUSES:
        for tier in TIERS:
            for form in FORMS:
                expected = [
                    i.id for i in everything if (i.status, i.tier, i.form) == (status, tier, form)
                ]
                got = [
                    i.id
                    for i in engine.iter_items("c", status=status, tier=tier, form=form, page=3)
                ]
                assert got == expected, (status, tier, form)
                listed = engine.list_items("c", status=status, tier=tier, form=form, limit=5)
                assert [i.id for i in listed] == expected[:5]
                assert all(i.status == Status.DELETED or i == engine.get("c", i.id) for i in listed)


def test_class_scans_list_what_a_full_scan_does(tmp_path: Path) -> None:
    with Engine.open(tmp_path) as engine:
        engine.create_cube("c", owner="uid:0")
        engine.create_cube("other", owner="uid:0")
        engine.add("other", "not in c", form="plaintext")
        _write_history(engine, random.Random(7), 400)
        _assert_index_matches_scan(engine)


def test_the_index_survives_replay_and_is_rebuilt_for_an_old_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = EngineSettings(checkpoint_interval_s=3600, checkpoint_wal_bytes=1 << 40)
    engine = Engine.open(data, settings=settings, boot_id="boot-A")
    engine.create_cube("c", owner="uid:0")
    _write_history(engine, random.Random(11), 150)
    engine.checkpoint()
    _write_history(engine, random.Random(12), 150)  # only in the WAL for LMDB's checkpoint
    image = tmp_path / "image"
    shutil.copytree(data, image)
    engine.close()
    # As after a power loss: LMDB back at its checkpoint, the rest replayed.
    with Engine.open(image, boot_id="boot-B") as recovered:
        assert recovered.recovery["replayed_records"] > 0
        _assert_index_matches_scan(recovered)
    # A store written before the index existed: no entries, no "indexed" mark.
    env = lmdb.open(str(data / "store"), max_dbs=32)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"classes", txn=txn), delete=False)
        txn.delete(view_module._CLASSES_INDEXED, db=env.open_db(b"meta", txn=txn))
    env.close()
    with Engine.open(data) as reopened:
        _assert_index_matches_scan(reopened)


def test_dropping_a_cube_drops_its_index_entries(tmp_path: Path) -> None:
    with Engine.open(tmp_path) as engine:
        engine.create_cube("c", owner="uid:0")
        for i in range(5):
            engine.add("c", f"m{i}")
        engine.drop_cube("c")
        engine.create_cube("c", owner="uid:0")
        assert engine.list_items("c", status="active", tier="short", form="plaintext") == []
        fresh = engine.add("c", "again")
        assert engine.list_items("c", status="active", tier="short", form="plaintext") == [fresh]
