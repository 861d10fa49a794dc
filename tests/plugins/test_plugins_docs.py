"""docs/plugins.md documents every hook, with its arguments."""

from __future__ import annotations

import inspect
from pathlib import Path

from memosd.plugins import hookspecs
from memosd.plugins.manager import hook_names

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def test_every_hook_is_documented_with_its_arguments() -> None:
    text = DOCS.read_text()
    missing = []
    for name in hook_names():
        args = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        heading = f"### `{name}({args})`"
        if heading not in text:
            missing.append(heading)
    assert not missing, f"hooks without a reference section in docs/plugins.md: {missing}"


def test_every_hook_has_a_docstring() -> None:
    for name in hook_names():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_documented_hooks_exist() -> None:
    known = set(hook_names())
    documented = [
        line.removeprefix("### `").split("(")[0]
        for line in DOCS.read_text().splitlines()
        if line.startswith("### `") and "(" in line
    ]
    assert documented, "no hook reference found"
    assert set(documented) <= known, set(documented) - known
    assert "MEMOSD_PLUGIN_API" in DOCS.read_text()
