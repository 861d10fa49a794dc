"""Daemon ops of the scheduler: background jobs and memory tiers (docs/scheduler.md).

Jobs: ``job_list``, ``job_get``, ``job_cancel``.  Tiers: ``tier_run``,
``tier_report``, ``tier_policies``.

Access follows the job's cube: reading a cube's jobs needs read access to
the cube, cancelling one needs write access; a job without a cube (daemon
maintenance) is visible to and cancellable by admins only.  A cube the
caller cannot read is hidden (NotFound), as everywhere else.

Registered by the import at the bottom of :mod:`memosd.service`.
"""

from __future__ import annotations

from typing import Any, Final

from memosd.auth import require_admin
from memosd.errors import BadRequest, NotFound, Unavailable
from memosd.scheduler import jobs
from memosd.service import _NOT_GIVEN, MAX_LIST_LIMIT, Call, Service, op

__all__ = ["DEFAULT_TIER_RUN_TIMEOUT_S", "MAX_TIER_RUN_TIMEOUT_S"]

_ALL: Final = 1_000_000_000
_STATES: Final = tuple(s.value for s in jobs.JobState)
#: ``tier_run`` with ``wait``: how long each job may take by default, and at most.
DEFAULT_TIER_RUN_TIMEOUT_S: Final = 300.0
MAX_TIER_RUN_TIMEOUT_S: Final = 24 * 3600.0


def _scheduler(svc: Service) -> Any:
    if svc.scheduler is None:
        raise Unavailable("this daemon runs no scheduler", reason="no_scheduler")
    return svc.scheduler


def _readable_job(svc: Service, call: Call, job_id: str, needed: str) -> jobs.Job:
    """The job, if the caller has ``needed`` access to it (see the module doc)."""
    try:
        job: jobs.Job = svc.engine.get_job(job_id)
    except NotFound:
        raise NotFound(f"no job {job_id}", reason="job") from None
    if job.cube is None:
        require_admin(call.identity, f"jobs without a cube ({job_id})")
        return job
    try:
        svc.require(call.identity, job.cube, "read")
    except NotFound:
        raise NotFound(f"no job {job_id}", reason="job") from None
    if needed != "read":
        svc.require(call.identity, job.cube, needed)
    return job


# --- jobs -----------------------------------------------------------------------


@op("job_list")
async def _job_list(svc: Service, call: Call) -> Any:
    """Jobs, newest first; filters ``state``, ``cube``, ``kind``; ``limit`` (100)."""
    a = call.args
    state = a.opt_str("state")
    cube = a.opt_str("cube")
    kind = a.opt_str("kind")
    limit = a.opt_int("limit", lo=1, hi=MAX_LIST_LIMIT) or 100
    a.done()
    if state is not None and state not in _STATES:
        raise BadRequest(
            f"job_list: state must be one of {list(_STATES)}", reason="bad_arg", field="state"
        )
    ident = call.identity
    if cube is not None:
        svc.require(ident, cube, "read")

    def read() -> list[jobs.Job]:
        found: list[jobs.Job] = svc.engine.list_jobs(state=state, cube=cube, kind=kind, limit=_ALL)
        return found

    found = await svc.run(read)
    if not ident.admin:
        readable: dict[str, bool] = {}
        visible = []
        for job in found:
            if job.cube is None:
                continue
            if job.cube not in readable:
                readable[job.cube] = svc.can_read(ident, job.cube)
            if readable[job.cube]:
                visible.append(job)
        found = visible
    return [jobs.job_to_wire(j) for j in reversed(found[-limit:])]


@op("job_get", inline=True)
def _job_get(svc: Service, call: Call) -> Any:
    job_id = call.args.req_str("id")
    call.args.done()
    return jobs.job_to_wire(_readable_job(svc, call, job_id, "read"))


@op("job_cancel")
async def _job_cancel(svc: Service, call: Call) -> Any:
    """Cancel a queued job now; ask a running one to stop (Conflict if it already ended)."""
    job_id = call.args.req_str("id")
    call.args.done()
    _readable_job(svc, call, job_id, "write")
    svc.require_writable()
    if svc.scheduler is not None:
        cancelled = await svc.run(svc.scheduler.runner.cancel, job_id)
    else:
        cancelled = await svc.run(svc.engine.transition_job, job_id, jobs.cancel)
    return jobs.job_to_wire(cancelled)


# --- tiers ----------------------------------------------------------------------


@op("tier_run")
async def _tier_run(svc: Service, call: Call) -> Any:
    """Queue a policy's on-demand jobs on a cube; with ``wait`` (default), run them in turn."""
    a = call.args
    cube = a.req_str("cube")
    policy = a.req_str("policy")
    wait_raw = a.raw("wait")
    timeout = a.opt_float("timeout")
    a.done()
    if wait_raw is not _NOT_GIVEN and wait_raw is not None and type(wait_raw) is not bool:
        raise BadRequest(
            "tier_run: argument 'wait' must be a boolean", reason="bad_arg", field="wait"
        )
    wait = wait_raw is not False
    if timeout is not None and not 0 < timeout <= MAX_TIER_RUN_TIMEOUT_S:
        raise BadRequest(
            f"tier_run: timeout must be in (0, {MAX_TIER_RUN_TIMEOUT_S:g}] seconds",
            reason="bad_arg",
            field="timeout",
        )
    svc.require(call.identity, cube, "write")
    svc.require_writable()
    scheduler = _scheduler(svc)
    if wait and not scheduler.enabled:
        raise Unavailable(
            "the scheduler is disabled (scheduler.enabled = false): jobs stay queued; "
            "run without wait to queue them anyway",
            reason="scheduler_disabled",
        )
    scheduler.tiers.registry.get(policy)  # NotFound before anything is queued

    def run() -> list[jobs.Job]:
        done: list[jobs.Job] = scheduler.tiers.run_policy(
            cube, policy, wait=wait, timeout=timeout or DEFAULT_TIER_RUN_TIMEOUT_S
        )
        return done

    return [jobs.job_to_wire(j) for j in await svc.run(run)]


@op("tier_report")
async def _tier_report(svc: Service, call: Call) -> Any:
    """Per enabled policy: items by status, bytes and a heat histogram per tier."""
    cube = call.args.req_str("cube")
    call.args.done()
    svc.require(call.identity, cube, "read")
    scheduler = _scheduler(svc)
    report: dict[str, Any] = await svc.run(scheduler.tiers.report, cube)
    return report


@op("tier_policies", inline=True)
def _tier_policies(svc: Service, call: Call) -> Any:
    """The registered tier policies (job kinds, settings), the defaults, every job kind."""
    call.args.done()
    scheduler = _scheduler(svc)
    described = dict(scheduler.tiers.describe())
    described["job_kinds"] = scheduler.runner.kinds
    described["enabled"] = bool(scheduler.enabled)
    return described
