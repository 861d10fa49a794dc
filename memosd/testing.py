"""pytest fixtures that run a real memosd as a subprocess on a temporary socket.

Use from a test suite (ours or a plugin's)::

    pytest_plugins = ["memosd.testing"]

    def test_something(memosd_daemon):
        with memosd_daemon.client() as c:
            c.create_cube("notes")

Fixtures:

* ``memosd_daemon`` - a started daemon (:class:`DaemonHandle`), stopped with
  SIGTERM (then SIGKILL) after the test.
* ``memosd_daemon_factory`` - ``factory(env=..., config=..., plugins=...,
  settings=..., pythonpath=..., start=True)`` for daemons with custom
  settings (environment variables, TOML text, or ``{"dotted.name": value}``)
  and extra plugin modules (loaded through ``plugins.modules``; ``pythonpath``
  makes modules that are not installed importable by the daemon).
* ``memosd_engine`` - an in-process :class:`~memosd.engine.Engine` on a
  temporary data directory, closed after the test (no daemon).
* ``memosd_plugins`` - ``load(*modules, config=None)``: a loaded
  :class:`~memosd.plugins.manager.PluginManager` with the built-ins and the
  given plugin modules, to test forms and policies in-process.

Helper: :func:`fuzz_examples` scales a hypothesis test's example count by
``MEMOSD_FUZZ_SCALE`` (default 1, CI-sized; ``bench/soak.py`` runs more).

Plugin authors: ``pytest_plugins = ["memosd.testing"]`` in a ``conftest.py``
makes all of them available (docs/plugins.md).

Readiness is awaited by polling ``ping`` over the socket with a bound, never
by sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from memosd.client import Client
from memosd.errors import MemosError

__all__ = [
    "DaemonHandle",
    "fuzz_examples",
    "memosd_daemon",
    "memosd_daemon_factory",
    "memosd_engine",
    "memosd_plugins",
    "settings_env",
    "wait_until_ready",
]


def fuzz_examples(base: int) -> int:
    """``base`` hypothesis examples times ``MEMOSD_FUZZ_SCALE`` (a positive number, default 1).

    Fuzz tests keep a CI-sized default; long runs raise the scale
    (``MEMOSD_FUZZ_SCALE=20``, as ``bench/soak.py`` does) instead of editing
    the tests.  A malformed value is an error, not a silent default.
    """
    raw = os.environ.get("MEMOSD_FUZZ_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"MEMOSD_FUZZ_SCALE must be a number, got {raw!r}") from None
    if not scale > 0:
        raise ValueError(f"MEMOSD_FUZZ_SCALE must be positive, got {raw!r}")
    return max(1, round(base * scale))


_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux; keep a margin


def wait_until_ready(
    socket: Path, *, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``ping`` until the daemon answers; raise TimeoutError/RuntimeError otherwise."""
    deadline = time.monotonic() + timeout
    with Client(socket, timeout=0.5) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"memosd exited with {proc.returncode} before it was ready")
            if socket.exists():
                try:
                    client.ping()
                    return
                except MemosError:
                    pass
            time.sleep(0.02)
    raise TimeoutError(f"memosd on {socket} not ready within {timeout}s")


