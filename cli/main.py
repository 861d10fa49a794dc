"""memctl: the command line for memosd, a thin layer over :mod:`memosd.client`.

Every command takes ``--json`` (stable machine-readable output on stdout),
``--socket`` (``$MEMOSD_SOCKET``) and ``--token`` (``$MEMOSD_TOKEN``); the
same three options are also accepted before the command
(``memctl --json cube list``).  Errors are turned into one line on stderr (a
JSON object with ``--json``) and a documented exit code (:mod:`exitcodes`)
here at the edge, never a traceback.  docs/cli.md is the reference.
"""

# Typer maps positional parameters to CLI arguments and options: a command's
# signature *is* its command line, so the positional-count rule does not apply.
# ruff: noqa: PLR0917

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import json
import math
import os
import socket as socketlib
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import click
import typer

from memosd.cli import exitcodes
from memosd.cli.render import (
    format_time_us,
    jsonable,
    preview,
    print_json,
    print_kv,
    print_table,
)
from memosd.errors import BadRequest, Forbidden, MemosError, Unavailable
from memosd.settings import default_socket_path

if TYPE_CHECKING:
    from memosd.client import Client

__all__ = ["app", "main"]

app = typer.Typer(
    name="memctl",
    help="Control memosd, the memory OS daemon: cubes, memories, tokens, maintenance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
cube_app = typer.Typer(
    help="Create, inspect, share, export and import cubes.", no_args_is_help=True
)
token_app = typer.Typer(help="API tokens (admin only).", no_args_is_help=True)
wal_app = typer.Typer(help="Write-ahead log maintenance (admin only).", no_args_is_help=True)
app.add_typer(cube_app, name="cube")
app.add_typer(token_app, name="token")
app.add_typer(wal_app, name="wal")

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Machine-readable JSON output (stable keys).")
]
# The environment is read once, by the options before the command; options after
# the command carry no envvar, so an explicit flag anywhere beats the environment.
GlobalSocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        envvar="MEMOSD_SOCKET",
        help="Daemon ipc socket path [default: the per-user or system daemon's socket].",
        show_default=False,
    ),
]
GlobalTokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="MEMOSD_TOKEN", help="API token.", show_default=False),
]
SocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        help="Daemon ipc socket path [env: MEMOSD_SOCKET; default: the per-user or system "
        "daemon's socket].",
        show_default=False,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="API token [env: MEMOSD_TOKEN].", show_default=False),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", help="Seconds to wait for the daemon [default: 30].", min=0.1),
]


class GrantLevel(enum.StrEnum):
    READ = "read"
    WRITE = "write"


YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


# --- the edge: options, client, errors ----------------------------------------------------


@dataclass(slots=True)
class _Globals:
    json: bool = False
    socket: Path | None = None
    token: str | None = None
    timeout: float | None = None


