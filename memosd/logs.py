"""Logging for the daemon (structlog).

Formats:

* ``json`` — one JSON object per line (``timestamp``, ``level``, ``event`` and
  the bound key/values).  Chosen by ``auto`` when running under systemd
  (``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set) or when the stream is not a
  terminal.  When the stream *is* the journal (``$JOURNAL_STREAM`` matches
  its device:inode), each line starts with the sd-daemon ``<N>`` priority
  prefix, which journald strips and turns into the entry's priority.
* ``console`` — readable, coloured when the stream is a terminal.

:func:`configure_logging` may be called again at any time (the daemon calls
it on SIGHUP with reloaded settings): loggers are not cached, so existing
``structlog.get_logger()`` objects pick up the new configuration.  Records
from the standard :mod:`logging` module (libraries) are rendered the same way.

**Rule: memory contents are never logged above ``debug``.**  Item text,
search queries, metadata values and payloads are user data; at ``info`` and
above log ids, cube names, sizes, counts and timings only.  As a safety net a
processor replaces the values of the keys in :data:`CONTENT_KEYS` with
``"<redacted: N chars>"`` in every event above ``debug``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from memosd.settings import LogSettings

__all__ = [
    "CONTENT_KEYS",
    "configure_logging",
    "get_logger",
    "resolve_format",
    "under_systemd",
]

#: Event keys whose values are memory contents; redacted above ``debug``.
CONTENT_KEYS: Final = frozenset({"text", "content", "query", "metadata", "payload", "memory"})

_LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# sd-daemon(3) priorities (syslog levels) for the <N> line prefix.
_SYSLOG_PRIORITY: Final[dict[str, int]] = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "critical": 2,
    "exception": 3,
}


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    """True when started by systemd (its stdout/stderr go to the journal)."""
    env = os.environ if env is None else env
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def _is_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    expected = env.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


def resolve_format(fmt: str, stream: TextIO, env: Mapping[str, str] | None = None) -> str:
    """``"json"`` or ``"console"`` for a configured format (``auto`` decided here)."""
    if fmt in ("json", "console"):
        return fmt
    env = os.environ if env is None else env
    if under_systemd(env) or not _isatty(stream):
        return "json"
    return "console"


def _redact_contents(_logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    if method == "debug":
        return event_dict
    for key in CONTENT_KEYS.intersection(event_dict):
        value = event_dict[key]
        size = len(value) if isinstance(value, str | bytes | list | dict | tuple) else 0
        event_dict[key] = f"<redacted: {size} {'chars' if isinstance(value, str) else 'items'}>"
    return event_dict


class _PriorityPrefix:
    """Prefix a rendered line with ``<N>`` so journald records its priority."""

    def __init__(self, inner: Processor) -> None:
        self._inner = inner

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        level = str(event_dict.get("level", method))
        rendered = self._inner(logger, method, event_dict)
        if isinstance(rendered, bytes | bytearray):
            rendered = bytes(rendered).decode("utf-8", "replace")
        return f"<{_SYSLOG_PRIORITY.get(level, 6)}>{rendered}"


def configure_logging(
    log_settings: LogSettings,
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """(Re)configure structlog and stdlib logging; returns the format chosen.

    ``stream`` defaults to ``sys.stderr`` *at call time*.
    """
    stream = sys.stderr if stream is None else stream
    env = os.environ if env is None else env
    fmt = resolve_format(log_settings.format, stream, env)
    level = _LEVELS.get(log_settings.level, logging.INFO)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _redact_contents,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if fmt == "json":
        # Tracebacks as data, *without* frame locals: locals hold memory contents.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        if _is_journal(stream, env):
            renderer = _PriorityPrefix(renderer)
    else:
        # plain tracebacks: rich's default would print frame locals (memory contents).
        renderer = structlog.dev.ConsoleRenderer(
            colors=_isatty(stream), exception_formatter=structlog.dev.plain_traceback
        )

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name("memosd")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "memosd":
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return fmt


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger (bound with ``initial`` key/values)."""
    return structlog.get_logger(name, **initial)
