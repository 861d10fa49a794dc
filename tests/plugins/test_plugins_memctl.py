"""memctl loads plugins' sub-commands; a broken one is a warning, never fatal."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from memosd.cli.main import load_plugin_commands

GOOD = """
import typer
from memosd.plugins import hookimpl

MEMOSD_PLUGIN_API_VERSIONS = (1,)


@hookimpl
def register_commands(app):
    @app.command("hello-plugin")
    def hello() -> None:
        typer.echo("hello from a plugin")
"""

BAD = """
from memosd.plugins import hookimpl

MEMOSD_PLUGIN_API_VERSIONS = (1,)


@hookimpl
def register_commands(app):
    raise RuntimeError("cannot add commands")
"""


def test_plugin_commands_load_and_a_broken_one_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "good_cmd_plugin.py").write_text(textwrap.dedent(GOOD))
    (tmp_path / "bad_cmd_plugin.py").write_text(textwrap.dedent(BAD))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEMOSD_PLUGINS_MODULES", "good_cmd_plugin,bad_cmd_plugin")
    monkeypatch.setenv("MEMOSD_PLUGINS_ALLOW", "none-installed")
    app = typer.Typer()

    @app.command()
    def builtin() -> None:
        pass

    problems = load_plugin_commands(app)
    assert len(problems) == 1
    assert "bad_cmd_plugin" in problems[0]
    assert "cannot add commands" in problems[0]
    result = CliRunner().invoke(app, ["hello-plugin"])
    assert result.exit_code == 0
    assert "hello from a plugin" in result.stdout


def test_bad_settings_never_break_memctl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMOSD_PLUGINS_TYPO", "x")
    problems = load_plugin_commands(typer.Typer())
    assert problems
    assert "plugins not loaded" in problems[0]
