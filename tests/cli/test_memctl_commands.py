"""memctl through typer's CliRunner: offline behaviour and end to end against a real daemon."""

from __future__ import annotations

import json
import socket as socketlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from memosd.cli import exitcodes
from memosd.cli.main import app, parse_meta, parse_time_us
from memosd.errors import BadRequest, MemosError
from memosd.testing import DaemonHandle, memosd_daemon, memosd_daemon_factory

__all__ = ["memosd_daemon", "memosd_daemon_factory"]  # fixtures used by this module

runner = CliRunner()


def memctl(*args: str, socket: Path | None = None, **env: str) -> Result:
    environ = {"MEMOSD_SOCKET": str(socket) if socket else "", "MEMOSD_TOKEN": "", **env}
    return runner.invoke(app, list(args), env=environ, catch_exceptions=False)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


# --- offline: parsing, usage errors, "daemon not running" ----------------------------


def test_help_lists_every_command() -> None:
    result = memctl("--help")
    assert result.exit_code == 0
    for command in (
        "status", "whoami", "plugins", "add", "get", "update", "history", "rollback",
        "delete", "purge", "search", "checkpoint", "cube", "token", "wal",
    ):  # fmt: skip
        assert command in result.stdout
    cube_help = memctl("cube", "--help").stdout
    for sub in ("create", "list", "show", "drop", "export", "import", "inspect", "grant", "revoke"):
        assert sub in cube_help


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["--json", "cube", "list"],
        ["get", "c", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--json"],
        ["add", "c", "text"],
        ["wal", "verify"],
    ],
)
def test_daemon_not_running_is_one_clear_line(tmp_path: Path, args: list[str]) -> None:
    socket = tmp_path / "nobody-home.sock"
    result = memctl(*args, socket=socket)
    assert result.exit_code == exitcodes.EXIT_UNAVAILABLE == 6
    assert "Traceback" not in result.output
    assert result.stdout == ""
    if "--json" in args:
        error = json.loads(result.stderr)["error"]
        assert error["code"] == "unavailable"
        assert error["reason"] == "not_running"
        assert error["exit_code"] == 6
    else:
        assert result.stderr.count("\n") == 1
        assert "memosd is not running" in result.stderr
        assert str(socket) in result.stderr


def test_socket_option_beats_environment(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["status", "--socket", str(tmp_path / "flag.sock")],
        env={"MEMOSD_SOCKET": str(tmp_path / "env.sock")},
    )
    assert "flag.sock" in result.stderr


