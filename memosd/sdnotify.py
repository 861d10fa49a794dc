"""A tiny sd_notify(3): tell systemd about readiness, status and liveness.

The protocol is one ``AF_UNIX`` datagram of newline-separated ``KEY=VALUE``
lines sent to the socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract
socket when it starts with ``@``).  Without ``$NOTIFY_SOCKET`` (not under
systemd, or ``Type=`` is not ``notify``) every call is a cheap no-op returning
``False``.  Sending never raises: a lost notification must not take the daemon
down; the caller may log the ``False``.

The watchdog: systemd sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) from
``WatchdogSec=``; the service must send ``WATCHDOG=1`` more often than that.
:func:`watchdog_interval_s` returns half the interval (the customary margin),
or ``None`` when no watchdog applies to this process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = [
    "extend_timeout",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval_s",
]


def _address(env: Mapping[str, str]) -> str | None:
    target = env.get("NOTIFY_SOCKET", "")
    if not target:
        return None
    if target.startswith("@"):
        return "\0" + target[1:]  # Linux abstract namespace
    if target.startswith("/"):
        return target
    return None  # vsock/other forms are not supported


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``); ``True`` if sent."""
    address = _address(os.environ if env is None else env)
    if address is None or not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def ready(status_text: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """``READY=1`` (plus ``STATUS=``): startup finished, requests are served."""
    state = "READY=1"
    if status_text:
        state += f"\nSTATUS={_one_line(status_text)}"
    return notify(state, env=env)


def stopping(status_text: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """``STOPPING=1``: shutdown has begun."""
    state = "STOPPING=1"
    if status_text:
        state += f"\nSTATUS={_one_line(status_text)}"
    return notify(state, env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """``STATUS=``: a one-line free-form status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}", env=env)


def watchdog(*, env: Mapping[str, str] | None = None) -> bool:
    """``WATCHDOG=1``: the service is alive (send only while really healthy)."""
    return notify("WATCHDOG=1", env=env)


def extend_timeout(seconds: float, *, env: Mapping[str, str] | None = None) -> bool:
    """``EXTEND_TIMEOUT_USEC=``: ask for ``seconds`` more before start/stop times out.

    Each message extends the deadline to *now* + ``seconds``, so a long
    recovery sends it periodically with its progress as ``STATUS=``.
    """
    usec = max(0, int(seconds * 1_000_000))
    return notify(f"EXTEND_TIMEOUT_USEC={usec}", env=env)


def watchdog_interval_s(*, env: Mapping[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or ``None``.

    ``None`` when the watchdog is off or ``$WATCHDOG_PID`` names another
    process (the variables leaked into a child).
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2_000_000
