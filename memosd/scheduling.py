"""The daemon's background work: one job runner and one tier scheduler.

:func:`open_scheduler` wires :class:`~memosd.scheduler.runner.JobRunner`
and :class:`~memosd.scheduler.driver.TierScheduler` to what the daemon
already has: the engine, the plugins (tier policies, consolidators, job
handlers) and the search service's embedder (so the model is loaded once).
The daemon's own subsystems (activation and parameter memory) add their job
handlers through ``handlers``; a plugin's handler of the same kind loses
(built-ins are not replaceable by accident) and is logged.

Job events reach the change feed as :class:`JobFeedEvent` values, which the
feed routes like engine events (``kind`` and ``cube``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from memosd.scheduler.driver import TierScheduler, build_registry
from memosd.scheduler.runner import JobEvent, JobHandler, JobRunner

if TYPE_CHECKING:
    from memosd.plugins.runtime import PluginRuntime
    from memosd.settings import SchedulerSettings

__all__ = ["JobFeedEvent", "SchedulerRuntime", "open_scheduler"]

_log = structlog.get_logger("memosd.scheduler")


@dataclass(frozen=True, slots=True)
class JobFeedEvent:
    """A job event on the change feed: ``kind`` is ``job_<type>`` (``job_progress``...)."""

    kind: str
    cube: str | None
    job: dict[str, Any]

    @classmethod
    def of(cls, event: JobEvent) -> JobFeedEvent:
        wire = event.to_wire()
        return cls(str(wire.pop("event")), event.cube, wire)


class SchedulerRuntime:
    """The runner and the tier scheduler of one daemon; started after recovery."""

    def __init__(self, runner: JobRunner, tiers: TierScheduler, *, enabled: bool) -> None:
        self.runner = runner
        self.tiers = tiers
        self.enabled = enabled
        self._started = False

    def start(self, publish: Callable[[Any], None] | None = None) -> None:
        """Forward job events to ``publish`` (the feed) and start both threads (if enabled)."""
        if publish is not None:
            self.runner.add_listener(lambda event: publish(JobFeedEvent.of(event)))
        if self.enabled and not self._started:
            self._started = True
            self.runner.start()
            self.tiers.start()

    def close(self) -> None:
        """Stop the tier scheduler, then the runner (running jobs are asked to stop)."""
        self.tiers.close()
        self.runner.close()


def open_scheduler(
    settings: SchedulerSettings,
    engine: Any,
    *,
    plugins: PluginRuntime | None,
    embedder: Any = None,
    vector_lookup: Any = None,
    index_wait: Any = None,
    handlers: Mapping[str, JobHandler] | None = None,
) -> SchedulerRuntime:
    """Build (not start) the daemon's scheduler from its settings and plugins."""
    manager = plugins.manager if plugins is not None else None
    policies = manager.policies() if manager is not None else []
    consolidators = (
        {name: factory for name, (_, factory) in manager.consolidators.items()}
        if manager is not None
        else {}
    )
    registry = build_registry(
        policies,
        embedder=embedder,
        consolidators=consolidators,
        vector_lookup=vector_lookup,
        index_wait=index_wait,
    )
    all_handlers: dict[str, JobHandler] = dict(plugins.job_handlers() if plugins else {})
    for kind, handler in (handlers or {}).items():
        if kind in all_handlers:
            _log.warning("a plugin's job handler is shadowed by a built-in one", kind=kind)
        all_handlers[kind] = handler
    runner = JobRunner(
        engine,
        all_handlers,
        concurrency=settings.concurrency,
        poll_s=settings.poll_s,
        retention_s=settings.job_retention_s,
        failed_retention_s=settings.failed_job_retention_s,
    )
    tiers = TierScheduler(
        engine,
        registry,
        runner,
        default_policies=settings.default_policies,
        tick_s=settings.tick_s,
    )
    return SchedulerRuntime(runner, tiers, enabled=settings.enabled)
