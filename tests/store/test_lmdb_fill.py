"""Zero fill ahead of LMDB: data.mdb is written past LMDB's last page.

The fill must never touch a page LMDB uses (checked by LMDB's own full
traversal in a compacting copy after heavy page reuse), must stay inside the
map, and must give up quietly when the disk refuses it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import lmdb
import pytest

from memosd.engine import Engine, EngineSettings
from memosd.store import lmdb_env

# Frequent checkpoints: LMDB reuses freed pages often, so pages near the
# file's end are rewritten while the fill runs ahead of them.
SETTINGS = EngineSettings(checkpoint_txns=40, checkpoint_interval_s=3600)


def _used_bytes(store: lmdb_env.LmdbEnv) -> int:
    info = store.env.info()
    return (int(info["last_pgno"]) + 1) * int(store.env.stat()["psize"])


def test_fill_runs_ahead_of_lmdb_and_never_touches_its_pages(tmp_path: Path) -> None:
    texts: dict[str, str] = {}
    with Engine.open(tmp_path, settings=SETTINGS) as engine:
        engine.create_cube("c", owner="uid:0")
        for i in range(600):
            item = engine.add("c", f"memory {i} " + "y" * (50 + 7 * (i % 90)))
            texts[item.id] = item.text
            if i % 3 == 0:  # updates and deletes free pages for reuse
                texts[item.id] = engine.update("c", item.id, text=f"updated {i}").text
            if i % 7 == 0:
                engine.delete("c", item.id)
                del texts[item.id]
        engine.checkpoint()  # LMDB applies the last deferred adds
        store = engine.store
        data = store.directory / "data.mdb"
        used, size = _used_bytes(store), data.stat().st_size
        assert size > used  # written ahead of LMDB
        assert size <= store.map_size
        with open(data, "rb") as fh:
            fh.seek(used)
            assert fh.read() == bytes(size - used)  # only zeros past LMDB's last page
        # A compacting copy walks every live page: a zeroed page would fail it.
        copy = tmp_path / "copy"
        copy.mkdir()
        store.env.copy(str(copy), compact=True)
    with Engine.open(tmp_path, settings=SETTINGS) as engine:
        assert {i.id: i.text for i in engine.list_items("c", limit=10_000)} == texts
    env = lmdb.open(str(copy), readonly=True, max_dbs=len(lmdb_env.DB_NAMES) + 2, lock=False)
    try:
        with env.begin() as txn:
            assert txn.stat(env.open_db(b"latest", txn=txn))["entries"] == 600  # tombstones too
    finally:
        env.close()


def test_fill_stays_inside_a_small_map(tmp_path: Path) -> None:
    settings = EngineSettings(initial_map_size=1 << 20)
    with Engine.open(tmp_path, settings=settings) as engine:
        engine.create_cube("c", owner="uid:0")
        store = engine.store
        data = store.directory / "data.mdb"
        engine.add("c", "one")
        assert data.stat().st_size <= store.map_size == 1 << 20


def test_a_failing_fill_stops_and_writes_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def full_disk(fd: int, size: int, offset: int) -> int:
        calls.append(offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with Engine.open(tmp_path, settings=SETTINGS) as engine:
        engine.create_cube("c", owner="uid:0")
        data = engine.store.directory / "data.mdb"
        monkeypatch.setattr(lmdb_env, "_write_zeros", full_disk)
        before = data.stat().st_size
        ids = [engine.add("c", f"memory {i} " + "z" * 900).id for i in range(3000)]
        assert len(calls) == 1  # tried once, then stopped
        assert engine.healthy
        # LMDB extended the file itself, past everything the fill had written.
        assert data.stat().st_size > before
        assert _used_bytes(engine.store) == data.stat().st_size
    with Engine.open(tmp_path, settings=SETTINGS) as engine:
        assert engine.get("c", ids[-1]).text.startswith("memory 2999 ")
