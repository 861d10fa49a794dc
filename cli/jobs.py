"""memctl commands for background jobs and memory tiers; :func:`follow_job`.

``memctl jobs``, ``memctl job show|cancel|wait ID``, ``memctl tiers CUBE``,
``memctl tier run CUBE POLICY``, ``memctl tier policies``.  Registered by
the import at the bottom of :mod:`memosd.cli.main`; docs/cli.md is the
reference.

:func:`follow_job` is for any command that runs a job in the foreground
(other subsystems' commands use it too): it draws a progress bar on stderr
from the job's change-feed events and returns the job once it ended.
"""

# Typer maps positional parameters to CLI arguments and options.
# ruff: noqa: PLR0917

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any, Final, TextIO

import typer

from memosd.cli import exitcodes
from memosd.cli.render import format_time_us, preview, print_kv, print_table
from memosd.errors import MemosError, Unavailable, error_from_wire

if TYPE_CHECKING:
    from memosd.client import Client, Subscription

__all__ = ["ProgressBar", "follow_job", "job_exit_code"]

_END_EVENTS: Final = frozenset({"job_succeeded", "job_failed", "job_cancelled"})
_BAR_WIDTH: Final = 24

# --- progress --------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """One job's progress line on a stream: redrawn in place on a terminal,
    one line per state change or 10% step otherwise, nothing when disabled."""

    def __init__(
        self, stream: TextIO, *, label: str = "", enabled: bool = True, tty: bool | None = None
    ) -> None:
        self.stream = stream
        self.label = label
        self.enabled = enabled
        self.tty = stream.isatty() if tty is None else tty
        self._width = 0
        self._last: tuple[str, int, str] | None = None
        self._t0: float | None = None
        self._p0 = 0.0

    def eta_s(self, progress: float, now: float | None = None) -> float | None:
        """Seconds left, from the rate since the first update (None until it moves)."""
        now = time.monotonic() if now is None else now
        if self._t0 is None:
            self._t0, self._p0 = now, progress
            return None
        done = progress - self._p0
        if done <= 0 or progress >= 1.0:
            return None
        return (now - self._t0) / done * (1.0 - progress)

    def render(self, state: str, progress: float, message: str, eta: float | None) -> str:
        filled = round(_BAR_WIDTH * min(1.0, max(0.0, progress)))
        parts = [self.label] if self.label else []
        parts.append(f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {progress * 100:3.0f}%")
        if state != "running":
            parts.append(state)
        if message:
            parts.append(preview(message, 50))
        if eta is not None and state == "running":
            parts.append(f"ETA {_duration(eta)}")
        return "  ".join(parts)

    def update(self, job: dict[str, Any]) -> None:
        state = str(job.get("state", ""))
        progress = float(job.get("progress") or 0.0)
        message = str(job.get("message") or "")
        eta = self.eta_s(progress) if state == "running" else None
        if not self.enabled:
            return
        line = self.render(state, progress, message, eta)
        if self.tty:
            pad = " " * max(0, self._width - len(line))
            self.stream.write("\r" + line + pad)
            self._width = len(line)
        else:
            key = (state, int(progress * 10), message if state != "running" else "")
            if key == self._last:
                return
            self._last = key
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, job: dict[str, Any]) -> None:
        self.update(job)
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _subscribe(client: Client, cube: str) -> Subscription | None:
    try:
        return client.subscribe(cube)
    except MemosError:  # no feed for us (e.g. access changed): poll instead
        return None


def follow_job(
    client: Client,
    job_id: str,
    *,
    err: TextIO | None = None,
    json_out: bool = False,
    label: str | None = None,
    timeout: float | None = None,
    poll_s: float = 0.2,
) -> dict[str, Any]:
    """Show a progress bar on ``err`` (stderr) until the job ends; return the final job.

    Driven by the cube's ``job_*`` change-feed events; a job without a cube
    (or when the feed is unavailable) is polled with ``job_get`` every
    ``poll_s``.  With ``json_out`` nothing is drawn.  Unavailable
    (reason ``timeout``) after ``timeout`` seconds; the job keeps running.
    Ctrl-C stops following, not the job.
    """
    stream = sys.stderr if err is None else err
    job = client.job(job_id)
    bar = ProgressBar(stream, label=job["kind"] if label is None else label, enabled=not json_out)
    if job["terminal"]:
        bar.finish(job)
        return job
    deadline = None if timeout is None else time.monotonic() + timeout
    sub = _subscribe(client, job["cube"]) if job.get("cube") else None
    try:
        job = client.job(job_id)  # it may have moved on while we subscribed
        bar.update(job)
        while not job["terminal"]:
            wait = poll_s if sub is None else 1.0
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(
                        f"job {job_id} is still {job['state']} after {timeout:g}s",
                        reason="timeout",
                    )
                wait = min(wait, left)
            event = None if sub is None else sub.next_event(timeout=wait)
            if sub is None:
                time.sleep(wait)
            elif event is not None and event.job is not None and event.job.get("job") == job_id:
                job = {**job, **{k: v for k, v in event.job.items() if k != "job"}}
                if event.kind not in _END_EVENTS:
                    bar.update(job)
                    continue
            elif event is not None and event.kind == "subscription_ended":
                sub.close()
                sub = None
            elif event is not None and event.kind != "gap":
                continue  # another job's or an item's event
            job = client.job(job_id)  # an end event, a gap, or a quiet second
            if not job["terminal"]:
                bar.update(job)
    finally:
        if sub is not None:
            sub.close()
    bar.finish(job)
    return job


def job_exit_code(job: dict[str, Any]) -> int:
    """0 for a succeeded job; a failed one exits like its error; cancelled: 5 (conflict)."""
    if job.get("state") == "succeeded":
        return exitcodes.EXIT_OK
    if job.get("state") == "cancelled":
        return exitcodes.EXIT_CONFLICT
    error = job.get("error")
    if isinstance(error, dict):
        return exitcodes.exit_code_for(error_from_wire(error))
    return exitcodes.EXIT_INTERNAL


# --- commands --------------------------------------------------------------------------
# Imported after follow_job: the cli modules main.py imports at its end use it, so
# either import order (memosd.cli.main or this module first) works.
from memosd.cli.main import JsonOpt, SocketOpt, TokenOpt, _session, app  # noqa: E402

job_app = typer.Typer(help="Inspect, follow and cancel one background job.", no_args_is_help=True)
tier_app = typer.Typer(help="Memory tier policies: run them, list them.", no_args_is_help=True)
app.add_typer(job_app, name="job")
app.add_typer(tier_app, name="tier")


# --- output ----------------------------------------------------------------------------


def _progress_cell(job: dict[str, Any]) -> str:
    if job.get("state") in ("queued", "succeeded"):
        return "-" if job.get("state") == "queued" else "100%"
    return f"{float(job.get('progress') or 0.0) * 100:.0f}%"


def _state_cell(job: dict[str, Any]) -> str:
    state = str(job.get("state"))
    if job.get("cancel_requested") and not job.get("terminal"):
        return state + " (cancel requested)"
    return state


def _message_cell(job: dict[str, Any]) -> str:
    error = job.get("error")
    if isinstance(error, dict):
        return preview(f"{error.get('code')}: {error.get('message', '')}", 40)
    return preview(job.get("message") or "", 40)


def _job_rows(found: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            j.get("id"),
            j.get("kind"),
            j.get("cube") or "-",
            _state_cell(j),
            f"{j.get('attempts')}/{j.get('max_attempts')}",
            _progress_cell(j),
            format_time_us(j.get("updated_us")),
            _message_cell(j),
        ]
        for j in found
    ]


_JOB_HEADERS: Final = ("ID", "KIND", "CUBE", "STATE", "ATTEMPTS", "PROGRESS", "UPDATED", "MESSAGE")


def _print_job(out: TextIO, job: dict[str, Any]) -> None:
    pairs: list[tuple[str, Any]] = [
        ("id", job.get("id")),
        ("kind", job.get("kind")),
        ("cube", job.get("cube")),
        ("state", job.get("state")),
        ("attempts", f"{job.get('attempts')}/{job.get('max_attempts')}"),
        ("progress", f"{float(job.get('progress') or 0.0) * 100:.0f}%"),
        ("message", job.get("message") or None),
        ("cancel_requested", bool(job.get("cancel_requested"))),
        ("actor", job.get("actor")),
        ("dedup_key", job.get("dedup_key")),
        ("created", format_time_us(job.get("created_us"))),
        ("updated", format_time_us(job.get("updated_us"))),
        ("not_before", format_time_us(job.get("not_before_us"))),
        ("args", job.get("args") or None),
        ("result", job.get("result")),
        ("error", job.get("error")),
    ]
    print_kv([(k, v) for k, v in pairs if v is not None], out)
    history = job.get("history") or []
    if history:
        out.write("history:\n")
        for at, state in history:
            out.write(f"  {format_time_us(at)}  {state}\n")


def _heat_bin(b: dict[str, Any]) -> str:
    """``2-5:7`` (heat 2 to 5: 7 items); an open upper bin is ``20+:3``."""
    low, high = b.get("from"), b.get("to")
    span = f"{low:g}+" if high is None else f"{low:g}-{high:g}"
    return f"{span}:{b.get('count')}"


@app.command()
def jobs(
    ctx: typer.Context,
    state: Annotated[
        str | None,
        typer.Option(
            help="Only jobs in this state: queued, running, succeeded, failed, cancelled."
        ),
    ] = None,
    cube: Annotated[str | None, typer.Option(help="Only this cube's jobs.")] = None,
    kind: Annotated[
        str | None, typer.Option(help="Only jobs of this kind (e.g. tiers.evict).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many (newest first).", min=1)] = 50,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Background jobs you may see (your cubes'; admins: all), newest first."""
    with _session(ctx, json_out, socket, token) as s:
        found = s.client.jobs(state=state, cube=cube, kind=kind, limit=min(limit, 1000))
        if not s.emit(found):
            print_table(_JOB_HEADERS, _job_rows(found), s.out, empty="No jobs.")


