"""Daemon lifecycle: unhealthy engine, SIGHUP reload, watchdog, in-process serve()."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from memosd.client import AsyncClient
from memosd.daemon import EXIT_OK, EXIT_UNHEALTHY, Running, open_engine, serve
from memosd.errors import Unavailable, WalFailedError
from memosd.settings import Settings, load_settings
from memosd.testing import DaemonHandle, wait_until_ready


def short_settings(tmp_path: Path, **overrides: Any) -> Settings:
    run = Path(tempfile.mkdtemp(prefix="md-", dir="/tmp"))
    values: dict[str, Any] = {"data_dir": tmp_path / "data", "socket": run / "run" / "s.sock"}
    values.update(overrides)
    return load_settings(env={}, overrides=values)


class PoisonableEngine:
    """The real engine, with a switch that makes it report a failed WAL."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.poisoned = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property
    def healthy(self) -> bool:
        return not self.poisoned and bool(self._engine.healthy)

    @property
    def failure(self) -> Any:
        return WalFailedError("simulated EIO") if self.poisoned else None


def test_unhealthy_engine_refuses_writes_and_exits_nonzero(tmp_path: Path) -> None:
    settings = short_settings(tmp_path)
    holder: list[PoisonableEngine] = []

    def factory(s: Settings, on_progress: Callable[[str], None]) -> PoisonableEngine:
        holder.append(PoisonableEngine(open_engine(s, on_progress)))
        return holder[0]

    async def main() -> int:
        never = anyio.Event()
        async with anyio.create_task_group() as tg:
            result: list[int] = []

            async def run(*, task_status: anyio.abc.TaskStatus[Running]) -> None:
                result.append(
                    await serve(
                        settings,
                        shutdown_trigger=never.wait,
                        task_status=task_status,
                        engine_factory=factory,
                    )
                )

            await tg.start(run)
            async with AsyncClient(settings.socket, timeout=10) as c:
                await c.create_cube("h")
                holder[0].poisoned = True
                with pytest.raises(Unavailable) as info:
                    await c.add("h", "refused")
                assert info.value.reason == "unhealthy"
        return result[0]

    assert anyio.run(main, backend="asyncio") == EXIT_UNHEALTHY


def test_serve_in_process_clean_shutdown(tmp_path: Path) -> None:
    settings = short_settings(tmp_path)

    async def main() -> int:
        stop = anyio.Event()
        code: list[int] = []
        async with anyio.create_task_group() as tg:

            async def run(*, task_status: anyio.abc.TaskStatus[Running]) -> None:
                code.append(
                    await serve(settings, shutdown_trigger=stop.wait, task_status=task_status)
                )

            running = await tg.start(run)
            assert running.socket == settings.socket
            async with AsyncClient(settings.socket, timeout=10) as c:
                assert (await c.ping())["pong"] is True
            stop.set()
        return code[0]

    assert anyio.run(main, backend="asyncio") == EXIT_OK
    assert not settings.socket.exists()


def test_sighup_reloads_log_level(memosd_daemon_factory: Callable[..., DaemonHandle]) -> None:
    daemon = memosd_daemon_factory(config='[log]\nlevel = "info"\n')
    assert daemon.config_path is not None
    daemon.config_path.write_text('[log]\nlevel = "debug"\n[server]\nmax_inflight = 3\n')
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in daemon.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = daemon.log_text()
    assert "configuration reloaded" in log
    assert "server.max_inflight" in log  # reported as needing a restart
    with daemon.client() as c:
        c.create_cube("x")  # not an inline op: logged per request at debug level
    deadline = time.monotonic() + 10
    while '"request"' not in daemon.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"op": "create_cube"' in daemon.log_text()  # debug level is live


def test_watchdog_and_ready_via_notify_socket(tmp_path: Path) -> None:
    path = f"/tmp/memosd-wd-{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        try:
            daemon = DaemonHandle(tmp_path, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
            daemon.proc = daemon.spawn()
            wait_until_ready(daemon.socket, proc=daemon.proc)
            sock.settimeout(5)
            seen: list[str] = []
            while not any("WATCHDOG=1" in m for m in seen):
                seen.append(sock.recv(4096).decode())
            daemon.terminate()
        finally:
            os.unlink(path)
    joined = "\n".join(seen)
    assert "EXTEND_TIMEOUT_USEC=" in joined
    assert "READY=1" in joined