@app.callback()
def _main(
    ctx: typer.Context,
    json_out: JsonOpt = False,
    socket: GlobalSocketOpt = None,
    token: GlobalTokenOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    ctx.obj = _Globals(json=json_out, socket=socket, token=token, timeout=timeout)


class _Session:
    """One command's resolved options, its client and its output streams."""

    def __init__(
        self,
        ctx: typer.Context | None,
        json_out: bool,
        socket: Path | None = None,
        token: str | None = None,
    ) -> None:
        root = ctx.find_root().obj if ctx is not None else None
        g = root if isinstance(root, _Globals) else _Globals()
        self.json = json_out or g.json
        self.socket = socket or g.socket or default_socket_path()
        self.token = token or g.token
        self.timeout = g.timeout if g.timeout is not None else 30.0
        self.out = sys.stdout
        self.err = sys.stderr
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            _check_socket(self.socket)
            # Imported here: offline commands (cube inspect, --help) never need pyzmq.
            from memosd.client import Client  # noqa: PLC0415

            self._client = Client(self.socket, token=self.token, timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    def emit(self, value: Any) -> bool:
        """Print ``value`` as JSON when ``--json``; True if it did (the caller skips text)."""
        if self.json:
            print_json(value, self.out)
        return self.json

    def line(self, text: str) -> None:
        self.out.write(text + "\n")

    def fail(self, error: MemosError) -> NoReturn:
        code = exitcodes.exit_code_for(error)
        if self.json:
            wire = {"error": {**error.to_wire(), "exit_code": code}}
            self.err.write(json.dumps(jsonable(wire)) + "\n")
        else:
            self.err.write(f"memctl: {_describe(error)}\n")
        raise typer.Exit(code)


def _describe(error: MemosError) -> str:
    message = error.message or type(error).__name__
    if error.reason in ("not_running", "socket_permission"):
        return message  # already a complete sentence written for this CLI
    label = {
        "not_found": "not found",
        "forbidden": "permission denied",
        "unauthorized": "not authorized",
        "conflict": "conflict",
        "too_large": "too large",
        "unavailable": "unavailable",
        "bad_request": "bad request",
        "internal": "internal error",
    }.get(error.code, error.code)
    return message if message.lower().startswith(label) else f"{label}: {message}"


def _no_access(path: Path) -> Forbidden:
    return Forbidden(
        f"cannot reach the memosd socket {path}: permission denied (is your user in "
        "the memosd-clients group?)",
        reason="socket_permission",
        socket=str(path),
    )


def _check_socket(path: Path) -> None:
    """Fail fast with a clear message when no daemon listens at ``path``.

    ZeroMQ would otherwise wait for the socket until the timeout.  A plain
    connect tells a live daemon from a stale socket file left by a crash
    (ECONNREFUSED); the daemon sees a peer that connects and leaves.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise Unavailable(
            f"memosd is not running (no socket at {path}); start it with `memosd` or "
            "`systemctl start memosd`, or point --socket / MEMOSD_SOCKET at it",
            reason="not_running",
            socket=str(path),
        ) from None
    except PermissionError:
        raise _no_access(path) from None
    except OSError as exc:
        raise Unavailable(
            f"cannot reach the memosd socket {path}: {exc.strerror}", reason="not_running"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise Unavailable(f"{path} is not a socket (is --socket right?)", reason="not_running")
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        raise Unavailable(
            f"memosd is not running (stale socket at {path}: nothing listens on it, "
            "probably left by a crash); start it with `memosd` or `systemctl start memosd`",
            reason="not_running",
            socket=str(path),
        ) from None
    except PermissionError:
        raise _no_access(path) from None
    except OSError:
        pass  # e.g. a full backlog: let the client try and time out with its own message
    finally:
        probe.close()


@contextlib.contextmanager
def _session(
    ctx: typer.Context, json_out: bool, socket: Path | None, token: str | None
) -> Iterator[_Session]:
    session = _Session(ctx, json_out, socket, token)
    try:
        yield session
    except MemosError as error:
        session.fail(error)
    except (typer.Exit, typer.Abort, click.exceptions.ClickException):
        raise
    except KeyboardInterrupt:
        session.err.write("memctl: interrupted\n")
        raise typer.Exit(exitcodes.EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # `memctl ... | head`: the reader left; nothing more to say.
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces the closed pipe
        raise typer.Exit(exitcodes.EXIT_OK) from None
    except Exception as exc:
        if os.environ.get("MEMCTL_DEBUG"):
            raise
        session.err.write(
            f"memctl: unexpected error: {type(exc).__name__}: {exc} (set MEMCTL_DEBUG=1 "
            "for a traceback)\n"
        )
        raise typer.Exit(exitcodes.EXIT_INTERNAL) from None
    finally:
        session.close()


# --- argument parsing helpers ---------------------------------------------------------


def parse_time_us(text: str) -> int:
    """``--as-of``: epoch seconds (``1700000000``, ``1700000000.5``) or ISO-8601.

    An ISO time without a zone is taken as UTC; ``Z`` is accepted.
    """
    raw = text.strip()
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise BadRequest(f"--as-of: not a time: {text!r}", reason="bad_time")
        return round(seconds * 1_000_000)
    try:
        moment = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"--as-of: {text!r} is neither epoch seconds nor an ISO-8601 time "
            "(e.g. 2026-01-31T12:00:00Z)",
            reason="bad_time",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_payload(text: str | None) -> dict[str, Any] | None:
    """``--payload``: a JSON object (or None when not given)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"--payload is not valid JSON: {exc}", reason="bad_arg") from None
    if not isinstance(value, dict):
        raise BadRequest("--payload must be a JSON object", reason="bad_arg")
    return value


def parse_meta(pairs: list[str]) -> dict[str, Any] | None:
    """``--meta k=v`` (string value) and ``--meta k:=JSON`` (typed value)."""
    if not pairs:
        return None
    metadata: dict[str, Any] = {}
    for pair in pairs:
        if ":=" in pair and (pair.index(":=") < pair.index("=") + 1 or "=" not in pair):
            key, raw = pair.split(":=", 1)
            try:
                value: Any = json.loads(raw)
            except json.JSONDecodeError:
                raise BadRequest(
                    f"--meta {pair!r}: the value after ':=' must be JSON", reason="bad_meta"
                ) from None
        elif "=" in pair:
            key, value = pair.split("=", 1)
        else:
            raise BadRequest(f"--meta {pair!r}: expected KEY=VALUE or KEY:=JSON", reason="bad_meta")
        if not key:
            raise BadRequest(f"--meta {pair!r}: empty key", reason="bad_meta")
        metadata[key] = value
    return metadata


def _read_text(text: str) -> str:
    """TEXT arguments: ``-`` reads standard input."""
    if text == "-":
        return sys.stdin.read()
    return text


def read_entries(lines: Iterator[str] | list[str], *, jsonl: bool) -> list[Any]:
    """``add-many`` input: one item per non-blank line (its text, or with ``jsonl``
    a JSON string or object of ``add``'s fields); BadRequest names the bad line."""
    entries: list[Any] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            entries.append(line.rstrip("\r\n"))
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"line {number}: not JSON: {exc.msg}", reason="bad_arg") from None
        if not isinstance(entry, str | dict):
            raise BadRequest(
                f"line {number}: expected a JSON string or object, got {type(entry).__name__}",
                reason="bad_arg",
            )
        entries.append(entry)
    return entries


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _operation(item: Any) -> Any:
    provenance = _field(item, "provenance")
    return _field(provenance, "operation") if provenance is not None else None


