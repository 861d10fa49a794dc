"""LMDB runs with sync=False; a power loss must still recover exactly.

A real power loss can lose or tear any LMDB page written since the last
``env.sync()``.  We build that worst case directly: after a checkpoint we
keep writing (acknowledged through the WAL), then make a crash image in
which *every* page of data.mdb that changed since the checkpoint — meta pages
included — is garbage.  Opening the image under a new boot id must roll LMDB
back to the pinned checkpoint snapshot and replay the WAL on top, giving
every acknowledged write back.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memosd.engine import Engine, EngineSettings
from memosd.store.lmdb_env import PendingCheckpoint, read_checkpoint_state

SETTINGS = EngineSettings(checkpoint_interval_s=3600, checkpoint_wal_bytes=1 << 40)


def _garble_changed_pages(snapshot: bytes, current: Path, page_size: int, seed: int) -> None:
    """Overwrite each page that differs from ``snapshot`` with random bytes."""
    rng = random.Random(seed)
    data = bytearray(current.read_bytes())
    garbled = 0
    for offset in range(0, len(data), page_size):
        page = bytes(data[offset : offset + page_size])
        if page != snapshot[offset : offset + page_size]:
            data[offset : offset + page_size] = rng.randbytes(len(page))
            garbled += 1
    current.write_bytes(bytes(data))
    assert garbled > 0


def _populate(engine: Engine, n: int, tag: str) -> dict[str, str]:
    out = {}
    for i in range(n):
        item = engine.add("c", f"{tag} memory {i} " + "x" * 300)
        out[item.id] = item.text
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_loss_after_checkpoint_recovers_every_ack(tmp_path: Path, seed: int) -> None:
    data = tmp_path / "data"
    engine = Engine.open(data, settings=SETTINGS, boot_id="boot-A")
    engine.create_cube("c", owner="uid:0")
    before = _populate(engine, 300, "before")
    engine.checkpoint()
    page_size = engine.store.last_checkpoint.page_size  # type: ignore[union-attr]
    snapshot = (data / "store" / "data.mdb").read_bytes()
    # Change the pinned tree heavily: updates, deletes, purges, new items.
    ids = list(before)
    for item_id in ids[:100]:
        engine.update("c", item_id, text="changed " + item_id)
        before[item_id] = "changed " + item_id
    for item_id in ids[100:120]:
        engine.purge("c", item_id)
        del before[item_id]
    after = _populate(engine, 300, "after")
    # Crash: copy the files as the dead machine left them, then garble.
    image = tmp_path / "image"
    shutil.copytree(data, image)
    engine.close()  # the original is closed cleanly; the image never was
    checkpoint_file = image / "store" / "checkpoint"
    assert checkpoint_file.exists()
    _garble_changed_pages(snapshot, image / "store" / "data.mdb", page_size, seed)
    # A clean-shutdown checkpoint file would disable rollback; the image must
    # carry the running daemon's (unclean) one.
    with Engine.open(image, settings=SETTINGS, boot_id="boot-B") as recovered:
        assert recovered.recovery["rolled_back_lmdb_to_checkpoint"] is True
        expected = {**before, **after}
        items = recovered.list_items("c", limit=10**6)
        assert {i.id: i.text for i in items} == expected


def test_same_boot_does_not_roll_back(tmp_path: Path) -> None:
    """After kill -9 (same boot) the page cache is intact: LMDB is used as is."""
    data = tmp_path / "data"
    engine = Engine.open(data, settings=SETTINGS, boot_id="boot-A")
    engine.create_cube("c", owner="uid:0")
    written = _populate(engine, 50, "x")
    image = tmp_path / "image"
    shutil.copytree(data, image)
    engine.close()
    with Engine.open(image, settings=SETTINGS, boot_id="boot-A") as recovered:
        assert recovered.recovery["rolled_back_lmdb_to_checkpoint"] is False
        assert {i.id: i.text for i in recovered.list_items("c", limit=1000)} == written


def test_garbled_image_without_rollback_is_detected_as_broken(tmp_path: Path) -> None:
    """Test of the test: the garbled image really is unusable without rollback."""
    data = tmp_path / "data"
    engine = Engine.open(data, settings=SETTINGS, boot_id="boot-A")
    engine.create_cube("c", owner="uid:0")
    _populate(engine, 200, "before")
    engine.checkpoint()
    page_size = engine.store.last_checkpoint.page_size  # type: ignore[union-attr]
    snapshot = (data / "store" / "data.mdb").read_bytes()
    _populate(engine, 200, "after")
    image = tmp_path / "image"
    shutil.copytree(data, image)
    engine.close()
    _garble_changed_pages(snapshot, image / "store" / "data.mdb", page_size, 7)
    os.remove(image / "store" / "checkpoint")  # no saved meta pages: no rollback possible
    # LMDB may crash outright on garbage pages, so look at it from a child.
    probe = textwrap.dedent(
        f"""
        import sys
        from memosd.engine import Engine, EngineSettings
        settings = EngineSettings(checkpoint_interval_s=3600, checkpoint_wal_bytes=1 << 40)
        with Engine.open({str(image)!r}, settings=settings, boot_id="boot-B") as broken:
            print(len(broken.list_items("c", limit=10**6)))
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    intact = child.returncode == 0 and child.stdout.strip().splitlines()[-1:] == ["400"]
    assert not intact, "a garbled image opened intact: the rollback tests prove nothing"