def test_a_regular_file_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    result = memctl("status", socket=path)
    assert result.exit_code == 6
    assert "not a socket" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["nosuchcommand"],
        ["get", "cube-only"],
        ["get", "c", "id", "--version", "0"],
        ["search", "c", "q", "-k", "zero"],
        ["cube", "grant", "c", "uid:1", "admin"],
        ["rollback", "c", "id", "x"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    assert memctl(*args, socket=tmp_path / "s.sock").exit_code == exitcodes.EXIT_USAGE


def test_bad_as_of_is_a_usage_error_before_connecting(tmp_path: Path) -> None:
    result = memctl("get", "c", "id", "--as-of", "yesterday-ish", socket=tmp_path / "s.sock")
    assert result.exit_code == 2
    assert "ISO-8601" in result.stderr


def test_parse_time_us() -> None:
    assert parse_time_us("0") == 0
    assert parse_time_us("1700000000") == 1_700_000_000_000_000
    assert parse_time_us("1700000000.25") == 1_700_000_000_250_000
    assert parse_time_us("2023-11-14T22:13:20Z") == 1_700_000_000_000_000
    assert parse_time_us("2023-11-14T22:13:20") == 1_700_000_000_000_000  # naive = UTC
    assert parse_time_us("2023-11-15T00:13:20+02:00") == 1_700_000_000_000_000
    assert parse_time_us("2023-11-14T22:13:20.000001Z") == 1_700_000_000_000_001
    for bad in ("", "nan", "inf", "-5", "tomorrow", "2023-13-01"):
        with pytest.raises(BadRequest):
            parse_time_us(bad)


def test_parse_meta() -> None:
    assert parse_meta([]) is None
    assert parse_meta(["a=b", "n:=3", "ok:=true", "x=1=2", "url=http://h/?q:=1"]) == {
        "a": "b",
        "n": 3,
        "ok": True,
        "x": "1=2",
        "url": "http://h/?q:=1",
    }
    for bad in ("novalue", "=v", "k:=not json"):
        with pytest.raises(BadRequest):
            parse_meta([bad])


def test_exit_code_table_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for name in dir(exitcodes):
        if name.startswith("EXIT_"):
            assert f"| {getattr(exitcodes, name)} |" in docs, name
    for code in ("bad_request", "unauthorized", "forbidden", "not_found", "conflict",
                 "too_large", "unavailable", "internal"):  # fmt: skip
        assert exitcodes.exit_code_for(_err(code)("x")) >= 1
        assert f"`{code}`" in docs


def _err(code: str) -> type[MemosError]:
    from memosd.errors import WIRE_CODES

    return WIRE_CODES[code]


# --- end to end against a real daemon --------------------------------------------------


@pytest.fixture
def daemon(memosd_daemon: DaemonHandle) -> DaemonHandle:
    return memosd_daemon


def test_status_whoami_plugins(daemon: DaemonHandle) -> None:
    status = as_json(memctl("status", "--json", socket=daemon.socket))
    assert status["healthy"] is True
    assert "engine" in status  # the test runs as the daemon's own uid: admin
    text = memctl("status", socket=daemon.socket)
    assert text.exit_code == 0
    assert "healthy:" in text.stdout
    me = as_json(memctl("whoami", "--json", socket=daemon.socket))
    assert me["admin"] is True
    assert me["principal"].startswith("uid:")
    plugins = as_json(memctl("plugins", "--json", socket=daemon.socket))
    assert isinstance(plugins["plugins"], list)
    assert memctl("plugins", socket=daemon.socket).exit_code == 0


def test_item_lifecycle(daemon: DaemonHandle) -> None:
    s = daemon.socket
    assert memctl("cube", "create", "notes", socket=s).exit_code == 0
    conflict = memctl("cube", "create", "notes", socket=s)
    assert conflict.exit_code == exitcodes.EXIT_CONFLICT == 5
    assert "already exists" in conflict.stderr

    added = memctl(
        "add", "notes", "I like green tea", "--tag", "drink", "--tag", "pref",
        "--source", "chat", "--session", "s1", "--meta", "mood=happy", "--meta", "n:=3",
        socket=s,
    )  # fmt: skip
    assert added.exit_code == 0, added.stderr
    item_id = added.stdout.strip()
    assert len(item_id) == 26

    item = as_json(memctl("get", "notes", item_id, "--json", socket=s))
    assert item["text"] == "I like green tea"
    assert item["tags"] == ["drink", "pref"]
    assert item["metadata"] == {"mood": "happy", "n": 3}
    assert item["provenance"]["source"] == "chat"
    assert item["provenance"]["session"] == "s1"
    assert item["version"] == 1
    shown = memctl("get", "notes", item_id, socket=s)
    assert "I like green tea" in shown.stdout
    assert "version:" in shown.stdout

    time.sleep(0.01)
    between = time.time()
    time.sleep(0.01)
    updated = as_json(memctl("update", "notes", item_id, "I like black tea", "--json", socket=s))
    assert updated["version"] == 2
    assert (
        as_json(memctl("get", "notes", item_id, "--version", "1", "--json", socket=s))["text"]
        == "I like green tea"
    )
    as_of = as_json(
        memctl("get", "notes", item_id, "--as-of", f"{between:.6f}", "--json", socket=s)
    )
    assert as_of["version"] == 1
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 5))
    assert (
        as_json(memctl("get", "notes", item_id, "--as-of", iso, "--json", socket=s))["version"] == 2
    )

    rolled = as_json(memctl("rollback", "notes", item_id, "1", "--json", socket=s))
    assert (rolled["version"], rolled["text"]) == (3, "I like green tea")
    history = as_json(memctl("history", "notes", item_id, "--json", socket=s))
    assert [v["version"] for v in history] == [1, 2, 3]
    table = memctl("history", "notes", item_id, socket=s).stdout
    assert "VERSION" in table
    assert "rollback" in table

    hits = as_json(memctl("search", "notes", "green tea", "-k", "5", "--json", socket=s))
    assert hits[0]["item"]["id"] == item_id
    assert isinstance(hits[0]["score"], float)
    explained = memctl("search", "notes", "green tea", "--explain", socket=s)
    assert explained.exit_code == 0
    assert item_id in explained.stdout

    assert memctl("delete", "notes", item_id, socket=s).exit_code == 0
    gone = memctl("get", "notes", item_id, socket=s)
    assert gone.exit_code == exitcodes.EXIT_NOT_FOUND == 3
    assert "deleted" in gone.stderr

    refused = memctl("purge", "notes", item_id, socket=s)  # no terminal, no --yes
    assert refused.exit_code == 2
    assert "--yes" in refused.stderr
    purged = as_json(memctl("purge", "notes", item_id, "--yes", "--json", socket=s))
    assert purged["versions"] == 4
    assert memctl("history", "notes", item_id, socket=s).exit_code == 3