def _print_item(s: _Session, item: Any) -> None:
    provenance = _field(item, "provenance")
    pairs: list[tuple[str, Any]] = [
        ("id", _field(item, "id")),
        ("cube", _field(item, "cube")),
        ("version", _field(item, "version")),
        ("status", _field(item, "status")),
        ("form", _field(item, "form")),
        ("tier", _field(item, "tier")),
        ("tags", list(_field(item, "tags", ()) or ())),
        ("created", format_time_us(_field(item, "created_us"))),
        ("recorded", format_time_us(_field(item, "recorded_us"))),
    ]
    if _field(item, "valid_from_us") is not None or _field(item, "valid_to_us") is not None:
        pairs.append(("valid_from", format_time_us(_field(item, "valid_from_us"))))
        pairs.append(("valid_to", format_time_us(_field(item, "valid_to_us"))))
    if provenance is not None:
        for key in ("operation", "actor", "source", "session"):
            value = _field(provenance, key)
            if value is not None:
                pairs.append((key, value))
    metadata = _field(item, "metadata")
    if metadata:
        pairs.append(("metadata", dict(metadata)))
    print_kv(pairs, s.out)
    s.line("")
    s.line(str(_field(item, "text", "")))


# --- status and identity --------------------------------------------------------------


@app.command()
def status(
    ctx: typer.Context, json_out: JsonOpt = False, socket: SocketOpt = None, token: TokenOpt = None
) -> None:
    """Daemon health, version and (for admins) engine state; exit 6 if unhealthy."""
    with _session(ctx, json_out, socket, token) as s:
        result = s.client.status()
        if not s.emit(result):
            flat: list[tuple[str, Any]] = [("socket", str(s.socket))]
            for key, value in dict(result).items():
                if isinstance(value, dict):
                    for sub_key, sub_value in value.items():
                        flat.append((f"{key}.{sub_key}", sub_value))
                else:
                    flat.append((key, value))
            print_kv(flat, s.out)
        if result.get("healthy") is False:
            # Monitoring can use the exit status alone: the daemon runs but refuses writes.
            raise typer.Exit(exitcodes.EXIT_UNAVAILABLE)


@app.command()
def whoami(
    ctx: typer.Context, json_out: JsonOpt = False, socket: SocketOpt = None, token: TokenOpt = None
) -> None:
    """The principal the daemon sees for this connection (uid or token) and if it is admin."""
    with _session(ctx, json_out, socket, token) as s:
        result = s.client.whoami()
        if not s.emit(result):
            print_kv(list(dict(jsonable(result)).items()), s.out)


