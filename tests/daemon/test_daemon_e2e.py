"""End to end through the real daemon (subprocess) and the client library."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from memosd.client import AsyncClient, Client
from memosd.daemon import EXIT_CONFIG, EXIT_LOCKED
from memosd.errors import BadRequest, Conflict, NotFound, TooLarge, Unavailable
from memosd.testing import DaemonHandle


def test_crud_versions_and_as_of(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        c.create_cube("notes")
        first = c.add(
            "notes",
            "Alice lives in Paris",
            tags=["city"],
            source="chat",
            session="s1",
            metadata={"turn": 1},
        )
        assert (first.version, first.text, first.metadata, first.tags) == (
            1,
            "Alice lives in Paris",
            {"turn": 1},
            ("city",),
        )
        assert first.provenance.source == "chat"
        assert first.provenance.actor == "uid:0"
        second = c.update("notes", first.id, "Alice lives in Berlin")
        assert second.version == 2
        assert c.get("notes", first.id).text == "Alice lives in Berlin"
        assert c.get("notes", first.id, version=1).text == "Alice lives in Paris"
        assert c.get("notes", first.id, as_of=first.recorded_us).text == "Alice lives in Paris"
        assert [v.version for v in c.history("notes", first.id)] == [1, 2]
        back = c.rollback("notes", first.id, 1)
        assert (back.version, back.text) == (3, "Alice lives in Paris")
        with pytest.raises(Conflict):
            c.update("notes", first.id, "x", expected_version=1)
        c.delete("notes", first.id)
        with pytest.raises(NotFound) as info:
            c.get("notes", first.id)
        assert info.value.reason == "deleted"
        assert c.get("notes", first.id, version=2).text == "Alice lives in Berlin"
        record = c.purge("notes", first.id, reason="gdpr")
        assert record.versions == 4
        with pytest.raises(NotFound):
            c.get("notes", first.id, version=1)


def test_add_many_writes_all_in_order_or_nothing(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        c.create_cube("bulk")
        items = c.add_many(
            "bulk",
            [
                "plain text",
                {"text": "with fields", "tags": ("a", "b"), "session": "s1", "metadata": {"k": 1}},
                {"text": "third", "importance": 0.9, "source": "import"},
            ],
        )
        assert [i.text for i in items] == ["plain text", "with fields", "third"]
        assert all(i.version == 1 and i.cube == "bulk" for i in items)
        assert items[1].tags == ("a", "b")
        assert items[1].metadata == {"k": 1}
        assert items[1].provenance.session == "s1"
        assert (items[2].importance, items[2].provenance.source) == (0.9, "import")
        assert len({i.id for i in items}) == 3
        for item in items:
            assert c.get("bulk", item.id) == item
        # One invalid entry (found by the engine, after the request was accepted):
        # nothing of the batch is written.
        with pytest.raises(BadRequest):
            c.add_many("bulk", ["would be fine", {"text": "bad", "importance": 2.0}])
        # Entry errors found at the edge name the entry.
        with pytest.raises(BadRequest, match=r"items\[1\]"):
            c.add_many("bulk", ["fine", {"text": 5}])
        with pytest.raises(BadRequest, match="unknown arguments"):
            c.add_many("bulk", [{"text": "x", "colour": "red"}])
        with pytest.raises(BadRequest):
            c.add_many("bulk", [])
        assert len(c.list_items("bulk")) == 3
        with pytest.raises(TooLarge):
            c.add_many("bulk", ["x"] * 1001)
        # The async client has the same method.

        async def main() -> list[str]:
            async with AsyncClient(memosd_daemon.socket) as ac:
                return [i.text for i in await ac.add_many("bulk", ["async one", "async two"])]

        assert anyio.run(main) == ["async one", "async two"]
        assert len(c.list_items("bulk")) == 5


def test_search_list_and_cubes(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        with pytest.raises(BadRequest):
            c.create_cube("kb", config={"embedding_dim": "eight"})
        with pytest.raises(BadRequest):
            c.create_cube("kb", config={"no_such_field": 1})
        # A cube records the daemon's embedding model; another one is refused.
        with pytest.raises(BadRequest) as mismatch:
            c.create_cube("kb", config={"embedding_dim": 8})
        assert mismatch.value.reason == "embedding_mismatch"
        c.create_cube("kb")
        with pytest.raises(Conflict):
            c.create_cube("kb")
        ids = [
            c.add("kb", text, tags=tags).id
            for text, tags in [
                ("the cat sat on the mat", ["pets"]),
                ("dogs chase cats", ["pets"]),
                ("stock prices fell", []),
            ]
        ]
        hits = c.search("kb", "cat mat")
        assert hits[0].item.id == ids[0]
        assert hits[0].score > 0
        assert {h.item.id for h in c.search("kb", "cat", tags=["pets"])} <= set(ids[:2])
        assert c.search("kb", "zebra", mode="lexical") == []  # dense always has neighbours
        assert len(c.list_items("kb", limit=2)) == 2
        info = c.get_cube("kb")
        assert info.counts == {"active": 3, "archived": 0, "deleted": 0}
        assert info.config["embedding_dim"] == 384
        assert [cube.name for cube in c.list_cubes()] == ["kb"]
        assert c.drop_cube("kb") == 3
        with pytest.raises(NotFound):
            c.get_cube("kb")


def test_export_import_via_frames(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        c.create_cube("src")
        item = c.add("src", "payload " * 1000)
        c.update("src", item.id, "second")
        data = c.export_cube("src")
        assert isinstance(data, bytes)
        c.import_cube(data, name="dst")
        assert [v.text for v in c.history("dst", item.id)] == ["payload " * 1000, "second"]
        with pytest.raises(Conflict):
            c.import_cube(data, name="dst")
        with pytest.raises(BadRequest):
            c.import_cube(b"not a portable file", name="dst2")


def test_errors_over_the_wire_keep_their_class(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        with pytest.raises(NotFound):
            c.get("nope", "01M80PSCB9NQEF9VE49P0A27P0")
        with pytest.raises(BadRequest) as info:
            c.call("add", {"cube": "x", "text": 5})
        assert info.value.details["field"] == "text"
        with pytest.raises(BadRequest) as info:
            c.call("add", {"cube": "x", "text": "t", "bogus": 1})
        assert info.value.reason == "unknown_arg"
        with pytest.raises(BadRequest) as info:
            c.call("no_such_op")
        assert info.value.reason == "unknown_op"
        c.create_cube("c")
        with pytest.raises(BadRequest):
            c.add("c", "x", tags=["ok", ""])  # the engine's validation, same class


def test_async_client_pipelines(memosd_daemon: DaemonHandle) -> None:
    async def main() -> None:
        async with AsyncClient(memosd_daemon.socket, timeout=10) as c:
            await c.create_cube("a")
            results: list[str] = []

            async def add(i: int) -> None:
                results.append((await c.add("a", f"item {i}")).id)

            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(add, i)
            assert len(set(results)) == 200
            got = await c.get("a", results[0])
            assert got.text.startswith("item ")
            with pytest.raises(NotFound):
                await c.get_cube("missing")

    anyio.run(main, backend="asyncio")


def test_client_shared_between_threads(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        c.create_cube("t")
        errors: list[BaseException] = []
        ids: list[str] = []

        def worker(n: int) -> None:
            try:
                for i in range(50):
                    item = c.add("t", f"{n}-{i}")
                    assert c.get("t", item.id).text == f"{n}-{i}"
                    ids.append(item.id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(set(ids)) == 400


def test_change_feed_per_cube(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        c.create_cube("a")
        c.create_cube("ab")  # a prefix of nothing else, but "a" is a prefix of "ab"
        with c.subscribe("a") as sub:
            # Subscriptions propagate asynchronously: write until the first event arrives.
            deadline = time.monotonic() + 10
            warm = None
            while warm is None and time.monotonic() < deadline:
                c.add("a", "warm-up")
                warm = sub.next_event(timeout=0.1)
            assert warm is not None
            while sub.next_event(timeout=0.2) is not None:
                pass
            other = c.add("ab", "not for a")
            item = c.add("a", "for a")
            c.update("a", item.id, "v2")
            c.delete("a", item.id)
            events = [sub.next_event(timeout=5) for _ in range(3)]
        assert [(e.kind, e.cube, e.item_id, e.version) for e in events if e] == [
            ("item_written", "a", item.id, 1),
            ("item_written", "a", item.id, 2),
            ("item_deleted", "a", item.id, 3),
        ]
        assert other.id not in {e.item_id for e in events if e}


def test_daemon_not_running_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    with (
        Client(os.path.join(tmp_path, "none.sock"), timeout=1) as c,
        pytest.raises(Unavailable) as info,
    ):
        c.ping()
    assert info.value.reason == "not_running"
    assert "not running" in info.value.message


def test_second_daemon_on_same_data_dir_refused(memosd_daemon: DaemonHandle) -> None:
    other = DaemonHandle(memosd_daemon.base / "other")
    other.data_dir = memosd_daemon.data_dir
    proc = subprocess.run(
        other.command, env=other.env, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == EXIT_LOCKED
    assert b"already using the data dir" in proc.stderr
    with memosd_daemon.client() as c:
        c.ping()  # the first one is unharmed


def test_stale_socket_after_crash_is_replaced(memosd_daemon: DaemonHandle) -> None:
    with memosd_daemon.client() as c:
        c.create_cube("s")
        item = c.add("s", "survives")
    memosd_daemon.kill()
    assert memosd_daemon.socket.exists()  # left behind by SIGKILL
    memosd_daemon.start()
    with memosd_daemon.client() as c:
        assert c.get("s", item.id).text == "survives"


def test_live_socket_is_not_stolen(memosd_daemon: DaemonHandle) -> None:
    other = DaemonHandle(memosd_daemon.base / "o2", run_dir=memosd_daemon.run_dir)
    proc = subprocess.run(
        other.command, env=other.env, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == EXIT_LOCKED
    assert b"another daemon is listening" in proc.stderr
    with memosd_daemon.client() as c:
        c.ping()


def test_socket_permissions(memosd_daemon: DaemonHandle) -> None:
    assert memosd_daemon.socket.stat().st_mode & 0o777 == 0o660
    assert memosd_daemon.run_dir.stat().st_mode & 0o777 == 0o750


def test_sigterm_drains_inflight_writes(memosd_daemon: DaemonHandle) -> None:
    acked: list[tuple[str, str]] = []
    stop = threading.Event()
    with memosd_daemon.client(timeout=5) as c:
        c.create_cube("d")

        def writer(n: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    item = c.add("d", f"w{n}-{i}")
                except Unavailable:
                    return
                acked.append((item.id, item.text))
                i += 1

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert memosd_daemon.proc is not None
        memosd_daemon.proc.send_signal(signal.SIGTERM)
        code = memosd_daemon.proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join()
    assert code == 0
    assert not memosd_daemon.socket.exists()  # removed on a clean exit
    memosd_daemon.start()
    with memosd_daemon.client() as c:
        for item_id, text in acked:
            assert c.get("d", item_id).text == text
    assert len(acked) > 0


def test_sdnotify_messages(memosd_daemon_factory: Callable[..., DaemonHandle], tmp_path) -> None:
    path = f"/tmp/memosd-notify-{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        try:
            daemon = memosd_daemon_factory(env={"NOTIFY_SOCKET": path})
            daemon.terminate()
            messages = []
            sock.settimeout(0.5)
            while True:
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    break
        finally:
            os.unlink(path)
    joined = "\n".join(messages)
    assert "READY=1" in joined
    assert "STOPPING=1" in joined
    assert joined.index("READY=1") < joined.index("STOPPING=1")


def test_unbindable_socket_path_is_a_config_error(tmp_path: Path) -> None:
    too_long = Path("/tmp") / ("x" * 120) / "memosd.sock"
    handle = DaemonHandle(tmp_path, run_dir=too_long.parent)
    try:
        proc = subprocess.run(
            handle.command, env=handle.env, capture_output=True, timeout=60, check=False
        )
    finally:
        shutil.rmtree(too_long.parent, ignore_errors=True)
    assert proc.returncode == EXIT_CONFIG
    assert b"cannot bind" in proc.stderr


def test_small_searches_on_the_event_loop_answer_like_threaded_ones(
    memosd_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    """A search cheap enough to run on the loop gives what a worker thread gives."""
    results: list[list[tuple[str, float, dict[str, float]]]] = []
    inline_counts = []
    for budget in (100_000, 0):  # every search of this test fits 0.1 s; 0: never inline
        daemon = memosd_daemon_factory(settings={"index.inline_search_us": budget})
        with daemon.client() as c:
            c.create_cube("kb")
            c.create_cube("other")
            for i in range(40):
                c.add("kb", f"note {i} about cats and {'tea' if i % 2 else 'coffee'}", tags=["t"])
            c.add("kb", "walk the dog", session="s1")
            c.add("kb", "dogs like walks", session="s1")
            got = []
            for _ in range(3):  # the first of each kind is measured in a thread
                got = []
                for mode in ("hybrid", "dense", "lexical"):
                    for kwargs in ({}, {"k": 3, "tags": ["t"]}):
                        hits = c.search(["kb", "other"], "cats coffee dog", mode=mode, **kwargs)
                        got.append([(h.item.id, h.score, h.components) for h in hits])
            results.append([[(str(i), s, comp) for i, s, comp in hits] for hits in got])
            inline_counts.append(c.status()["search"]["inline_searches"])
            with pytest.raises(NotFound):
                c.search("nope", "cats")
            # Hits are counted either way.
            c.checkpoint()
            assert c.get("kb", got[0][0][0]).usage.hits >= 3
    assert inline_counts[0] >= 6
    assert inline_counts[1] == 0
    # Item ids differ between the two daemons: compare ranks, scores and components.
    first, second = ([[(s, comp) for _, s, comp in hits] for hits in r] for r in results)
    assert first == second


def test_adds_deferred_by_the_engine_read_back_at_once(
    memosd_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    # Adds wait (up to 10 s) for something that needs LMDB to have them.
    daemon = memosd_daemon_factory(settings={"storage.deferred_add_max_s": 10.0})
    with daemon.client() as c:
        c.create_cube("notes")
        c.add("notes", "first")
        # A search waits for the caller's writes to be indexed: the indexer
        # has then built the new cube's index (a scan, which applies adds).
        assert [h.item.text for h in c.search("notes", "first")] == ["first"]
        items = [c.add("notes", f"memory {i}", session="s") for i in range(5)]
        engine = c.status()["engine"]
        assert engine["deferred_adds"] == 5  # acknowledged, LMDB does not have them yet
        assert engine["lmdb_applied_lsn"] < engine["applied_lsn"] == engine["last_lsn"]
        for item in items:
            assert c.get("notes", item.id) == item
            assert c.history("notes", item.id) == [item]
        listed = c.list_items("notes")  # a scan: LMDB applies them first
        assert [i.id for i in listed][1:] == [i.id for i in items]
        engine = c.status()["engine"]
        assert engine["deferred_adds"] == 0
        assert engine["lmdb_applied_lsn"] == engine["applied_lsn"]
        updated = c.update("notes", items[0].id, "memory 0, revised")
        assert updated.version == 2
    daemon.stop()
    daemon.start()  # clean restart: nothing left to replay
    with daemon.client() as c:
        assert c.status()["engine"]["recovery"]["replayed_records"] == 0
        assert len(c.list_items("notes")) == 6
