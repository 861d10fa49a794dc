"""Fixtures for the plugin tests: memosd.testing's, plus the example plugin installed."""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from memosd.testing import (
    memosd_daemon,
    memosd_daemon_factory,
    memosd_engine,
    memosd_plugins,
)

__all__ = [
    "facts_plugin",
    "memosd_daemon",
    "memosd_daemon_factory",
    "memosd_engine",
    "memosd_plugins",
]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "memosd-facts"


def _installed_matches_source() -> bool:
    spec = importlib.util.find_spec("memosd_facts")
    if spec is None or not spec.submodule_search_locations:
        return False
    installed = Path(next(iter(spec.submodule_search_locations)))
    if installed.resolve() == (EXAMPLE / "memosd_facts").resolve():
        return True  # an editable install of the example itself
    for source in (EXAMPLE / "memosd_facts").glob("*.py"):
        target = installed / source.name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            return False
    return True


@pytest.fixture(scope="session")
def facts_plugin() -> str:
    """``pip install examples/memosd-facts`` into this venv unless already current.

    Idempotent and cheap when current (a file comparison); serialised by a lock
    so parallel test runs do not install at the same time.  The package is
    installed without dependencies (memosd is the host) and without build
    isolation (no network).  Returns the plugin's entry-point name.
    """
    lock_path = Path(sys.prefix) / ".memosd-facts-install.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed_matches_source():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--no-build-isolation",
                    "--no-index",
                    str(EXAMPLE),
                ],
                check=True,
                capture_output=True,
                timeout=300,
            )
            importlib.invalidate_caches()
        assert _installed_matches_source(), "memosd-facts did not install"
    return "facts"