def test_text_from_stdin(daemon: DaemonHandle) -> None:
    s = daemon.socket
    memctl("cube", "create", "c", socket=s)
    result = runner.invoke(
        app, ["add", "c", "-", "--json"], input="from\nstdin", env={"MEMOSD_SOCKET": str(s)}
    )
    assert json.loads(result.stdout)["text"] == "from\nstdin"


def test_add_many_from_lines_and_json_lines(daemon: DaemonHandle, tmp_path: Path) -> None:
    s = daemon.socket
    memctl("cube", "create", "bulk", socket=s)
    plain = tmp_path / "plain.txt"
    plain.write_text("first line\n\nsecond line\nthird line\n")
    ids = memctl("add-many", "bulk", str(plain), "--batch", "2", socket=s).stdout.split()
    assert len(ids) == 3
    texts = [as_json(memctl("get", "bulk", i, "--json", socket=s))["text"] for i in ids]
    assert texts == ["first line", "second line", "third line"]
    lines = '"just text"\n{"text": "tagged", "tags": ["t"], "metadata": {"n": 2}}\n'
    result = runner.invoke(
        app,
        ["add-many", "bulk", "-", "--jsonl", "--json"],
        input=lines,
        env={"MEMOSD_SOCKET": str(s)},
    )
    items = json.loads(result.stdout)
    assert [(i["text"], i["tags"], i["metadata"]) for i in items] == [
        ("just text", [], {}),
        ("tagged", ["t"], {"n": 2}),
    ]
    # A bad line is a usage error before anything is sent.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n[1, 2]\n')
    result = memctl("add-many", "bulk", str(bad), "--jsonl", socket=s)
    assert result.exit_code == exitcodes.EXIT_USAGE
    assert "line 2" in result.stderr
    assert as_json(memctl("cube", "show", "bulk", "--json", socket=s))["counts"]["active"] == 5


