"""The job runner: executes durable jobs off the request path.

Theory of operation
-------------------
Jobs are records in the engine (:mod:`memosd.scheduler.jobs`); this module
only moves them through their states and calls handlers.

* **Start**: every job found ``running`` was interrupted by a crash (only
  one runner exists per data directory) and goes back to ``queued`` through
  :func:`jobs.requeue_interrupted`, or ends failed/cancelled.
* **Dispatch**: one dispatcher thread picks queued jobs whose kind has a
  handler and whose ``not_before_us`` has passed, oldest first
  (``not_before_us``, then creation), claims each with a ``start``
  transition guarded by the job's revision, and hands it to a worker thread
  (``concurrency`` of them).  Jobs of handlers marked ``exclusive_per_cube``
  never run two at a time on one cube.  The dispatcher scans the queue only
  when woken: by any job becoming ``queued`` (an engine change event, so
  jobs queued inside another job's commit or by another client count), by
  a job ending, by :meth:`JobRunner.wake`, when the earliest backoff ends,
  and every ``poll_s`` as a safety net.
* **Exactly once**: a handler writes its effects through
  :meth:`JobContext.commit`, one ``engine.atomic`` call that also marks the
  job succeeded: effects and success are one WAL record.  A crash before it
  leaves no effect and the job runs again; a crash after it leaves a
  succeeded job that never runs again.  ``commit`` refuses (Conflict) when
  the job is no longer the running attempt this context belongs to.  A job
  too big for one write commits in steps (:meth:`JobContext.commit_step`,
  same guards), each durable and consistent on its own; a rerun resumes
  from what the steps wrote, so such a handler must be idempotent.
* **Failure**: an exception from a handler becomes :func:`jobs.fail` with
  the error's wire form (a :class:`MemosError`'s ``to_wire()``, else code
  ``internal`` with the exception type and message, logged with its
  traceback).  ``BadRequest``/``NotFound``/``Forbidden``/``TooLarge`` (a
  write over a limit is as big on the next attempt) are permanent;
  every other error retries with exponential backoff until
  ``max_attempts``, then the job stays ``failed`` with its error.
* **Deferral**: a handler that would only wait on something outside its job
  (the search index catching up) raises :class:`JobDeferred`: the job goes
  back to ``queued`` until the given delay has passed (:func:`jobs.defer`),
  its worker is free for other jobs meanwhile, and the attempt does not
  count.  What the attempt committed in steps stays committed.
* **Cancel**: :meth:`JobRunner.cancel` cancels a queued job at once and
  asks a running one to stop; handlers poll :meth:`JobContext.cancelled`
  (or :meth:`JobContext.check_cancelled`, which raises
  :class:`JobCancelled`), and ``commit`` itself refuses to commit a job
  whose cancel was requested: it is marked ``cancelled`` instead.
* **Progress**: :meth:`JobContext.progress` updates the in-memory job and
  tells listeners at once; it is persisted (a ``report_progress``
  transition) at most every ``progress_persist_s``.
* **Retention**: every ``sweep_every_s`` the dispatcher deletes ended jobs
  whose last change is older than ``retention_s`` (succeeded, cancelled) or
  ``failed_retention_s`` (failed; kept longer by default so failures stay
  visible); 0 keeps them forever.  Candidates are found with a read
  transaction, then deleted in atomic batches (``Planner.delete_job``)
  that re-check each job, so a job requeued meanwhile is never deleted.
* **Processes**: a handler with ``needs_process = True`` is split in three:
  ``prepare(ctx) -> payload`` (worker thread), ``compute(payload) -> output``
  (a picklable module-level callable run in a spawned process pool, for
  CPU-heavy work that must not hold the GIL: LoRA training, KV builds), and
  ``finish(ctx, output) -> result`` (worker thread, commits).

Listeners (:meth:`JobRunner.add_listener`) get :class:`JobEvent` values from
runner threads; they must be quick and must not raise (errors are logged).
The daemon forwards them to its change feed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import structlog

from memosd.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    MemosError,
    NotFound,
    TooLarge,
    Unavailable,
)
from memosd.scheduler import jobs

if TYPE_CHECKING:
    from memosd.store.planner import Planner

__all__ = [
    "JobCancelled",
    "JobContext",
    "JobDeferred",
    "JobEvent",
    "JobHandler",
    "JobRunner",
    "error_to_wire",
]

_log = structlog.get_logger("memosd.scheduler")

T = TypeVar("T")
_ALL: Final = 1_000_000_000
_PERMANENT: Final = (BadRequest, NotFound, Forbidden, TooLarge)
_SWEEP_BATCH: Final = 500  # job deletions per atomic write


class JobCancelled(Exception):
    """Raised inside a handler to stop because its job was cancelled."""


class JobDeferred(Exception):
    """Raised inside a handler to run the job again in ``delay_s`` seconds.

    For a job that would otherwise block its worker waiting on something
    outside it: the worker is given back at once, the job is queued again
    (``message`` tells why), and the attempt does not count.
    """

    def __init__(self, delay_s: float, message: str = "") -> None:
        super().__init__(message or f"deferred for {delay_s:g} s")
        self.delay_s = delay_s
        self.message = message


class JobHandler(Protocol):
    """Runs one job.  Returns the result dict (or None) unless it used ``ctx.commit``.

    Optional attributes read by the runner: ``needs_process: bool`` (see the
    module doc) and ``exclusive_per_cube: bool``.
    """

    def __call__(self, ctx: JobContext) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class JobEvent:
    """What happened to a job: ``queued``, ``started``, ``progress``, ``succeeded``,
    ``retrying`` (failed attempt, queued again), ``deferred`` (queued again for
    later by the handler, :class:`JobDeferred`), ``failed``, ``cancelled``."""

    type: str
    job_id: str
    kind: str
    cube: str | None
    state: str
    attempts: int
    progress: float
    message: str
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def of(cls, type_: str, job: jobs.Job) -> JobEvent:
        return cls(
            type_,
            job.id,
            job.kind,
            job.cube,
            job.state,
            job.attempts,
            job.progress,
            job.message,
            job.error,
            job.result,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "event": "job_" + self.type,
            "job": self.job_id,
            "kind": self.kind,
            "cube": self.cube,
            "state": self.state,
            "attempts": self.attempts,
            "progress": self.progress,
            "message": self.message,
            "error": self.error,
            "result": self.result,
        }


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """The durable form of a handler's error (a MemosError's wire dict, else ``internal``)."""
    if isinstance(exc, MemosError):
        return exc.to_wire()
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"[:2000]}


class _Cancelled:
    """Marker returned from inside ``commit`` when the job's cancel was requested."""