@job_app.command("show")
def job_show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id.")],
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """One job: state, attempts, progress, result or error, state history."""
    with _session(ctx, json_out, socket, token) as s:
        job = s.client.job(job_id)
        if not s.emit(job):
            _print_job(s.out, job)


@job_app.command("cancel")
def job_cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until a running job has stopped.")
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Cancel a queued job now; ask a running one to stop at its next checkpoint."""
    with _session(ctx, json_out, socket, token) as s:
        job = s.client.cancel_job(job_id)
        if wait and not job["terminal"]:
            job = follow_job(s.client, job_id, err=s.err, json_out=s.json)
        if not s.emit(job):
            if job["terminal"]:
                s.line(f"{job_id} {job['state']}")
            else:
                s.line(f"{job_id} {job['state']}, cancel requested (it stops at its next check)")


@job_app.command("wait")
def job_wait(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id.")],
    wait_timeout: Annotated[
        float | None,
        typer.Option("--wait-timeout", help="Give up after this many seconds.", min=0.1),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Follow a job with a progress bar until it ends; exit status as the job's outcome."""
    with _session(ctx, json_out, socket, token) as s:
        job = follow_job(s.client, job_id, err=s.err, json_out=s.json, timeout=wait_timeout)
        if not s.emit(job):
            _print_job(s.out, job)
        code = job_exit_code(job)
    if code:
        raise typer.Exit(code)


