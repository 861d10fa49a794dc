"""Tier policies: the plugin interface and a registry.

A :class:`TierPolicy` is a *decision maker*: it looks at change events and
at the clock and answers with :class:`JobRequest`\\ s; the work itself runs
as durable jobs through the :class:`~memosd.scheduler.runner.JobRunner`
using the handlers the policy provides (:meth:`TierPolicy.handlers`).  The
built-in plaintext tiers (:mod:`memosd.scheduler.policies_builtin`) are one
such policy; third-party plugins register theirs through the same plugin
hook (see ``docs/scheduler.md``).

Per-cube configuration lives in ``CubeConfig.tier_policy``::

    {"policies": ["plaintext"],                 # which policies run on this cube
     "plaintext": {"short_capacity": 20}}        # overrides of that policy's settings

A cube without a ``"policies"`` key uses the daemon-wide default list.  Every
setting a policy reads is declared in :attr:`TierPolicy.settings` with its
default, type and help; :func:`resolve_settings` rejects unknown keys and
wrong types with a hint.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from memosd.errors import BadRequest, Conflict, NotFound

if TYPE_CHECKING:
    from memosd.engine import ChangeEvent
    from memosd.scheduler.runner import JobHandler

__all__ = [
    "JobRequest",
    "PolicyContext",
    "PolicyRegistry",
    "PolicySetting",
    "TierPolicy",
    "policies_for_cube",
    "resolve_settings",
]

#: Types a policy setting may declare (msgpack/TOML-safe scalars).
SETTING_TYPES: Final = (bool, int, float, str)


@dataclass(frozen=True, slots=True)
class PolicySetting:
    """One documented knob of a policy: ``(name, default, type, help)``."""

    name: str
    default: Any
    type: type
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: Any, *, where: str) -> Any:
        """``value`` converted to this setting's type, or BadRequest naming it."""
        ok = type(value) is self.type or (self.type is float and type(value) is int)
        if not ok:
            raise BadRequest(
                f"{where}: setting {self.name!r} must be {self.type.__name__}, got {value!r}",
                reason="bad_setting",
            )
        if self.minimum is not None and float(value) < self.minimum:
            raise BadRequest(
                f"{where}: setting {self.name!r} must be >= {self.minimum}, got {value!r}",
                reason="bad_setting",
            )
        if self.choices is not None and value not in self.choices:
            raise BadRequest(
                f"{where}: setting {self.name!r} must be one of {list(self.choices)}, "
                f"got {value!r}",
                reason="bad_setting",
            )
        return float(value) if self.type is float else value


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A policy's wish for a job; the scheduler submits it (deduplicated by ``dedup_key``)."""

    kind: str
    cube: str | None
    args: dict[str, Any] = field(default_factory=dict)
    dedup_key: str | None = None
    not_before_us: int | None = None
    max_attempts: int = 3


class PolicyContext(Protocol):
    """What a policy may look at while deciding (reads only, never writes)."""

    @property
    def engine(self) -> Any: ...

    def settings_for(self, cube: str, policy: str) -> dict[str, Any] | None:
        """The resolved settings of ``policy`` on ``cube``; None if it is not enabled there."""
        ...


@runtime_checkable
class TierPolicy(Protocol):
    """A tier policy plugin.

    ``on_write`` runs on the scheduler's event thread (never the engine's
    writer thread) for every acknowledged change of a cube where the policy
    is enabled; it must be quick (point reads at most).  ``periodic`` runs
    every scheduler tick for each such cube.  Both return job requests; the
    work happens in the handlers of :meth:`handlers`, whose job kinds must
    be namespaced by the policy (``"tiers.evict"``...).  ``on_demand``
    answers ``memctl tier run CUBE POLICY``.
    """

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> Sequence[PolicySetting]: ...

    def on_write(
        self, event: ChangeEvent, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]: ...

    def periodic(
        self, cube: str, now_us: int, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> list[JobRequest]: ...

    def on_demand(self, cube: str, settings: Mapping[str, Any]) -> list[JobRequest]: ...

    def handlers(self) -> Mapping[str, JobHandler]: ...

    def report(
        self, cube: str, now_us: int, settings: Mapping[str, Any], ctx: PolicyContext
    ) -> dict[str, Any]:
        """Counts, bytes and heat histogram per tier (``memctl tiers CUBE``)."""
        ...


def resolve_settings(
    policy: TierPolicy, overrides: Mapping[str, Any] | None, *, where: str = "tier_policy"
) -> dict[str, Any]:
    """Defaults of ``policy`` with ``overrides`` applied and checked."""
    declared = {s.name: s for s in policy.settings}
    values = {s.name: s.default for s in policy.settings}
    for key, value in (overrides or {}).items():
        spec = declared.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, declared, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadRequest(
                f"{where}: policy {policy.name!r} has no setting {key!r}{hint}",
                reason="unknown_setting",
            )
        values[key] = spec.check(value, where=f"{where}.{policy.name}")
    return values


def policies_for_cube(tier_policy: Mapping[str, Any], default: Sequence[str]) -> list[str]:
    """Names of the policies enabled on a cube (its ``"policies"`` key, else ``default``)."""
    names = tier_policy.get("policies", default)
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise BadRequest("tier_policy.policies must be a list of policy names")
    return list(names)


class PolicyRegistry:
    """The loaded policies by name, and the union of their job handlers."""

    def __init__(self, policies: Iterable[TierPolicy] = ()) -> None:
        self._policies: dict[str, TierPolicy] = {}
        for policy in policies:
            self.register(policy)

    def register(self, policy: TierPolicy) -> None:
        if not isinstance(policy, TierPolicy):
            raise BadRequest(f"{policy!r} does not implement the TierPolicy protocol")
        if policy.name in self._policies:
            raise Conflict(f"a tier policy named {policy.name!r} is already registered")
        for kind in policy.handlers():
            for other in self._policies.values():
                if kind in other.handlers():
                    raise Conflict(
                        f"job kind {kind!r} of policy {policy.name!r} is already "
                        f"handled by policy {other.name!r}"
                    )
        self._policies[policy.name] = policy

    def get(self, name: str) -> TierPolicy:
        try:
            return self._policies[name]
        except KeyError:
            raise NotFound(
                f"no tier policy named {name!r} (loaded: {sorted(self._policies)})",
                reason="no_policy",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._policies)

    def __iter__(self) -> Any:
        return iter(list(self._policies.values()))

    def __len__(self) -> int:
        return len(self._policies)

    def handlers(self) -> dict[str, JobHandler]:
        out: dict[str, JobHandler] = {}
        for policy in self._policies.values():
            out.update(policy.handlers())
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Each policy with its settings (name, default, type, help), for docs and memctl."""
        return [
            {
                "name": p.name,
                "job_kinds": sorted(p.handlers()),
                "settings": [
                    {
                        "name": s.name,
                        "default": s.default,
                        "type": s.type.__name__,
                        "help": s.help,
                    }
                    for s in p.settings
                ],
            }
            for p in self._policies.values()
        ]