class DaemonHandle:
    """One memosd subprocess and its paths; restartable on the same data dir."""

    def __init__(
        self,
        base: Path,
        *,
        env: Mapping[str, str] | None = None,
        config: str | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self.base = base
        self.data_dir = base / "data"
        if run_dir is None:
            run_dir = base / "run"
            if len(str(run_dir / "memosd.sock")) > _SUN_PATH_MAX:
                run_dir = Path(tempfile.mkdtemp(prefix="memosd-", dir="/tmp")) / "run"
        self.run_dir = run_dir
        self.socket = run_dir / "memosd.sock"
        self.events_socket = run_dir / "events.sock"
        self.log_path = base / "memosd.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = base / "memosd.toml"
            self.config_path.write_text(config)
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("MEMOSD_", "NOTIFY_SOCKET"))
        }
        self.env["MEMOSD_LOG_FORMAT"] = "json"
        # Fast, model-free embeddings by default (pass env to use MiniLM).
        self.env["MEMOSD_INDEX_EMBEDDER"] = "hashing"
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "memosd",
            "--data-dir",
            str(self.data_dir),
            "--socket",
            str(self.socket),
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for readiness."""
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def start(self, timeout: float = 30.0) -> DaemonHandle:
        self.proc = self.spawn()
        try:
            wait_until_ready(self.socket, timeout=timeout, proc=self.proc)
        except BaseException:
            self.kill()
            raise RuntimeError(f"memosd did not start; log:\n{self.log_text()}") from None
        return self

    def client(self, **kwargs: Any) -> Client:
        kwargs.setdefault("timeout", 10.0)
        return Client(self.socket, **kwargs)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL (a crash): no drain, no checkpoint; stale socket files stay."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in ``timeout``. The exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        return proc.returncode

    def restart(self, *, kill: bool = True, timeout: float = 30.0) -> DaemonHandle:
        if kill:
            self.kill()
        else:
            self.terminate()
        return self.start(timeout=timeout)

    def stop(self) -> int:
        return self.terminate()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        if not str(self.run_dir).startswith(str(self.base)):
            shutil.rmtree(self.run_dir.parent, ignore_errors=True)


def settings_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """``{"plugins.allow": ["facts"]}`` -> ``{"MEMOSD_PLUGINS_ALLOW": "facts"}``."""
    env: dict[str, str] = {}
    for name, value in settings.items():
        if isinstance(value, list | tuple):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env["MEMOSD_" + name.replace(".", "_").upper()] = text
    return env


@pytest.fixture
def memosd_daemon_factory(
    tmp_path: Path,
) -> Iterator[Callable[..., DaemonHandle]]:
    handles: list[DaemonHandle] = []

    def factory(
        *,
        env: Mapping[str, str] | None = None,
        config: str | None = None,
        plugins: Sequence[str] = (),
        settings: Mapping[str, Any] | None = None,
        pythonpath: Sequence[str | os.PathLike[str]] = (),
        start: bool = True,
    ) -> DaemonHandle:
        base = tmp_path / f"d{len(handles)}"
        base.mkdir()
        extra = settings_env(settings or {})
        if plugins:
            extra["MEMOSD_PLUGINS_MODULES"] = ",".join(plugins)
        if pythonpath:
            inherited = os.environ.get("PYTHONPATH")
            extra["PYTHONPATH"] = os.pathsep.join(
                [*(str(p) for p in pythonpath), *([inherited] if inherited else [])]
            )
        handle = DaemonHandle(base, env={**extra, **(env or {})}, config=config)
        handles.append(handle)
        if start:
            handle.start()
        return handle

    yield factory
    for handle in handles:
        with contextlib.suppress(Exception):
            handle.cleanup()


@pytest.fixture
def memosd_daemon(memosd_daemon_factory: Callable[..., DaemonHandle]) -> DaemonHandle:
    return memosd_daemon_factory()


@pytest.fixture
def memosd_engine(tmp_path: Path) -> Iterator[Any]:
    """An in-process storage engine on a temporary data dir (closed after the test)."""
    from memosd.engine import Engine  # noqa: PLC0415 - only tests that ask pay for LMDB

    engine = Engine.open(tmp_path / "engine")
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def memosd_plugins() -> Callable[..., Any]:
    """``load(*modules, config=None)``: built-ins + these plugin modules, loaded in-process."""
    from memosd.plugins.manager import PluginConfig, PluginManager  # noqa: PLC0415

    def load(*modules: str, config: PluginConfig | None = None) -> PluginManager:
        base = config or PluginConfig()
        merged = PluginConfig(
            allow=base.allow, required=base.required, modules=(*base.modules, *modules)
        )
        return PluginManager(merged, entry_points=list).load()

    return load