@tier_app.command("run")
def tier_run(
    ctx: typer.Context,
    cube: str,
    policy: Annotated[str, typer.Argument(help="A tier policy, e.g. plaintext.")],
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Queue the jobs and return at once.")
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Run a policy's jobs on a cube now (plaintext: evict, consolidate, forget)."""
    with _session(ctx, json_out, socket, token) as s:
        queued = s.client.tier_run(cube, policy, wait=False)
        final = queued
        if not no_wait:
            # The runner runs one tier job per cube at a time, in queue order.
            final = [follow_job(s.client, j["id"], err=s.err, json_out=s.json) for j in queued]
        if not s.emit(final):
            print_table(_JOB_HEADERS, _job_rows(final), s.out, empty="No jobs queued.")
        code = max((job_exit_code(j) for j in final), default=0) if not no_wait else 0
    if code:
        raise typer.Exit(code)


@tier_app.command("policies")
def tier_policies(
    ctx: typer.Context, json_out: JsonOpt = False, socket: SocketOpt = None, token: TokenOpt = None
) -> None:
    """Registered tier policies, their job kinds and settings (defaults and help)."""
    with _session(ctx, json_out, socket, token) as s:
        described = s.client.tier_policies()
        if s.emit(described):
            return
        defaults = ",".join(described.get("default_policies") or []) or "-"
        s.line(f"default policies: {defaults}")
        s.line(f"job kinds: {', '.join(described.get('job_kinds') or []) or '-'}")
        for policy in described.get("policies") or []:
            s.line("")
            s.line(f"{policy['name']}  (jobs: {', '.join(policy.get('job_kinds') or [])})")
            print_table(
                ("SETTING", "DEFAULT", "TYPE", "HELP"),
                [
                    [st["name"], repr(st["default"]), st["type"], st["help"]]
                    for st in policy.get("settings") or []
                ],
                s.out,
            )


@app.command()
def tiers(
    ctx: typer.Context,
    cube: str,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Per tier of a cube: item counts by status, bytes, heat histogram."""
    with _session(ctx, json_out, socket, token) as s:
        report = s.client.tier_report(cube)
        if s.emit(report):
            return
        for name, tiers_ in report.items():
            s.line(f"policy {name}")
            rows = []
            extras: list[tuple[str, Any]] = []
            for tier, info in tiers_.items():
                if not isinstance(info, dict) or "items" not in info:
                    extras.append((tier, info))
                    continue
                counts = info.get("items") or {}
                histogram = info.get("heat_histogram") or []
                rows.append(
                    [
                        tier,
                        counts.get("active", 0),
                        counts.get("archived", 0),
                        counts.get("deleted", 0),
                        info.get("bytes", 0),
                        " ".join(_heat_bin(b) for b in histogram if b.get("count")) or "-",
                    ]
                )
                for key, value in info.items():
                    if key not in ("items", "bytes", "heat_histogram"):
                        extras.append((f"{tier}.{key}", value))
            print_table(("TIER", "ACTIVE", "ARCHIVED", "DELETED", "BYTES", "HEAT"), rows, s.out)
            if extras:
                print_kv(extras, s.out)