def test_cubes_export_import_and_grants(daemon: DaemonHandle, tmp_path: Path) -> None:
    s = daemon.socket
    memctl("cube", "create", "diary", socket=s)
    item_id = memctl("add", "diary", "secret plans", socket=s).stdout.strip()
    memctl("update", "diary", item_id, "secret plans v2", socket=s)
    assert memctl("cube", "grant", "diary", "uid:4242", "read", socket=s).exit_code == 0

    listed = as_json(memctl("cube", "list", "--json", socket=s))
    assert [c["name"] for c in listed] == ["diary"]
    assert "diary" in memctl("cube", "list", socket=s).stdout
    shown = as_json(memctl("cube", "show", "diary", "--json", socket=s))
    assert shown["grants"] == {"uid:4242": "read"}
    assert shown["counts"]["active"] == 1

    path = tmp_path / "diary.memcube"
    exported = as_json(memctl("cube", "export", "diary", "-o", str(path), "--json", socket=s))
    assert exported["bytes"] == path.stat().st_size
    again = memctl("cube", "export", "diary", "-o", str(path), socket=s)
    assert again.exit_code == 2
    assert "--force" in again.stderr
    assert memctl("cube", "export", "diary", "-o", str(path), "--force", socket=s).exit_code == 0

    inspected = as_json(memctl("cube", "inspect", str(path), "--json"))
    assert inspected["counts"]["versions"] == 2

    clash = memctl("cube", "import", str(path), socket=s)
    assert clash.exit_code == 5
    imported = as_json(memctl("cube", "import", str(path), "--name", "copy", "--json", socket=s))
    assert imported["name"] == "copy"
    history = as_json(memctl("history", "copy", item_id, "--json", socket=s))
    assert [v["text"] for v in history] == ["secret plans", "secret plans v2"]

    damaged = bytearray(path.read_bytes())
    damaged[-40] ^= 0x10
    bad = tmp_path / "bad.memcube"
    bad.write_bytes(bytes(damaged))
    refused = memctl("cube", "import", str(bad), "--name", "bad", socket=s)
    assert refused.exit_code == 2
    assert "checksum" in refused.stderr
    missing = memctl("cube", "import", str(tmp_path / "none.memcube"), socket=s)
    assert missing.exit_code == 2

    assert memctl("cube", "revoke", "diary", "uid:4242", socket=s).exit_code == 0
    assert as_json(memctl("cube", "show", "diary", "--json", socket=s))["grants"] == {}

    assert memctl("cube", "drop", "copy", socket=s).exit_code == 2  # needs --yes
    dropped = as_json(memctl("cube", "drop", "copy", "--yes", "--json", socket=s))
    assert dropped == {"name": "copy", "erased": 1}
    assert memctl("cube", "show", "copy", socket=s).exit_code == 3