def test_power_loss_around_background_checkpoints_recovers_every_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Periodic checkpoints sync beside the writer; an image taken at any time recovers.

    Each checkpoint captures its snapshot between two commits and syncs it
    while later commits go on.  The worst case for the checkpoint in the
    image's checkpoint file: every page that changed after its capture is
    garbage (writes during its sync included).
    """
    data = tmp_path / "data"
    # A transaction per add (no deferred adds): many checkpoints, each with
    # commits during its sync.
    settings = EngineSettings(
        checkpoint_interval_s=3600,
        checkpoint_wal_bytes=1 << 40,
        checkpoint_txns=40,
        deferred_adds=0,
    )
    engine = Engine.open(data, settings=settings, boot_id="boot-A")
    captured: dict[int, bytes] = {}  # LMDB txn id -> data.mdb at capture time
    begin = engine.store.begin_checkpoint

    def capture_too(applied_lsn: int) -> PendingCheckpoint:
        pending = begin(applied_lsn)
        captured[pending.state.txnid] = (data / "store" / "data.mdb").read_bytes()
        return pending

    monkeypatch.setattr(engine.store, "begin_checkpoint", capture_too)
    engine.create_cube("c", owner="uid:0")
    written = _populate(engine, 150, "first")
    for item_id in list(written)[:60]:
        engine.update("c", item_id, text="changed " + item_id)
        written[item_id] = "changed " + item_id
    engine._join_checkpoint()  # at least one background checkpoint has finished
    written.update(_populate(engine, 100, "during"))  # more start; one may be mid-sync
    assert len(captured) >= 3
    image = tmp_path / "image"
    shutil.copytree(data, image)
    engine.close()
    state = read_checkpoint_state(image / "store" / "checkpoint")
    assert state is not None
    assert not state.clean_shutdown
    assert state.txnid in captured, "the image's checkpoint was not a background one"
    _garble_changed_pages(captured[state.txnid], image / "store" / "data.mdb", state.page_size, 5)
    with Engine.open(image, settings=SETTINGS, boot_id="boot-B") as recovered:
        assert recovered.recovery["rolled_back_lmdb_to_checkpoint"] is True
        assert recovered.recovery["replayed_records"] > 0
        items = recovered.list_items("c", limit=10**6)
        assert {i.id: i.text for i in items} == written