_CANCELLED: Final = _Cancelled()


class JobContext:
    """What a handler gets: the engine, its job, progress, cancellation, commit."""

    def __init__(self, runner: JobRunner, job: jobs.Job) -> None:
        self._runner = runner
        self.engine: Any = runner.engine
        self.job = job
        self.committed = False
        self._cancel_flag = threading.Event()
        self._last_persist = time.monotonic()
        self._last_cancel_check = 0.0

    @property
    def args(self) -> dict[str, Any]:
        return self.job.args

    @property
    def cube(self) -> str | None:
        return self.job.cube

    def now_us(self) -> int:
        return self._runner.clock()

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0..1); listeners hear it now, the store at most every ~1 s."""
        clamped = min(1.0, max(0.0, float(fraction)))
        self.job = dataclasses.replace(self.job, progress=clamped, message=message[:500])
        self._runner._emit("progress", self.job)
        now = time.monotonic()
        if now - self._last_persist >= self._runner.progress_persist_s:
            self._last_persist = now
            try:
                stored = self.engine.transition_job(
                    self.job.id,
                    lambda j, t: jobs.report_progress(j, t, clamped, message),
                )
            except Conflict:  # no longer running: the handler will find out at commit
                return
            self.job = stored
            if stored.cancel_requested:
                self._cancel_flag.set()

    def cancelled(self) -> bool:
        """True once a cancel was requested (polls the store at most every 0.2 s)."""
        if self._cancel_flag.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= 0.2:
            self._last_cancel_check = now
            try:
                if self.engine.get_job(self.job.id).cancel_requested:
                    self._cancel_flag.set()
            except NotFound:
                self._cancel_flag.set()
        return self._cancel_flag.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` if a cancel was requested."""
        if self.cancelled():
            raise JobCancelled(self.job.id)

    def commit(
        self,
        fn: Callable[[Planner], T],
        *,
        result: dict[str, Any] | Callable[[T], dict[str, Any]] | None = None,
    ) -> T:
        """Run ``fn`` and mark this job succeeded in ONE atomic engine write.

        ``result`` is the job's result (a dict, or a function of ``fn``'s
        return value; default: the return value if it is a dict).  Raises
        :class:`JobCancelled` (nothing of ``fn`` is written, the job is
        marked cancelled) if a cancel was requested, Conflict if the job is
        no longer this running attempt.
        """
        return self._write(fn, final=True, result=result)

    def commit_step(self, fn: Callable[[Planner], T]) -> T:
        """Run ``fn`` in one atomic engine write that leaves the job running.

        For a job too big for one write (a WAL record is bounded): each step
        is durable on its own, so it must leave the store consistent, and a
        rerun of the job (after a crash or a failed later step) must start
        from what the steps already wrote.  The job still ends with
        :meth:`commit`.  The same guards as ``commit``: Conflict if the job
        is no longer this running attempt; a requested cancel marks it
        cancelled instead (nothing of ``fn`` is written) and raises
        :class:`JobCancelled`.
        """
        return self._write(fn, final=False, result=None)

    def _write(
        self,
        fn: Callable[[Planner], T],
        *,
        final: bool,
        result: dict[str, Any] | Callable[[T], dict[str, Any]] | None,
    ) -> T:
        if self.committed:
            raise Conflict(f"job {self.job.id} already committed", reason="job_state")
        attempt = self.job.attempts

        def plan(p: Planner) -> T | _Cancelled:
            current = p.job(self.job.id)
            if current.state != jobs.JobState.RUNNING or current.attempts != attempt:
                raise Conflict(
                    f"job {current.id} is {current.state} (attempt {current.attempts}), "
                    f"not running attempt {attempt}",
                    reason="job_state",
                )
            if current.cancel_requested:
                p.transition_job(current.id, jobs.mark_cancelled)
                return _CANCELLED
            value = fn(p)
            if not final:
                return value
            if callable(result):
                res = result(value)
            elif result is not None:
                res = result
            else:
                res = value if isinstance(value, dict) else {}
            p.transition_job(current.id, lambda j, now: jobs.succeed(j, now, res))
            return value

        outcome = self.engine.atomic(plan)
        if isinstance(outcome, _Cancelled):
            self.committed = True
            self.job = self.engine.get_job(self.job.id)
            raise JobCancelled(self.job.id)
        if final:
            self.committed = True
            self.job = self.engine.get_job(self.job.id)
        return outcome  # type: ignore[no-any-return]