def test_tokens_and_permissions(daemon: DaemonHandle) -> None:
    s = daemon.socket
    memctl("cube", "create", "private", socket=s)
    created = memctl("token", "create", "bot", socket=s)
    assert created.exit_code == 0
    secret = created.stdout.strip()
    assert "shown once" in created.stderr
    assert secret

    tokens = as_json(memctl("token", "list", "--json", socket=s))
    assert [(t["name"], t["principal"]) for t in tokens] == [("bot", "token:bot")]
    assert secret not in memctl("token", "list", socket=s).stdout

    me = as_json(memctl("whoami", "--json", socket=s, MEMOSD_TOKEN=secret))
    assert me["principal"] == "token:bot"
    assert me["admin"] is False
    # A principal without a grant cannot even learn that the cube exists.
    hidden = memctl("get", "private", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--token", secret, socket=s)
    assert hidden.exit_code in (3, 4)
    forbidden = memctl("token", "list", "--token", secret, socket=s)
    assert forbidden.exit_code == exitcodes.EXIT_FORBIDDEN == 4
    assert memctl("wal", "verify", "--token", secret, socket=s).exit_code == 4

    memctl("cube", "grant", "private", "token:bot", "write", socket=s)
    assert memctl("add", "private", "hello", "--token", secret, socket=s).exit_code == 0

    bad = memctl("whoami", "--token", "mtk_not-a-real-token", socket=s)
    assert bad.exit_code == 4
    assert memctl("token", "revoke", "bot", socket=s).exit_code == 0
    assert memctl("whoami", "--token", secret, socket=s).exit_code == 4


def test_maintenance(daemon: DaemonHandle) -> None:
    s = daemon.socket
    memctl("cube", "create", "c", socket=s)
    memctl("add", "c", "x", socket=s)
    report = as_json(memctl("wal", "verify", "--json", socket=s))
    assert report["problems"] == []
    # The active segment keeps zero fill ahead of its records; not a problem.
    assert report["segments"][-1]["zero_fill_bytes"] > 0
    assert report["torn_tail_bytes"] == 0
    verified = memctl("wal", "verify", socket=s)
    assert verified.exit_code == 0
    assert "WAL OK" in verified.stdout
    assert "ZERO FILL" in verified.stdout
    checkpoint = as_json(memctl("checkpoint", "--json", socket=s))
    assert "applied_lsn" in checkpoint
    assert memctl("checkpoint", socket=s).exit_code == 0


def test_too_large_exit_code(memosd_daemon_factory: Callable[..., DaemonHandle]) -> None:
    handle = memosd_daemon_factory(env={"MEMOSD_STORAGE_MAX_TEXT_BYTES": "64"})
    memctl("cube", "create", "c", socket=handle.socket)
    result = memctl("add", "c", "x" * 100, socket=handle.socket)
    assert result.exit_code == exitcodes.EXIT_TOO_LARGE == 7, result.stderr
    assert "Traceback" not in result.output


def test_watch_prints_change_events(daemon: DaemonHandle) -> None:
    s = daemon.socket
    memctl("cube", "create", "feed", socket=s)
    stop = threading.Event()

    def keep_writing() -> None:  # events before the subscription is registered are not delivered
        with daemon.client() as client:
            while not stop.is_set():
                client.add("feed", "private words")
                time.sleep(0.05)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        result = memctl("watch", "feed", "--count", "2", "--json", socket=s)
    finally:
        stop.set()
        writer.join(timeout=10)
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 2
    assert all(e["cube"] == "feed" and e["kind"] == "item_written" for e in events)
    assert "private words" not in result.stdout


def test_stale_socket_left_by_a_crash_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "memosd.sock"
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
        sock.bind(str(path))  # the file stays, nothing listens: like after SIGKILL
    started = time.monotonic()
    result = memctl("status", socket=path)
    assert result.exit_code == 6
    assert "stale socket" in result.stderr
    assert time.monotonic() - started < 5


def test_socket_without_permission_exits_4(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    path = tmp_path / "memosd.sock"
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        path.chmod(0o600)
        tmp_path.chmod(0o000)
        try:
            result = memctl("status", socket=path)
        finally:
            tmp_path.chmod(0o700)
    assert result.exit_code == 4
    assert "memosd-clients" in result.stderr


def test_export_to_stdout_and_json_errors(daemon: DaemonHandle, tmp_path: Path) -> None:
    s = daemon.socket
    memctl("cube", "create", "c", socket=s)
    memctl("add", "c", "hello", socket=s)
    result = memctl("cube", "export", "c", "-o", "-", socket=s)
    assert result.exit_code == 0
    assert result.stdout_bytes.startswith(b"\x89MEMOSDCUBE")
    both = memctl("cube", "export", "c", "-o", "-", "--json", socket=s)
    assert both.exit_code == 2

    missing = memctl("get", "c", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--json", socket=s)
    assert missing.exit_code == 3
    assert missing.stdout == ""
    error = json.loads(missing.stderr)["error"]
    assert (error["code"], error["exit_code"]) == ("not_found", 3)
    no_cube = memctl("--json", "cube", "show", "nope", socket=s)
    assert json.loads(no_cube.stderr)["error"]["code"] == "not_found"


def test_explicit_socket_flag_beats_environment_before_or_after_the_command(
    tmp_path: Path,
) -> None:
    env = {"MEMOSD_SOCKET": str(tmp_path / "env.sock")}
    for args in (
        ["--socket", str(tmp_path / "global.sock"), "status"],
        ["status", "--socket", str(tmp_path / "global.sock")],
    ):
        result = runner.invoke(app, args, env=env)
        assert "global.sock" in result.stderr, args
    result = runner.invoke(app, ["status"], env=env)
    assert "env.sock" in result.stderr
