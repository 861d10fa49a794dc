"""sd_notify against a fake $NOTIFY_SOCKET (a bound AF_UNIX datagram socket)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from memosd import sdnotify


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_with_status(fake_systemd: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = fake_systemd
    assert sdnotify.ready("serving 3 cubes", env=env)
    assert received(sock) == "READY=1\nSTATUS=serving 3 cubes"


def test_each_helper_sends_its_state(fake_systemd: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = fake_systemd
    assert sdnotify.notify("READY=1\nSTATUS=x", env=env)
    assert received(sock) == "READY=1\nSTATUS=x"
    assert sdnotify.ready(env=env)
    assert received(sock) == "READY=1"
    assert sdnotify.stopping("draining", env=env)
    assert received(sock) == "STOPPING=1\nSTATUS=draining"
    assert sdnotify.watchdog(env=env)
    assert received(sock) == "WATCHDOG=1"
    assert sdnotify.status("recovering\nWAL", env=env)
    assert received(sock) == "STATUS=recovering WAL"  # one line, no injected keys
    assert sdnotify.extend_timeout(90, env=env)
    assert received(sock) == "EXTEND_TIMEOUT_USEC=90000000"


def test_uses_os_environ_by_default(
    fake_systemd: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env = fake_systemd
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert sdnotify.watchdog()
    assert received(sock) == "WATCHDOG=1"


def test_abstract_socket() -> None:
    name = f"memosd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert sdnotify.ready(env={"NOTIFY_SOCKET": "@" + name})
        assert received(sock) == "READY=1"
    finally:
        sock.close()


def test_no_socket_is_a_quiet_no_op(tmp_path: Path) -> None:
    assert not sdnotify.ready(env={})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": ""})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "relative/path"})
    # The socket went away (systemd restarted): never raises.
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval_s(env={"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval_s(env={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == (
        15.0
    )
    assert sdnotify.watchdog_interval_s(env={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is (
        None
    )
    assert sdnotify.watchdog_interval_s(env={}) is None
    assert sdnotify.watchdog_interval_s(env={"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval_s(env={"WATCHDOG_USEC": "soon"}) is None
    assert sdnotify.watchdog_interval_s(env={"WATCHDOG_USEC": "1", "WATCHDOG_PID": "x"}) is None
