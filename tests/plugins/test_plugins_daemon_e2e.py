"""Plugins in a real daemon: isolation, broken/required plugins, unknown forms, the report."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from memosd.daemon import EXIT_CONFIG
from memosd.errors import BadRequest, PluginError
from memosd.testing import DaemonHandle

CRASHY = """
from memosd.errors import BadRequest
from memosd.plugins import hookimpl
from memosd.plugins.forms import BaseForm

MEMOSD_PLUGIN_API_VERSIONS = (1,)
__version__ = "1.2.3"


class CrashyForm(BaseForm):
    name = "crashy"

    def validate(self, text, payload):
        if payload and payload.get("crash"):
            raise RuntimeError("crashy plugin bug")
        if payload and payload.get("refuse"):
            raise BadRequest("crashy: refused")
        return text.upper(), payload


@hookimpl
def register_memory_forms():
    return [CrashyForm()]


@hookimpl
def on_change(event):
    raise RuntimeError("observer bug")
"""

OLD_API = """
from memosd.plugins import hookimpl

MEMOSD_PLUGIN_API_VERSIONS = (0,)


@hookimpl
def on_change(event):
    pass
"""

TYPO = """
from memosd.plugins import hookimpl

MEMOSD_PLUGIN_API_VERSIONS = (1,)


@hookimpl
def on_changes(event):
    pass
"""


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    root = tmp_path / "pyplugins"
    root.mkdir()
    for name, source in (("crashy_plugin", CRASHY), ("old_plugin", OLD_API), ("typo_plugin", TYPO)):
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


def _report(client: Any) -> dict[str, dict[str, Any]]:
    result = client.call("plugins")
    return {p["name"]: p for p in result["plugins"]}


def test_plugins_in_the_daemon_are_isolated_and_reported(
    memosd_daemon_factory: Callable[..., DaemonHandle], plugin_dir: Path
) -> None:
    daemon = memosd_daemon_factory(
        plugins=["crashy_plugin", "missing_plugin_module", "old_plugin", "typo_plugin"],
        pythonpath=[plugin_dir],
    )
    with daemon.client() as c:
        report = _report(c)
        assert report["crashy_plugin"]["status"] == "loaded"
        assert report["crashy_plugin"]["version"] == "1.2.3"
        assert report["crashy_plugin"]["hooks"] == ["on_change", "register_memory_forms"]
        assert report["missing_plugin_module"]["status"] == "failed"
        assert "import failed" in report["missing_plugin_module"]["reason"]
        assert "version mismatch" in report["old_plugin"]["reason"]
        assert "unknown hook 'on_changes'" in report["typo_plugin"]["reason"]
        assert report["memosd.plugins.builtin_forms"]["status"] == "loaded"
        assert "crashy" in c.call("plugins")["forms"]
        assert "plugins" in c.status()

        c.create_cube("notes")
        # The form normalises (upper-cases) the text; the failing observer changes nothing.
        item = c.add("notes", "hello", form="crashy")
        assert item.text == "HELLO"
        with pytest.raises(PluginError, match=r"plugin 'crashy_plugin'.*crashy plugin bug"):
            c.add("notes", "x", form="crashy", payload={"crash": True})
        with pytest.raises(BadRequest, match="crashy: refused"):
            c.add("notes", "x", form="crashy", payload={"refuse": True})
        with pytest.raises(PluginError):
            c.call("update", {"cube": "notes", "id": item.id, "payload": {"crash": True}})
        updated = c.call("update", {"cube": "notes", "id": item.id, "text": "again"})
        assert updated["text"] == "AGAIN"
        with pytest.raises(BadRequest, match="unknown memory form 'nope'"):
            c.add("notes", "x", form="nope")
        with pytest.raises(BadRequest, match=r"payload.blobs"):
            c.add("notes", "kv", form="activation", payload={"manifest": {}})
        # ... and the daemon keeps serving.
        assert c.ping()["pong"] is True
        plain = c.add("notes", "still serving")
        assert c.get("notes", plain.id).text == "still serving"
    log = daemon.log_text()
    assert "crashy_plugin" in log
    assert "observer bug" in log


def test_required_plugin_failure_aborts_start(
    memosd_daemon_factory: Callable[..., DaemonHandle], plugin_dir: Path
) -> None:
    daemon = memosd_daemon_factory(
        plugins=["old_plugin"],
        settings={"plugins.required": ["old_plugin"]},
        pythonpath=[plugin_dir],
        start=False,
    )
    proc = daemon.spawn()
    assert proc.wait(timeout=60) == EXIT_CONFIG
    assert "required plugin 'old_plugin' failed to load" in daemon.log_text()
    assert "version mismatch" in daemon.log_text()
