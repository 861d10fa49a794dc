"""TierScheduler: feeds change events and clock ticks to the tier policies.

The engine calls listeners on its writer thread, where nothing slow may
run; :class:`TierScheduler` only enqueues the event there.  Its own thread
takes events off the queue, asks every policy enabled on the event's cube
(:meth:`TierPolicy.on_write`), and every ``tick_s`` asks them for periodic
work (:meth:`TierPolicy.periodic`).  The resulting :class:`JobRequest`\\ s
are submitted through the :class:`JobRunner` (deduplicated by key, so a
burst of writes queues one job).  A policy that raises is logged with its
name and skipped; the scheduler keeps going (plugin isolation).

Tests drive it synchronously with :meth:`pump` and :meth:`tick` instead
of :meth:`start`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from memosd.errors import BadRequest, MemosError, NotFound, Unavailable
from memosd.scheduler import jobs
from memosd.scheduler.policy import (
    JobRequest,
    PolicyRegistry,
    TierPolicy,
    policies_for_cube,
    resolve_settings,
)
from memosd.scheduler.runner import JobRunner

if TYPE_CHECKING:
    from memosd.embed import Embedder
    from memosd.engine import ChangeEvent

__all__ = ["TierScheduler", "build_registry"]

_log = structlog.get_logger("memosd.scheduler")


def build_registry(
    policies: Iterable[TierPolicy],
    *,
    embedder: Embedder | Callable[[], Embedder] | None = None,
    consolidators: Mapping[str, Callable[..., Any]] | None = None,
    vector_lookup: Callable[..., Any] | None = None,
    index_wait: Callable[[float], bool] | None = None,
) -> PolicyRegistry:
    """A registry of the policies plugins registered, wired to the daemon's resources.

    ``policies``: what the ``register_tier_policies`` hooks returned
    (``PluginManager.policies()``).  Policies that accept them get the
    shared ``embedder`` (``use_embedder``: the search service's, so the model
    is loaded once), the vectors its index already holds (``use_vector_lookup``:
    ``SearchService.known_vectors`` and ``wait_caught_up``, so a turn is not
    embedded twice) and the
    consolidator factories of the ``register_consolidators`` hooks
    (``use_consolidators``).
    """
    registry = PolicyRegistry(policies)
    for policy in registry:
        if embedder is not None and hasattr(policy, "use_embedder"):
            policy.use_embedder(embedder)
        if vector_lookup is not None and hasattr(policy, "use_vector_lookup"):
            policy.use_vector_lookup(vector_lookup, index_wait)
        if consolidators and hasattr(policy, "use_consolidators"):
            policy.use_consolidators(consolidators)
    return registry


class TierScheduler:
    """Runs the enabled tier policies of every cube (see the module doc)."""

    def __init__(
        self,
        engine: Any,
        registry: PolicyRegistry,
        runner: JobRunner,
        *,
        default_policies: Sequence[str] = ("plaintext",),
        clock: Callable[[], int] | None = None,
        tick_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.runner = runner
        self.default_policies = tuple(default_policies)
        self.clock = clock or runner.clock
        self.tick_s = tick_s
        # Events wait in a deque; the thread is woken by a token on ``_wake``,
        # at most one queued at a time: a burst of writes costs one wake-up of
        # the policy thread, not one per event (each wake-up is a futex call
        # and a GIL hand-off on the engine's writer thread).
        self._events: deque[ChangeEvent] = deque()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._wake_queued = False
        self._settings_cache: dict[str, dict[str, dict[str, Any]]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._listening = False
        self._lock = threading.Lock()

    # --- PolicyContext --------------------------------------------------------------

    def settings_for(self, cube: str, policy: str) -> dict[str, Any] | None:
        """Resolved settings of ``policy`` on ``cube`` (None if not enabled there)."""
        return self._cube_policies(cube).get(policy)

    def _cube_policies(self, cube: str) -> dict[str, dict[str, Any]]:
        cached = self._settings_cache.get(cube)
        if cached is not None:
            return cached
        config = self.engine.get_cube(cube).config.tier_policy
        enabled: dict[str, dict[str, Any]] = {}
        for name in policies_for_cube(config, self.default_policies):
            try:
                policy = self.registry.get(name)
            except NotFound:
                _log.warning("cube names an unknown tier policy", cube=cube, policy=name)
                continue
            enabled[name] = resolve_settings(policy, config.get(name), where=f"cube {cube}")
        self._settings_cache[cube] = enabled
        return enabled

    # --- lifecycle ------------------------------------------------------------------

    def listen(self) -> None:
        """Subscribe to the engine's change events (once)."""
        if not self._listening:
            self._listening = True
            self.engine.add_listener(self._on_change)

    def start(self) -> None:
        """Listen to changes and start the policy thread (ticks every ``tick_s``)."""
        self.listen()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="memosd-tier-scheduler", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._closed = True
        self._wake.put(None)
        if self._thread is not None:
            self._thread.join(10)

    def _is_closed(self) -> bool:
        return self._closed

    def _on_change(self, event: ChangeEvent) -> None:
        # Engine writer thread: enqueue only.  No wake-up is lost: the thread
        # clears ``_wake_queued`` *before* it drains the deque, so an event
        # appended after the drain sees the flag cleared and queues a token.
        if not self._closed:
            self._events.append(event)
            if not self._wake_queued:
                self._wake_queued = True
                self._wake.put(None)

    def _loop(self) -> None:
        import time  # noqa: PLC0415 - only the thread needs the monotonic clock

        next_tick = 0.0
        while not self._is_closed():
            timeout = max(0.0, next_tick - time.monotonic())
            if timeout > 0:
                with contextlib.suppress(queue.Empty):
                    self._wake.get(timeout=timeout)
            if self._is_closed():
                return
            self._wake_queued = False
            while self._events:
                try:
                    self._handle(self._events.popleft())
                except Exception:  # e.g. the engine refusing writes: log, keep the thread
                    _log.exception("tier scheduler step failed")
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self.tick_s
                try:
                    self.tick()
                except Exception:
                    _log.exception("tier scheduler step failed")

    # --- driving ----------------------------------------------------------------------

    def pump(self) -> int:
        """Handle every queued change event now (synchronously); returns how many."""
        handled = 0
        while self._events:
            self._handle(self._events.popleft())
            handled += 1
        return handled

    def settle(self, *, rounds: int = 100, timeout: float = 300.0) -> None:
        """Without the background thread: feed pending events to the policies and run
        every due job, until quiet (in-process benchmarks such as LoCoMo, tests)."""
        for _ in range(rounds):
            handled = self.pump()
            self.runner.drain(timeout)
            if handled == 0 and self.pump() == 0:
                return
        raise Unavailable(f"tiers did not settle in {rounds} rounds", reason="timeout")

    def _handle(self, event: ChangeEvent) -> None:
        if event.kind in {"cube_created", "cube_dropped"} and event.cube is not None:
            self._settings_cache.pop(event.cube, None)
        if event.cube is None or event.kind in {"job_changed", "job_deleted"}:
            return
        try:
            enabled = self._cube_policies(event.cube) if event.kind != "cube_dropped" else {}
        except MemosError:
            return  # cube dropped meanwhile, or a bad config (logged when it is used)
        for name, settings in enabled.items():
            self._ask(name, _on_write_call(event, settings, self))
        if event.kind == "cube_dropped":
            for policy in self.registry:
                self._ask(policy.name, _on_write_call(event, {}, self))

    def tick(self, now_us: int | None = None) -> list[jobs.Job]:
        """Ask every enabled policy of every cube for periodic work; returns submitted jobs."""
        now = self.clock() if now_us is None else now_us
        submitted: list[jobs.Job] = []
        for cube in self.engine.list_cubes():
            try:
                enabled = self._cube_policies(cube.name)
            except MemosError as exc:
                _log.error("bad tier policy config", cube=cube.name, error=str(exc))
                continue
            for name, settings in enabled.items():
                submitted += self._ask(name, _periodic_call(cube.name, now, settings, self))
        return submitted

    def _ask(self, name: str, call: Callable[[TierPolicy], list[JobRequest]]) -> list[jobs.Job]:
        try:
            requests = call(self.registry.get(name))
        except Exception:  # a policy plugin must not take the scheduler down
            _log.exception("tier policy hook failed", policy=name)
            return []
        submitted = []
        for request in requests:
            try:
                submitted.append(self._submit(request))
            except MemosError as exc:  # bad request from the policy, or storage trouble
                _log.error(
                    "cannot queue a policy's job",
                    policy=name,
                    kind=request.kind,
                    cube=request.cube,
                    error=str(exc),
                )
        return submitted

    def _submit(self, request: JobRequest) -> jobs.Job:
        return self.runner.submit(
            request.kind,
            cube=request.cube,
            args=request.args,
            dedup_key=request.dedup_key,
            not_before_us=request.not_before_us,
            max_attempts=request.max_attempts,
            actor="scheduler",
        )

    # --- on demand and reports ----------------------------------------------------------

    def run_policy(
        self, cube: str, policy: str, *, wait: bool = True, timeout: float | None = None
    ) -> list[jobs.Job]:
        """``memctl tier run CUBE POLICY``: queue the policy's on-demand jobs, in order.

        With ``wait``, each job runs to its end before the next is queued;
        ``timeout`` bounds the whole run (Unavailable when it passes; the
        job being waited for keeps running, later ones are not queued).
        Works whether or not the policy is enabled on the cube (its settings
        for the cube still apply).
        """
        import time  # noqa: PLC0415 - only on-demand runs need the monotonic clock

        target = self.registry.get(policy)
        config = self.engine.get_cube(cube).config.tier_policy
        settings = resolve_settings(target, config.get(policy), where=f"cube {cube}")
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for request in target.on_demand(cube, settings):
            job = self._submit(request)
            if wait:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                job = self.runner.wait(job.id, timeout=left)
            out.append(job)
        return out

    def report(self, cube: str, *, now_us: int | None = None) -> dict[str, Any]:
        """``memctl tiers CUBE``: each enabled policy's report."""
        now = self.clock() if now_us is None else now_us
        enabled = self._cube_policies(cube)
        if not enabled:
            raise BadRequest(f"no tier policy is enabled on cube {cube!r}", reason="no_policy")
        return {
            name: self.registry.get(name).report(cube, now, settings, self)
            for name, settings in enabled.items()
        }

    def describe(self) -> Mapping[str, Any]:
        return {
            "policies": self.registry.describe(),
            "default_policies": list(self.default_policies),
        }


def _on_write_call(
    event: ChangeEvent, settings: dict[str, Any], ctx: TierScheduler
) -> Callable[[TierPolicy], list[JobRequest]]:
    return lambda policy: policy.on_write(event, settings, ctx)


def _periodic_call(
    cube: str, now_us: int, settings: dict[str, Any], ctx: TierScheduler
) -> Callable[[TierPolicy], list[JobRequest]]:
    return lambda policy: policy.periodic(cube, now_us, settings, ctx)
