"""Durable background jobs: the job record and its state machine (pure).

A job moves ``queued → running → succeeded | failed | cancelled``.  Every
transition is a pure function returning a new :class:`Job` with a bumped
``revision``; the engine stores each transition through the WAL, so a job's
state survives any crash.  After a crash a job found ``running`` is put back
to ``queued`` (:func:`requeue_interrupted`): its handler's effects were
committed atomically with its success record or not at all, so running it
again neither duplicates nor loses work.

Failed attempts retry with exponential backoff (``not_before_us``) until
``max_attempts``; then the job ends ``failed`` with its error kept visible.
A running job waiting on something outside itself can also be deferred
(:func:`defer`): queued again for later, without counting the attempt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from memosd.errors import BadRequest, CodecError, Conflict
from memosd.memcube import codec

__all__ = [
    "JOB_SCHEMA_VERSION",
    "TERMINAL_STATES",
    "Job",
    "JobState",
    "backoff_us",
    "cancel",
    "decode_job",
    "defer",
    "encode_job",
    "fail",
    "job_to_wire",
    "mark_cancelled",
    "new_job",
    "report_progress",
    "requeue_interrupted",
    "start",
    "succeed",
]

JOB_SCHEMA_VERSION: Final = 1
_KIND_RE: Final = re.compile(r"[a-z][a-z0-9_.:-]{0,127}")
_BACKOFF_BASE_US: Final = 2_000_000
_BACKOFF_CAP_US: Final = 10 * 60 * 1_000_000


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES: Final = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    kind: str
    cube: str | None
    args: dict[str, Any]
    state: str
    attempts: int
    max_attempts: int
    revision: int
    created_us: int
    updated_us: int
    not_before_us: int
    progress: float = 0.0
    message: str = ""
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    actor: str | None = None
    dedup_key: str | None = None
    cancel_requested: bool = False
    history: tuple[tuple[int, str], ...] = field(default=())

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def new_job(
    *,
    id: str,
    kind: str,
    now_us: int,
    cube: str | None = None,
    args: dict[str, Any] | None = None,
    max_attempts: int = 3,
    actor: str | None = None,
    dedup_key: str | None = None,
    not_before_us: int | None = None,
) -> Job:
    if not isinstance(kind, str) or _KIND_RE.fullmatch(kind) is None:
        raise BadRequest(f"job kind must match {_KIND_RE.pattern}, not {kind!r}")
    if not 1 <= max_attempts <= 100:
        raise BadRequest("max_attempts must be between 1 and 100")
    return Job(
        id=id,
        kind=kind,
        cube=cube,
        args=dict(args or {}),
        state=JobState.QUEUED,
        attempts=0,
        max_attempts=max_attempts,
        revision=1,
        created_us=now_us,
        updated_us=now_us,
        not_before_us=not_before_us if not_before_us is not None else now_us,
        actor=actor,
        dedup_key=dedup_key,
        history=((now_us, JobState.QUEUED.value),),
    )


def _next(job: Job, now_us: int, state: str | None = None, **changes: Any) -> Job:
    new_state = state if state is not None else job.state
    history = job.history
    if new_state != job.state:
        history = (*history, (now_us, new_state))[-32:]
    return replace(
        job,
        state=new_state,
        revision=job.revision + 1,
        updated_us=max(now_us, job.updated_us),
        history=history,
        **changes,
    )


def _require(job: Job, *states: str) -> None:
    if job.state not in states:
        raise Conflict(
            f"job {job.id} is {job.state}, expected {' or '.join(states)}", reason="job_state"
        )


def start(job: Job, now_us: int) -> Job:
    _require(job, JobState.QUEUED)
    return _next(job, now_us, JobState.RUNNING, attempts=job.attempts + 1, error=None)


def report_progress(job: Job, now_us: int, progress: float, message: str = "") -> Job:
    _require(job, JobState.RUNNING)
    return _next(job, now_us, progress=min(1.0, max(0.0, float(progress))), message=message[:500])


def succeed(job: Job, now_us: int, result: dict[str, Any] | None = None) -> Job:
    _require(job, JobState.RUNNING)
    return _next(job, now_us, JobState.SUCCEEDED, progress=1.0, result=result or {})


def backoff_us(attempts: int) -> int:
    """Delay before retry number ``attempts`` (1-based): 2 s, 4 s, 8 s ... capped at 10 min."""
    return int(min(_BACKOFF_CAP_US, _BACKOFF_BASE_US * 2 ** max(0, attempts - 1)))


def fail(job: Job, now_us: int, error: dict[str, Any], *, retryable: bool = True) -> Job:
    """A failed attempt: queued again after a backoff, or failed for good."""
    _require(job, JobState.RUNNING)
    if retryable and job.attempts < job.max_attempts and not job.cancel_requested:
        return _next(
            job,
            now_us,
            JobState.QUEUED,
            error=error,
            not_before_us=now_us + backoff_us(job.attempts),
        )
    return _next(job, now_us, JobState.FAILED, error=error)


def defer(job: Job, now_us: int, delay_us: int, message: str = "") -> Job:
    """A running job that gives its worker back to run again after ``delay_us``
    (it waits on something outside itself): queued again, and this attempt
    does not count against ``max_attempts``."""
    _require(job, JobState.RUNNING)
    if job.cancel_requested:
        return _next(job, now_us, JobState.CANCELLED)
    return _next(
        job,
        now_us,
        JobState.QUEUED,
        attempts=max(0, job.attempts - 1),
        not_before_us=now_us + max(0, int(delay_us)),
        message=message[:500],
    )


def cancel(job: Job, now_us: int) -> Job:
    """Cancel a queued job now; ask a running one to stop at its next checkpoint."""
    if job.terminal:
        raise Conflict(f"job {job.id} already ended ({job.state})", reason="job_state")
    if job.state == JobState.QUEUED:
        return _next(job, now_us, JobState.CANCELLED, cancel_requested=True)
    return _next(job, now_us, cancel_requested=True)


def mark_cancelled(job: Job, now_us: int) -> Job:
    _require(job, JobState.RUNNING)
    return _next(job, now_us, JobState.CANCELLED)


def requeue_interrupted(job: Job, now_us: int) -> Job:
    """A job found running after a crash: its effects never committed; run it again."""
    _require(job, JobState.RUNNING)
    if job.cancel_requested:
        return _next(job, now_us, JobState.CANCELLED)
    if job.attempts >= job.max_attempts:
        return _next(
            job,
            now_us,
            JobState.FAILED,
            error={"code": "unavailable", "message": "interrupted by a crash on its last attempt"},
        )
    return _next(
        job, now_us, JobState.QUEUED, not_before_us=now_us, message="restarted after crash"
    )


def job_to_wire(job: Job) -> dict[str, Any]:
    """The job as the daemon returns it (``memctl jobs``/``job show``): msgpack-safe."""
    wire: dict[str, Any] = {name: getattr(job, name) for name in _FIELDS}
    wire["history"] = [[t, s] for t, s in job.history]
    wire["terminal"] = job.terminal
    return wire


# --- codec -----------------------------------------------------------------------

_FIELDS: Final = (
    "id", "kind", "cube", "args", "state", "attempts", "max_attempts", "revision",
    "created_us", "updated_us", "not_before_us", "progress", "message", "result",
    "error", "actor", "dedup_key", "cancel_requested",
)  # fmt: skip


def encode_job(job: Job) -> bytes:
    record: dict[str, Any] = {"t": "job", "sv": JOB_SCHEMA_VERSION}
    for name in _FIELDS:
        record[name] = getattr(job, name)
    record["history"] = [list(h) for h in job.history]
    return codec.packb(record)


def decode_job(data: bytes) -> Job:
    doc = codec.unpackb(data)
    if not isinstance(doc, dict) or doc.get("t") != "job":
        raise CodecError("not a job record")
    if doc.get("sv") != JOB_SCHEMA_VERSION:
        raise CodecError(
            f"unsupported job schema version {doc.get('sv')!r}", reason="schema_version"
        )
    try:
        values = {name: doc[name] for name in _FIELDS}
        history = tuple((int(t), str(s)) for t, s in doc.get("history", []))
        job = Job(**values, history=history)
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"malformed job record: {exc}") from exc
    if job.state not in {s.value for s in JobState} or not isinstance(job.args, dict):
        raise CodecError("malformed job record: bad state or args")
    return job
