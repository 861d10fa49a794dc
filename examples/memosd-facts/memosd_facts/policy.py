"""The ``facts-validity`` tier policy: facts live in the long tier until they expire.

* A written fact that is not in the long tier is moved there (facts are
  stable knowledge; they never wait in short/mid).
* A fact whose ``valid_to_us`` (plus ``grace_s``) has passed is archived
  (never deleted: the timeline stays).

Both happen in one durable job kind, ``facts.maintain``, deduplicated per
cube, committed atomically with the job's success.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from memosd.memcube.model import MemoryItem
from memosd.scheduler.policy import JobRequest, PolicyContext, PolicySetting
from memosd.scheduler.runner import JobContext, JobHandler
from memosd_facts.form import FACT_FORM

__all__ = ["MAINTAIN", "POLICY_NAME", "FactValidityPolicy"]

POLICY_NAME: Final = "facts-validity"
MAINTAIN: Final = "facts.maintain"
_PAGE: Final = 100_000


def _facts(engine: Any, cube: str) -> list[MemoryItem]:
    items: list[MemoryItem] = engine.list_items(cube, status="active", form=FACT_FORM, limit=_PAGE)
    return items


def _expired(item: MemoryItem, now_us: int, grace_s: int) -> bool:
    valid_to = (item.payload or {}).get("valid_to_us")
    return isinstance(valid_to, int) and valid_to + grace_s * 1_000_000 <= now_us


class _Maintain:
    exclusive_per_cube = True

    def __init__(self, policy: FactValidityPolicy) -> None:
        self.policy = policy

    def __call__(self, ctx: JobContext) -> dict[str, Any] | None:
        cube = ctx.cube
        if cube is None:
            return {"moved": 0, "archived": 0}
        grace_s = int(ctx.args.get("grace_s", 0))
        now_us = ctx.now_us()

        def plan(p: Any) -> dict[str, Any]:
            moved = archived = 0
            for fact in _facts(ctx.engine, cube):
                current = p.item(cube, fact.id)  # fresh inside the commit
                if current.status != "active":
                    continue
                if _expired(current, now_us, grace_s):
                    p.archive(cube, fact.id, actor="facts-validity")
                    archived += 1
                elif current.tier != "long":
                    p.update(
                        cube, fact.id, tier="long", operation="migrate", actor="facts-validity"
                    )
                    moved += 1
            return {"moved": moved, "archived": archived}

        result: dict[str, Any] = ctx.commit(plan)
        return result


class FactValidityPolicy:
    name = POLICY_NAME
    settings: Sequence[PolicySetting] = (
        PolicySetting("grace_s", 0, int, "Seconds a fact stays active after valid_to.", 0),
        PolicySetting("interval_s", 3600, int, "Seconds between periodic checks.", 1),
    )

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._handlers: dict[str, JobHandler] = {MAINTAIN: _Maintain(self)}

    def _request(self, cube: str, settings: Mapping[str, Any]) -> JobRequest:
        return JobRequest(
            MAINTAIN, cube, {"grace_s": settings["grace_s"]}, dedup_key=f"{MAINTAIN}:{cube}"
        )

    def on_write(
        self, event: Any, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]:
        if event.kind != "item_written" or event.cube is None or event.item_id is None:
            return []
        item = ctx.engine.get(event.cube, event.item_id)
        if item.form != FACT_FORM or item.tier == "long" or item.status != "active":
            return []
        return [self._request(event.cube, settings)]

    def periodic(
        self, cube: str, now_us: int, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]:
        last = self._last.get(cube)
        if last is not None and now_us - last < settings["interval_s"] * 1_000_000:
            return []
        self._last[cube] = now_us
        return [self._request(cube, settings)]

    def on_demand(self, cube: str, settings: Mapping[str, Any]) -> list[JobRequest]:
        return [self._request(cube, settings)]

    def handlers(self) -> Mapping[str, JobHandler]:
        return self._handlers

    def report(
        self, cube: str, now_us: int, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> dict[str, Any]:
        facts = _facts(ctx.engine, cube)
        expired = sum(_expired(f, now_us, settings["grace_s"]) for f in facts)
        return {"facts": len(facts), "expired_pending": expired}