@app.command()
def plugins(
    ctx: typer.Context, json_out: JsonOpt = False, socket: SocketOpt = None, token: TokenOpt = None
) -> None:
    """Plugins the daemon found: name, version, status (loaded / failed / disabled), hooks."""
    with _session(ctx, json_out, socket, token) as s:
        try:
            result = dict(jsonable(s.client.call("plugins")))
        except BadRequest as exc:
            if exc.reason != "unknown_op":
                raise
            # An older daemon: no plugins op; its status may still carry the list.
            status = dict(jsonable(s.client.status()))
            result = {"plugins": status.get("plugins") or []}
        loaded = result.get("plugins")
        if s.emit(result):
            return
        if not isinstance(loaded, list):
            s.line("The daemon reports no plugin information (no plugin system in this version).")
            return
        rows = []
        for p in loaded:
            state = str(_field(p, "status", "loaded"))
            reason = _field(p, "reason")
            rows.append(
                [
                    _field(p, "name", p),
                    _field(p, "version"),
                    f"{state}: {reason}" if reason else state,
                    ", ".join(str(h) for h in _field(p, "hooks", []) or []),
                ]
            )
        print_table(["NAME", "VERSION", "STATUS", "HOOKS"], rows, s.out, empty="No plugins.")
        forms = result.get("forms")
        if isinstance(forms, list) and forms:
            s.line("forms: " + ", ".join(str(f) for f in forms))
        policies = result.get("tier_policies")
        if isinstance(policies, list) and policies:
            s.line("tier policies: " + ", ".join(str(p) for p in policies))


# --- cubes ----------------------------------------------------------------------------


def _cube_row(cube: Any) -> list[Any]:
    return [
        _field(cube, "name"),
        _field(cube, "owner"),
        _field(cube, "access"),
        format_time_us(_field(cube, "created_us")),
    ]


@cube_app.command("create")
def cube_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Cube name: [A-Za-z0-9][A-Za-z0-9_.-]{0,127}.")],
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a cube owned by you."""
    with _session(ctx, json_out, socket, token) as s:
        cube = s.client.create_cube(name)
        if not s.emit(cube):
            s.line(f"created cube {_field(cube, 'name', name)}")


@cube_app.command("list")
def cube_list(
    ctx: typer.Context, json_out: JsonOpt = False, socket: SocketOpt = None, token: TokenOpt = None
) -> None:
    """Cubes you own or have a grant on."""
    with _session(ctx, json_out, socket, token) as s:
        cubes = list(s.client.list_cubes())
        if not s.emit(cubes):
            print_table(
                ["NAME", "OWNER", "ACCESS", "CREATED"],
                (_cube_row(c) for c in cubes),
                s.out,
                empty="No cubes.",
            )


@cube_app.command("show")
def cube_show(
    ctx: typer.Context,
    name: str,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """A cube's owner, configuration, item counts and (for its owner) grants."""
    with _session(ctx, json_out, socket, token) as s:
        cube = s.client.get_cube(name)
        if s.emit(cube):
            return
        wire = dict(jsonable(cube))
        pairs: list[tuple[str, Any]] = [
            ("name", wire.get("name")),
            ("owner", wire.get("owner")),
            ("access", wire.get("access")),
            ("created", format_time_us(wire.get("created_us"))),
            ("schema_version", wire.get("schema_version")),
        ]
        if isinstance(wire.get("config"), dict):
            pairs.append(("config", wire["config"]))
        if isinstance(wire.get("counts"), dict):
            for key, value in wire["counts"].items():
                pairs.append((f"items.{key}", value))
        if isinstance(wire.get("grants"), dict):
            grants = wire["grants"]
            pairs.append(("grants", ", ".join(f"{p}={lv}" for p, lv in grants.items()) or "-"))
        print_kv(pairs, s.out)


def _confirm(yes: bool, action: str) -> None:
    """Ask before destroying data; without a terminal, insist on --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise BadRequest(
            f"refusing to {action} without --yes (no terminal to ask)", reason="needs_yes"
        )
    if not typer.confirm(f"Really {action}?", default=False, err=True):
        raise typer.Exit(exitcodes.EXIT_USAGE)


@cube_app.command("drop")
def cube_drop(
    ctx: typer.Context,
    name: str,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Erase a cube and every item in it (asks unless --yes)."""
    with _session(ctx, json_out, socket, token) as s:
        _confirm(yes, f"erase cube {name!r} and all its items")
        erased = s.client.drop_cube(name)
        if not s.emit({"name": name, "erased": erased}):
            s.line(f"dropped cube {name} ({erased} items erased)")


