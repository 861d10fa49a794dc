"""memctl's documented exit codes (docs/cli.md), and the error → code mapping.

Errors become exit codes here, at the CLI's edge, and nowhere else: the
client library and the daemon raise :mod:`memosd.errors` classes, whose
stable wire ``code`` picks the exit status.
"""

from __future__ import annotations

from typing import Final

from memosd.errors import MemosError

__all__ = [
    "EXIT_CONFLICT",
    "EXIT_FORBIDDEN",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_TOO_LARGE",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "exit_code_for",
]

EXIT_OK: Final = 0
EXIT_INTERNAL: Final = 1
"""An internal daemon error or an unexpected failure in memctl itself."""
EXIT_USAGE: Final = 2
"""Bad command line (click's own usage errors use 2 too) or a ``bad_request``."""
EXIT_NOT_FOUND: Final = 3
EXIT_FORBIDDEN: Final = 4
"""``unauthorized`` (bad token) or ``forbidden`` (no grant / not admin)."""
EXIT_CONFLICT: Final = 5
EXIT_UNAVAILABLE: Final = 6
"""The daemon is not running, does not answer, or refuses writes now."""
EXIT_TOO_LARGE: Final = 7
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C (128 + SIGINT), as shells expect."""

_BY_CODE: Final[dict[str, int]] = {
    "bad_request": EXIT_USAGE,
    "unauthorized": EXIT_FORBIDDEN,
    "forbidden": EXIT_FORBIDDEN,
    "not_found": EXIT_NOT_FOUND,
    "conflict": EXIT_CONFLICT,
    "too_large": EXIT_TOO_LARGE,
    "unavailable": EXIT_UNAVAILABLE,
    "internal": EXIT_INTERNAL,
}


def exit_code_for(error: MemosError) -> int:
    """The exit status for an error of the memosd error tree."""
    return _BY_CODE.get(error.code, EXIT_INTERNAL)
