"""Run a Python module under (part of) memosd.service's sandbox, without systemd.

PID 1 of the build sandbox is not systemd, so the unit cannot be started.  This
applies, in-process and before the module runs, the restrictions that can be
reproduced with plain kernel interfaces:

* ``NoNewPrivileges=yes``      → prctl(PR_SET_NO_NEW_PRIVS)
* ``CapabilityBoundingSet=``   → prctl(PR_CAPBSET_DROP) for every capability
* ``SystemCallFilter=@system-service`` minus the unit's ``~@privileged ...`` groups,
  ``SystemCallErrorNumber=EPERM`` → a seccomp allow-list built with libseccomp
  from ``systemd-analyze syscall-filter`` (the same tables systemd uses)

Usage: ``python hardened_run.py -m MODULE [ARGS...]`` or ``... hardened_run.py SCRIPT [ARGS...]``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import re
import runpy
import subprocess
import sys
from functools import cache
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "memosd.service"

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
SCMP_ACT_ALLOW = 0x7FFF0000


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


@cache
def expand(group: str) -> frozenset[str]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", group],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        names |= expand(entry) if entry.startswith("@") else {entry}
    return frozenset(names)


def unit_syscalls() -> set[str]:
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in UNIT.read_text().splitlines():
        match = re.fullmatch(r"SystemCallFilter=(~?)(.*)", line.strip())
        if not match:
            continue
        for token in match.group(2).split():
            names = expand(token) if token.startswith("@") else {token}
            (denied if match.group(1) else allowed).update(names)
    return allowed - denied


def install_filter() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last cap: ignored
    seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
    ]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = seccomp.seccomp_init(scmp_act_errno(errno.EPERM))
    allowed = 0
    for name in sorted(unit_syscalls()):
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            continue  # not on this architecture
        if seccomp.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0) == 0:
            allowed += 1
    if seccomp.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load failed")
    print(f"hardened_run: {allowed} system calls allowed", file=sys.stderr, flush=True)


def main() -> None:
    args = sys.argv[1:]
    install_filter()
    if args[:1] == ["-m"]:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
