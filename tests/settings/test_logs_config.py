"""Logging: format selection, JSON lines, redaction of memory contents, reconfiguration."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from memosd.logs import configure_logging, get_logger, resolve_format, under_systemd
from memosd.settings import LogSettings


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_auto_format() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Tty(), {}) == "console"
    assert resolve_format("auto", io.StringIO(), {}) == "json"  # not a terminal
    assert resolve_format("auto", Tty(), {"INVOCATION_ID": "abc"}) == "json"
    assert resolve_format("auto", Tty(), {"JOURNAL_STREAM": "8:123"}) == "json"
    assert resolve_format("console", io.StringIO(), {"INVOCATION_ID": "x"}) == "console"
    assert under_systemd({"INVOCATION_ID": "x"})
    assert not under_systemd({})


def test_json_lines_with_level_filter_and_stdlib_records() -> None:
    buf = io.StringIO()
    assert configure_logging(LogSettings(format="json", level="info"), stream=buf, env={}) == "json"
    log = get_logger("memosd.test")
    log.debug("hidden")
    log.info("started", cubes=3)
    logging.getLogger("some.library").warning("disk %s", "slow")
    records = lines(buf)
    assert [r["event"] for r in records] == ["started", "disk slow"]
    assert records[0]["level"] == "info"
    assert records[0]["cubes"] == 3
    assert "timestamp" in records[0]


def test_memory_contents_are_redacted_above_debug() -> None:
    buf = io.StringIO()
    configure_logging(LogSettings(format="json", level="debug"), stream=buf, env={})
    log = get_logger("memosd.test")
    log.info("item_added", text="my secret diary", query="q", item_id="01H")
    log.debug("item_added", text="visible at debug")
    info, debug = lines(buf)
    assert "secret" not in json.dumps(info)
    assert info["text"] == "<redacted: 15 chars>"
    assert info["item_id"] == "01H"
    assert debug["text"] == "visible at debug"


def test_tracebacks_do_not_carry_frame_locals() -> None:
    buf = io.StringIO()
    configure_logging(LogSettings(format="json"), stream=buf, env={})
    secret_text = "my secret diary"
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("t").exception("failed")
    assert secret_text not in buf.getvalue()
    assert "ValueError" in buf.getvalue()


def test_reconfigure_changes_level_and_format_for_existing_loggers() -> None:
    first, second = io.StringIO(), io.StringIO()
    log = get_logger("memosd.test")
    configure_logging(LogSettings(format="json", level="warning"), stream=first, env={})
    log.info("dropped")
    configure_logging(LogSettings(format="console", level="debug"), stream=second, env={})
    log.debug("shown", n=1)
    assert first.getvalue() == ""
    assert "shown" in second.getvalue()
    assert "n=1" in second.getvalue()
    assert sum(1 for h in logging.getLogger().handlers if h.get_name() == "memosd") == 1


def test_journal_stream_gets_priority_prefix(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        configure_logging(LogSettings(format="auto"), stream=stream, env=env)
        get_logger("t").error("bad", code=1)
        get_logger("t").info("fine")
    first, second = path.read_text().splitlines()
    assert first.startswith("<3>{")
    assert json.loads(first[3:])["event"] == "bad"
    assert second.startswith("<6>{")