def _wall_clock_us() -> int:
    return time.time_ns() // 1000


class JobRunner:
    """Runs queued jobs in a bounded worker pool (see the module doc)."""

    def __init__(
        self,
        engine: Any,
        handlers: Mapping[str, JobHandler],
        *,
        concurrency: int = 2,
        clock: Callable[[], int] | None = None,
        poll_s: float = 5.0,
        progress_persist_s: float = 1.0,
        retention_s: float = 0.0,
        failed_retention_s: float | None = None,
        sweep_every_s: float = 3600.0,
    ) -> None:
        if concurrency < 1:
            raise BadRequest("concurrency must be >= 1")
        if retention_s < 0 or (failed_retention_s or 0) < 0 or sweep_every_s <= 0:
            raise BadRequest("job retention and sweep intervals must be positive (0: keep)")
        self.engine = engine
        self._handlers = dict(handlers)
        self.concurrency = concurrency
        self.clock = clock or _wall_clock_us
        self.poll_s = poll_s
        self.progress_persist_s = progress_persist_s
        self._cv = threading.Condition()
        self._running: dict[str, tuple[jobs.Job, JobContext]] = {}
        self._listeners: list[Callable[[JobEvent], None]] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None
        self._stopping = False
        # Set (without any lock: the engine's writer thread sets it) to make the
        # dispatcher look for work now.
        self._wakeup = threading.Event()
        self._next_due_us: int | None = None
        self._listening = False
        self._finished = 0
        self.retention_s = retention_s
        self.failed_retention_s = retention_s if failed_retention_s is None else failed_retention_s
        self.sweep_every_s = sweep_every_s
        self._next_sweep = 0.0  # time.monotonic() of the next retention sweep

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Requeue jobs interrupted by a crash, then start dispatching."""
        if self._dispatcher is not None:
            return
        if not self._listening:
            self._listening = True
            self.engine.add_listener(self._on_engine_change)
        self.recover()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="memosd-job"
        )
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="memosd-job-dispatcher", daemon=True
        )
        self._dispatcher.start()

    def recover(self) -> list[jobs.Job]:
        """Put every job found ``running`` back to ``queued`` (or ended); returns them."""
        out = []
        for job in self.engine.list_jobs(state=jobs.JobState.RUNNING, limit=_ALL):
            try:
                requeued = self.engine.transition_job(
                    job.id, jobs.requeue_interrupted, expected_revision=job.revision
                )
            except Conflict:
                continue
            _log.warning(
                "job interrupted by a crash", job=job.id, kind=job.kind, now=requeued.state
            )
            out.append(requeued)
        return out

    def close(self, *, timeout: float | None = 30.0) -> None:
        """Stop dispatching, ask running jobs to stop, wait up to ``timeout`` (idempotent).

        Interrupted jobs go back to ``queued``; nothing of theirs was committed.
        """
        with self._cv:
            if self._stopping:
                return
            self._stopping = True
            self._wakeup.set()
            for _, ctx in self._running.values():
                ctx._cancel_flag.set()  # handlers stop at their next check; job stays queued
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        with self._cv:
            while self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    _log.warning("jobs still running at close", jobs=sorted(self._running))
                    break
                self._cv.wait(remaining)
            hung = bool(self._running)
        # A handler that ignores cancellation is abandoned, not waited for: its
        # job stays "running" and is requeued at the next start.
        if self._pool is not None:
            self._pool.shutdown(wait=not hung, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=not hung, cancel_futures=True)

    def __enter__(self) -> JobRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- handlers and listeners --------------------------------------------------------

    def add_handler(self, kind: str, handler: JobHandler) -> None:
        with self._cv:
            if kind in self._handlers:
                raise Conflict(f"job kind {kind!r} already has a handler")
            self._handlers[kind] = handler
        self._wakeup.set()

    @property
    def kinds(self) -> list[str]:
        return sorted(self._handlers)

    def add_listener(self, callback: Callable[[JobEvent], None]) -> None:
        self._listeners.append(callback)

    def _emit(self, type_: str, job: jobs.Job) -> None:
        event = JobEvent.of(type_, job)
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:  # a listener must never break a job
                _log.exception("job listener failed", job=job.id, event=type_)

    # --- submitting --------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        *,
        cube: str | None = None,
        args: dict[str, Any] | None = None,
        actor: str | None = None,
        max_attempts: int = 3,
        dedup_key: str | None = None,
        not_before_us: int | None = None,
    ) -> jobs.Job:
        """Queue a job durably and wake the dispatcher."""
        job: jobs.Job = self.engine.submit_job(
            kind,
            cube=cube,
            args=args,
            actor=actor,
            max_attempts=max_attempts,
            dedup_key=dedup_key,
            not_before_us=not_before_us,
        )
        if job.state == jobs.JobState.QUEUED and job.revision == 1:
            self._emit("queued", job)
        self.wake()
        return job

    def run_now(
        self,
        kind: str,
        cube: str | None = None,
        *,
        args: dict[str, Any] | None = None,
        actor: str | None = None,
        max_attempts: int = 1,
        wait: bool = True,
        timeout: float | None = None,
    ) -> jobs.Job:
        """Run a job on demand (not before any backoff); with ``wait``, until it ends."""
        if kind not in self._handlers:
            raise BadRequest(f"no handler for job kind {kind!r}", reason="unknown_job_kind")
        job = self.submit(
            kind,
            cube=cube,
            args=args,
            actor=actor,
            max_attempts=max_attempts,
            not_before_us=self.clock(),
        )
        return self.wait(job.id, timeout=timeout) if wait else job

    def wait(self, job_id: str, *, timeout: float | None = None) -> jobs.Job:
        """Block until the job ends (Unavailable on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                job: jobs.Job = self.engine.get_job(job_id)
                if job.terminal:
                    return job
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Unavailable(f"job {job_id} still {job.state}", reason="timeout")
                self._cv.wait(min(remaining, 0.5) if remaining is not None else 0.5)

    def cancel(self, job_id: str) -> jobs.Job:
        """Cancel a queued job now; ask a running one to stop."""
        job: jobs.Job = self.engine.transition_job(job_id, jobs.cancel)
        with self._cv:
            entry = self._running.get(job_id)
            if entry is not None:
                entry[1]._cancel_flag.set()
            self._cv.notify_all()
        if job.state == jobs.JobState.CANCELLED:
            self._emit("cancelled", job)
        return job

    def wake(self) -> None:
        """Look for runnable jobs now (after a submit, or after moving an injected clock)."""
        self._wakeup.set()

    def _on_engine_change(self, event: Any) -> None:
        # Engine writer thread: no locks, no I/O.  A job queued by anyone (a
        # policy's commit, a retry's backoff transition, another client) wakes us.
        if event.kind == "job_changed" and event.operation == jobs.JobState.QUEUED:
            self._wakeup.set()

    def drain(self, timeout: float = 30.0) -> None:
        """Block until no job is running and none that could run now is queued.

        Meant for tests and on-demand runs; with an injected clock, jobs
        whose backoff has not passed do not count.
        """
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                if not self._running and not self._runnable(limit=1):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Unavailable("jobs still running after drain timeout", reason="timeout")
                self._wakeup.set()
                self._cv.wait(min(remaining, 0.05))

    def running(self) -> list[jobs.Job]:
        with self._cv:
            return [ctx.job for _, ctx in self._running.values()]

    # --- retention -------------------------------------------------------------------

    def _cutoffs(self, now_us: int) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.retention_s > 0:
            keep_us = int(self.retention_s * 1_000_000)
            out[jobs.JobState.SUCCEEDED] = out[jobs.JobState.CANCELLED] = now_us - keep_us
        if self.failed_retention_s > 0:
            out[jobs.JobState.FAILED] = now_us - int(self.failed_retention_s * 1_000_000)
        return out

    def sweep(self, now_us: int | None = None) -> list[str]:
        """Delete ended jobs older than their retention (by last change); their ids."""
        cutoffs = self._cutoffs(self.clock() if now_us is None else now_us)
        old = [
            job.id
            for state, cutoff in cutoffs.items()
            for job in self.engine.list_jobs(state=state, limit=_ALL)
            if job.updated_us < cutoff
        ]
        deleted: list[str] = []
        for start in range(0, len(old), _SWEEP_BATCH):
            chunk = old[start : start + _SWEEP_BATCH]

            def plan(p: Planner, ids: list[str] = chunk) -> list[str]:
                gone = []
                for job_id in ids:
                    try:
                        job = p.job(job_id)
                    except NotFound:
                        continue
                    if job.terminal and job.updated_us < cutoffs.get(job.state, -1):
                        p.delete_job(job_id)
                        gone.append(job_id)
                return gone

            deleted += self.engine.atomic(plan)
        if deleted:
            _log.info("old jobs deleted", count=len(deleted))
        return deleted

    def _sweep_if_due(self) -> None:
        if not (self.retention_s > 0 or self.failed_retention_s > 0):
            return
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_every_s
        try:
            self.sweep()
        except MemosError as exc:  # e.g. the engine refusing writes: try next time
            _log.error("job retention sweep failed", error=str(exc))

    # --- dispatching -------------------------------------------------------------------

    def _runnable(self, limit: int) -> list[jobs.Job]:
        now = self.clock()
        waiting = [
            j
            for j in self.engine.list_jobs(state=jobs.JobState.QUEUED, limit=_ALL)
            if j.kind in self._handlers
        ]
        later = [j.not_before_us for j in waiting if j.not_before_us > now]
        self._next_due_us = min(later) if later else None
        queued = [j for j in waiting if j.not_before_us <= now]
        queued.sort(key=lambda j: (j.not_before_us, j.created_us, j.id))
        busy_cubes = {
            job.cube
            for job, _ in self._running.values()
            if getattr(self._handlers.get(job.kind), "exclusive_per_cube", False)
        }
        out: list[jobs.Job] = []
        for job in queued:
            if len(out) >= limit:
                break
            if job.id in self._running:
                continue
            exclusive = getattr(self._handlers[job.kind], "exclusive_per_cube", False)
            if exclusive and job.cube in busy_cubes:
                continue
            if exclusive:
                busy_cubes.add(job.cube)
            out.append(job)
        return out

    def _sleep_s(self) -> float:
        """How long the dispatcher may sleep: until the next backoff ends, at most ``poll_s``."""
        due = self._next_due_us
        if due is None:
            return self.poll_s
        return max(0.0, min(self.poll_s, (due - self.clock()) / 1e6))

    def _dispatch_loop(self) -> None:
        sleep_s = 0.0
        while True:
            self._wakeup.wait(sleep_s)
            self._wakeup.clear()
            with self._cv:
                if self._stopping:
                    return
                free = self.concurrency - len(self._running)
                if free > 0:
                    try:
                        for job in self._runnable(limit=free):
                            self._claim(job)
                    except MemosError as exc:
                        _log.error("job dispatch failed", error=str(exc))
                sleep_s = self._sleep_s()
            self._sweep_if_due()  # outside the lock: it writes
            if self._next_sweep:
                sleep_s = max(0.0, min(sleep_s, self._next_sweep - time.monotonic()))

    def _claim(self, job: jobs.Job) -> None:
        """Start ``job`` (called with the condition held)."""
        try:
            started: jobs.Job = self.engine.transition_job(
                job.id, jobs.start, expected_revision=job.revision
            )
        except (Conflict, NotFound):
            return  # changed under us (cancelled...): look again next round
        except MemosError as exc:
            _log.error("cannot start job", job=job.id, error=str(exc))
            return
        ctx = JobContext(self, started)
        self._running[started.id] = (started, ctx)
        assert self._pool is not None
        self._emit("started", started)
        self._pool.submit(self._execute, ctx)

    def _execute(self, ctx: JobContext) -> None:
        job = ctx.job
        handler = self._handlers[job.kind]
        try:
            try:
                result = self._call(handler, ctx)
                if not ctx.committed:
                    self._finish_success(ctx, result)
                self._emit("succeeded", ctx.job)
            except JobCancelled:
                self._finish_cancelled(ctx)
            except JobDeferred as deferral:
                self._finish_deferred(ctx, deferral)
            except Exception as exc:
                self._finish_failure(ctx, exc)
        finally:
            with self._cv:
                self._running.pop(job.id, None)
                self._finished += 1
                self._cv.notify_all()
            self._wakeup.set()

    def _call(self, handler: JobHandler, ctx: JobContext) -> dict[str, Any] | None:
        if not getattr(handler, "needs_process", False):
            return handler(ctx)
        prepare = handler.prepare  # type: ignore[attr-defined]
        compute = handler.compute  # type: ignore[attr-defined]
        finish = handler.finish  # type: ignore[attr-defined]
        payload = prepare(ctx)
        with self._cv:
            if self._processes is None:
                self._processes = concurrent.futures.ProcessPoolExecutor(
                    max_workers=self.concurrency, mp_context=multiprocessing.get_context("spawn")
                )
            processes = self._processes
        output = processes.submit(compute, payload).result()
        result: dict[str, Any] | None = finish(ctx, output)
        return result

    def _finish_success(self, ctx: JobContext, result: dict[str, Any] | None) -> None:
        def change(job: jobs.Job, now: int) -> jobs.Job:
            if job.cancel_requested:
                return jobs.mark_cancelled(job, now)
            return jobs.succeed(job, now, result)

        ctx.job = self.engine.transition_job(ctx.job.id, change)
        ctx.committed = True
        if ctx.job.state == jobs.JobState.CANCELLED:
            raise JobCancelled(ctx.job.id)

    def _finish_cancelled(self, ctx: JobContext) -> None:
        if self._stopping and not ctx.committed:
            # Shutting down, not a user cancel: leave it to run again after restart.
            current: jobs.Job = self.engine.get_job(ctx.job.id)
            if current.state == jobs.JobState.RUNNING and not current.cancel_requested:
                ctx.job = self.engine.transition_job(current.id, jobs.requeue_interrupted)
                return
        try:
            current = self.engine.get_job(ctx.job.id)
            if current.state == jobs.JobState.RUNNING:
                current = self.engine.transition_job(current.id, jobs.mark_cancelled)
            ctx.job = current
        except MemosError as exc:
            _log.error("cannot mark job cancelled", job=ctx.job.id, error=str(exc))
            return
        self._emit("cancelled", ctx.job)

    def _end_attempt(
        self, ctx: JobContext, change: Callable[[jobs.Job, int], jobs.Job], what: str
    ) -> bool:
        """Apply ``change`` to the job if this attempt still runs it; False if it was
        committed or cancelled meanwhile, or the store refused (logged)."""
        try:
            current: jobs.Job = self.engine.get_job(ctx.job.id)
            if current.state != jobs.JobState.RUNNING:
                return False  # committed or cancelled meanwhile; nothing to record
            ctx.job = self.engine.transition_job(current.id, change)
        except MemosError as exc:
            _log.error(f"cannot record job {what}", job=ctx.job.id, error=str(exc))
            return False
        return True

    def _finish_deferred(self, ctx: JobContext, deferral: JobDeferred) -> None:
        delay_us = int(deferral.delay_s * 1e6)  # jobs.defer clamps at 0
        if self._end_attempt(
            ctx, lambda j, now: jobs.defer(j, now, delay_us, deferral.message), "deferral"
        ):
            queued = ctx.job.state == jobs.JobState.QUEUED
            self._emit("deferred" if queued else "cancelled", ctx.job)

    def _finish_failure(self, ctx: JobContext, exc: Exception) -> None:
        error = error_to_wire(exc)
        retryable = not isinstance(exc, _PERMANENT)
        if isinstance(exc, MemosError):
            _log.warning("job attempt failed", job=ctx.job.id, kind=ctx.job.kind, error=error)
        else:
            _log.exception("job handler raised", job=ctx.job.id, kind=ctx.job.kind)
        if self._end_attempt(
            ctx, lambda j, now: jobs.fail(j, now, error, retryable=retryable), "failure"
        ):
            queued = ctx.job.state == jobs.JobState.QUEUED
            self._emit("retrying" if queued else "failed", ctx.job)
