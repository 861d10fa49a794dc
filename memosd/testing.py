"""pytest fixtures that run a real memosd as a subprocess on a temporary socket.

Use from a test suite (ours or a plugin's)::

    pytest_plugins = ["memosd.testing"]

    def test_something(memosd_daemon):
        with memosd_daemon.client() as c:
            c.create_cube("notes")

Fixtures:

* ``memosd_daemon`` - a started daemon (:class:`DaemonHandle`), stopped with
  SIGTERM (then SIGKILL) after the test.
* ``memosd_daemon_factory`` - ``factory(env=..., config=..., start=True)`` for
  daemons with custom settings (environment variables or TOML text).

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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from memosd.client import Client
from memosd.errors import MemosError

__all__ = ["DaemonHandle", "memosd_daemon", "memosd_daemon_factory", "wait_until_ready"]

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


@pytest.fixture
def memosd_daemon_factory(
    tmp_path: Path,
) -> Iterator[Callable[..., DaemonHandle]]:
    handles: list[DaemonHandle] = []

    def factory(
        *, env: Mapping[str, str] | None = None, config: str | None = None, start: bool = True
    ) -> DaemonHandle:
        base = tmp_path / f"d{len(handles)}"
        base.mkdir()
        handle = DaemonHandle(base, env=env, config=config)
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