@cube_app.command("export")
def cube_export(
    ctx: typer.Context,
    name: str,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="File to write ('-' for stdout) [default: NAME.memcube]."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Export a cube (all items, all versions, purges, grants) to one portable file."""
    with _session(ctx, json_out, socket, token) as s:
        target = output if output is not None else Path(f"{name}.memcube")
        to_stdout = str(target) == "-"
        if to_stdout and json_out:
            raise BadRequest("--json and --output - both use stdout; pick one")
        if not to_stdout and target.exists() and not force:
            raise BadRequest(f"{target} exists; use --force to overwrite", reason="exists")
        data = bytes(s.client.export_cube(name))
        if to_stdout:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        _write_atomically(target, data)
        if not s.emit({"cube": name, "path": str(target), "bytes": len(data)}):
            s.line(f"exported cube {name} to {target} ({len(data)} bytes)")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BadRequest(f"cannot write {path}: {exc.strerror or exc}", reason="io") from None


def _read_file(path: Path) -> bytes:
    try:
        return sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror or exc}", reason="io") from None


@cube_app.command("import")
def cube_import(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A portable cube file ('-' for stdin).")],
    name: Annotated[
        str | None, typer.Option("--name", help="Import under this name [default: the file's].")
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Import a portable cube file (the daemon verifies every checksum first)."""
    with _session(ctx, json_out, socket, token) as s:
        data = _read_file(path)
        cube = s.client.import_cube(data, name=name)
        if not s.emit(cube):
            s.line(f"imported cube {_field(cube, 'name', name)}")


@cube_app.command("inspect")
def cube_inspect(
    path: Annotated[Path, typer.Argument(help="A portable cube file ('-' for stdin).")],
    json_out: JsonOpt = False,
) -> None:
    """Verify a portable cube file offline (no daemon needed) and show its manifest."""
    s = _Session(None, json_out)
    try:
        from memosd.portable import read_portable  # noqa: PLC0415 - loads the engine's model

        portable = read_portable(_read_file(path))
    except MemosError as error:
        s.fail(error)
    if s.emit(portable.manifest):
        return
    m = portable.manifest
    pairs = [
        ("file", str(path)),
        ("format", f"{m['format']} v{m['format_version']}"),
        ("cube", m["cube"]),
        ("created", m.get("created")),
        ("producer", m.get("producer")),
    ]
    pairs += [(k, v) for k, v in m["counts"].items()]
    pairs.append(("checksums", "all verified"))
    print_kv(pairs, s.out)


@cube_app.command("grant")
def cube_grant(
    ctx: typer.Context,
    cube: str,
    principal: Annotated[str, typer.Argument(help="uid:N or token:NAME.")],
    level: Annotated[GrantLevel, typer.Argument(help="read or write.")],
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Let PRINCIPAL read (get, search, history) or write a cube (owner only)."""
    with _session(ctx, json_out, socket, token) as s:
        s.client.grant(cube, principal, level.value)
        if not s.emit({"cube": cube, "principal": principal, "level": level.value}):
            s.line(f"granted {level.value} on {cube} to {principal}")


@cube_app.command("revoke")
def cube_revoke(
    ctx: typer.Context,
    cube: str,
    principal: str,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Remove PRINCIPAL's grant on a cube (owner only)."""
    with _session(ctx, json_out, socket, token) as s:
        s.client.revoke(cube, principal)
        if not s.emit({"cube": cube, "principal": principal, "level": None}):
            s.line(f"revoked access to {cube} from {principal}")


# --- tokens ---------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: str,
    principal: Annotated[
        str | None,
        typer.Option("--principal", help="Act as this principal [default: token:NAME]."),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a token; its secret is printed once and stored only hashed."""
    with _session(ctx, json_out, socket, token) as s:
        secret = s.client.token_create(name, principal=principal)
        if s.emit({"name": name, "principal": principal or f"token:{name}", "token": secret}):
            return
        s.err.write(f"created token {name}; the secret is shown once, store it now:\n")
        s.line(secret)


@token_app.command("list")
def token_list(
    ctx: typer.Context, json_out: JsonOpt = False, socket: SocketOpt = None, token: TokenOpt = None
) -> None:
    """Token names and principals (never secrets)."""
    with _session(ctx, json_out, socket, token) as s:
        tokens = list(s.client.token_list())
        if not s.emit(tokens):
            rows = [
                [_field(t, "name"), _field(t, "principal"), format_time_us(_field(t, "created_us"))]
                for t in tokens
            ]
            print_table(["NAME", "PRINCIPAL", "CREATED"], rows, s.out, empty="No tokens.")


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context,
    name: str,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete a token; requests using it fail from now on."""
    with _session(ctx, json_out, socket, token) as s:
        s.client.token_revoke(name)
        if not s.emit({"name": name, "revoked": True}):
            s.line(f"revoked token {name}")


# --- items ----------------------------------------------------------------------------


@app.command()
def add(
    ctx: typer.Context,
    cube: str,
    text: Annotated[str, typer.Argument(help="The memory text ('-' reads stdin).")],
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="A tag (repeatable).")
    ] = None,
    source: Annotated[str | None, typer.Option(help="Where the memory came from.")] = None,
    session_id: Annotated[
        str | None, typer.Option("--session", help="Conversation/session id.")
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", "-m", help="Metadata KEY=VALUE (string) or KEY:=JSON (repeatable)."),
    ] = None,
    form: Annotated[
        str | None,
        typer.Option("--form", help="Memory form (a plugin's, e.g. 'fact') [default: plaintext]."),
    ] = None,
    payload: Annotated[
        str | None,
        typer.Option("--payload", help="The form's payload as a JSON object."),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Add a memory item; prints its id."""
    with _session(ctx, json_out, socket, token) as s:
        item = s.client.add(
            cube,
            _read_text(text),
            tags=tuple(tag or ()),
            source=source,
            session=session_id,
            metadata=parse_meta(meta or []),
            form=form,
            payload=parse_payload(payload),
        )
        if not s.emit(item):
            s.line(str(_field(item, "id")))


@app.command("add-many")
def add_many(
    ctx: typer.Context,
    cube: str,
    file: Annotated[str, typer.Argument(help="One item per line ('-' reads stdin).")],
    jsonl: Annotated[
        bool,
        typer.Option(
            "--jsonl",
            help="Each line is JSON: a string, or an object of add's fields "
            "(text, tags, source, session, metadata, tier, form, payload, ...).",
        ),
    ] = False,
    batch: Annotated[
        int,
        typer.Option(
            "--batch", min=1, max=1000, help="Items per request (each is one atomic step)."
        ),
    ] = 500,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Add many items in atomic batches (one WAL record each); prints their ids."""
    with _session(ctx, json_out, socket, token) as s:
        try:
            if file == "-":
                entries = read_entries(list(sys.stdin), jsonl=jsonl)
            else:
                with open(file, encoding="utf-8") as fh:
                    entries = read_entries(fh, jsonl=jsonl)
        except (OSError, UnicodeDecodeError) as exc:
            raise BadRequest(f"cannot read {file}: {exc}", reason="bad_arg") from None
        items: list[Any] = []
        for start in range(0, len(entries), batch):
            try:
                items += s.client.add_many(cube, entries[start : start + batch])
            except MemosError:
                if items:  # earlier batches are durable: say so before the error
                    s.err.write(f"memctl: {len(items)} items were added before the error\n")
                raise
        if not s.emit(items):
            for item in items:
                s.line(str(_field(item, "id")))


@app.command()
def get(
    ctx: typer.Context,
    cube: str,
    item_id: Annotated[str, typer.Argument(metavar="ID")],
    version: Annotated[
        int | None, typer.Option("--version", help="A specific version.", min=1)
    ] = None,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="The state at time T: ISO-8601 or epoch seconds."),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Show an item (latest version, or --version N, or as of a time)."""
    with _session(ctx, json_out, socket, token) as s:
        as_of_us = parse_time_us(as_of) if as_of is not None else None
        item = s.client.get(cube, item_id, version=version, as_of=as_of_us)
        if not s.emit(item):
            _print_item(s, item)


@app.command()
def update(
    ctx: typer.Context,
    cube: str,
    item_id: Annotated[str, typer.Argument(metavar="ID")],
    text: Annotated[str, typer.Argument(help="The new text ('-' reads stdin).")],
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write a new version of an item with new text."""
    with _session(ctx, json_out, socket, token) as s:
        item = s.client.update(cube, item_id, _read_text(text))
        if not s.emit(item):
            s.line(f"{_field(item, 'id')} version {_field(item, 'version')}")


@app.command()
def history(
    ctx: typer.Context,
    cube: str,
    item_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Every version of an item, oldest first."""
    with _session(ctx, json_out, socket, token) as s:
        versions = list(s.client.history(cube, item_id))
        if not s.emit(versions):
            rows = [
                [
                    _field(v, "version"),
                    _field(v, "status"),
                    _operation(v),
                    format_time_us(_field(v, "recorded_us")),
                    preview(_field(v, "text", "")),
                ]
                for v in versions
            ]
            print_table(["VERSION", "STATUS", "OPERATION", "RECORDED", "TEXT"], rows, s.out)


@app.command()
def rollback(
    ctx: typer.Context,
    cube: str,
    item_id: Annotated[str, typer.Argument(metavar="ID")],
    version: Annotated[int, typer.Argument(min=1)],
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write a new version equal to an old one."""
    with _session(ctx, json_out, socket, token) as s:
        item = s.client.rollback(cube, item_id, version)
        if not s.emit(item):
            s.line(f"{_field(item, 'id')} version {_field(item, 'version')} (= version {version})")


@app.command()
def delete(
    ctx: typer.Context,
    cube: str,
    item_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete an item (a tombstone version; history is kept, see purge)."""
    with _session(ctx, json_out, socket, token) as s:
        result = s.client.delete(cube, item_id)
        if not s.emit(result):
            s.line(f"deleted {item_id} (version {result.version} is a tombstone)")


@app.command()
def purge(
    ctx: typer.Context,
    cube: str,
    item_id: Annotated[str, typer.Argument(metavar="ID")],
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Erase every version of an item for good (asks unless --yes)."""
    with _session(ctx, json_out, socket, token) as s:
        _confirm(yes, f"erase every version of {item_id} in {cube} for good")
        result = s.client.purge(cube, item_id)
        if not s.emit(result):
            s.line(f"purged {item_id} ({result.versions} versions erased)")


@app.command()
def search(
    ctx: typer.Context,
    cube: str,
    query: str,
    k: Annotated[int, typer.Option("-k", "--k", help="Number of results.", min=1)] = 10,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show the component scores of each hit.")
    ] = False,
    also: Annotated[
        list[str] | None,
        typer.Option("--also", help="Search this cube too (repeatable; results are fused)."),
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="hybrid, dense or lexical.")] = "hybrid",
    tier: Annotated[str | None, typer.Option("--tier", help="Only this tier.")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only items with this tag (repeatable).")
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Search a cube (or several with --also); best hits first."""
    with _session(ctx, json_out, socket, token) as s:
        cubes = [cube, *(also or [])]
        hits = list(
            s.client.search(
                cubes if len(cubes) > 1 else cube,
                query,
                k=k,
                explain=explain,
                mode=mode,
                tier=tier,
                tags=tag or (),
            )
        )
        if s.emit(hits):
            return
        rows = []
        for hit in hits:
            item = _field(hit, "item")
            row = [
                f"{float(_field(hit, 'score', 0.0)):.4f}",
                _field(item, "id"),
                _field(item, "version"),
                preview(_field(item, "text", ""), 70),
            ]
            rows.append(row)
        print_table(["SCORE", "ID", "VERSION", "TEXT"], rows, s.out, empty="No hits.")
        if explain:
            for hit in hits:
                extra = {
                    key: value
                    for key, value in dict(jsonable(hit)).items()
                    if key not in ("item", "score")
                }
                s.line(
                    f"{_field(_field(hit, 'item'), 'id')}: score={_field(hit, 'score')} "
                    + (json.dumps(extra) if extra else "(no score breakdown reported)")
                )


@app.command()
def watch(
    ctx: typer.Context,
    cube: Annotated[str | None, typer.Argument(help="Only this cube [default: all].")] = None,
    count: Annotated[
        int | None, typer.Option("--count", "-n", help="Stop after N events.", min=1)
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Print change events (ids, never contents) as they happen; Ctrl-C stops."""
    with _session(ctx, json_out, socket, token) as s:
        seen = 0
        try:
            with s.client.subscribe(cube) as events:
                for event in events:
                    if s.json:
                        s.line(json.dumps(jsonable(event)))
                    else:
                        s.line(
                            f"{event.lsn:>8}  {event.kind:<13} {event.cube or '-'}  "
                            f"{event.item_id or '-'}  v{event.version or '-'}  "
                            f"{event.operation or ''}".rstrip()
                        )
                    s.out.flush()
                    seen += 1
                    if count is not None and seen >= count:
                        return
        except KeyboardInterrupt:
            return  # the normal way to stop watching


# --- maintenance ----------------------------------------------------------------------


@wal_app.command("verify")
def wal_verify(
    ctx: typer.Context, json_out: JsonOpt = False, socket: SocketOpt = None, token: TokenOpt = None
) -> None:
    """Check every WAL record's checksum and sequence; exit 1 if damaged."""
    with _session(ctx, json_out, socket, token) as s:
        report = dict(jsonable(s.client.wal_verify()))
        problems = report.get("problems") or []
        if not s.emit(report):
            print_kv(
                [(k, v) for k, v in report.items() if k not in ("segments", "problems")], s.out
            )
            segments = report.get("segments") or []
            s.line("")
            print_table(
                ["SEGMENT", "FIRST LSN", "LAST LSN", "RECORDS", "BYTES", "TORN TAIL", "ZERO FILL"],
                (
                    [
                        Path(str(_field(g, "path", ""))).name,
                        _field(g, "first_lsn"),
                        _field(g, "last_lsn"),
                        _field(g, "records"),
                        _field(g, "size"),
                        _field(g, "torn_tail_bytes"),
                        _field(g, "zero_fill_bytes", 0),
                    ]
                    for g in segments
                ),
                s.out,
                empty="No WAL segments.",
            )
            for problem in problems:
                s.line(
                    f"problem: {json.dumps(problem) if not isinstance(problem, str) else problem}"
                )
            s.line("WAL OK" if not problems else f"WAL DAMAGED: {len(problems)} problem(s)")
        if problems or report.get("ok") is False:
            raise typer.Exit(exitcodes.EXIT_INTERNAL)


@app.command()
def checkpoint(
    ctx: typer.Context, json_out: JsonOpt = False, socket: SocketOpt = None, token: TokenOpt = None
) -> None:
    """Sync the store, record the applied LSN and delete old WAL segments."""
    with _session(ctx, json_out, socket, token) as s:
        report = s.client.checkpoint()
        if not s.emit(report):
            print_kv(list(dict(jsonable(report)).items()), s.out)


# --- plugin sub-commands ----------------------------------------------------------------


def load_plugin_commands(target: typer.Typer = app) -> list[str]:
    """Let allowed third-party plugins add sub-commands (``register_commands`` hook).

    Uses the daemon's plugin settings (config file, environment).  Never
    fatal: a plugin that fails is mentioned on stderr and memctl works without
    it.  Built-in plugins add no commands, so they are not loaded here.
    """
    problems: list[str] = []
    try:
        from memosd.plugins.manager import PluginConfig, PluginManager  # noqa: PLC0415
        from memosd.settings import load_settings  # noqa: PLC0415

        config = PluginConfig.from_settings(load_settings().plugins)
        manager = PluginManager(
            PluginConfig(allow=config.allow, modules=config.modules), defaults=(), quiet=True
        ).load()
    except Exception as exc:  # settings or discovery broken: memctl still works
        return [f"plugins not loaded: {exc}"]
    # Plugins that fail to load are the daemon's to report (`memctl plugins`).
    problems.extend(e.message for e in manager.register_commands(target))
    return problems


def main() -> None:
    """Console-script entry point (``memctl``)."""
    if os.environ.get("MEMCTL_NO_PLUGINS") != "1":
        for problem in load_plugin_commands():
            sys.stderr.write(f"memctl: warning: {problem}\n")
    app()


from memosd.cli import jobs as _jobs  # noqa: E402,F401 - registers its commands
from memosd.cli import kv as _kv  # noqa: E402,F401 - registers its commands
from memosd.cli import lora as _lora  # noqa: E402,F401 - registers its commands
