"""Discovering, loading and calling plugins safely.

Load order (:meth:`PluginManager.load`):

1. :data:`DEFAULT_PLUGINS` - the built-in forms and policies, always loaded
   (and always required: memosd does not start without them);
2. entry points of the one group :data:`ENTRY_POINT_GROUP` (``memosd.plugins``),
   in name order, each only if the allow-list permits it (``plugins.allow``;
   ``"*"`` allows every installed plugin); the others are reported ``disabled``;
3. ``plugins.modules``: modules imported by name (development and tests).

Each plugin is loaded on its own: ``ep.load()`` wrapped, its declared API
versions (``MEMOSD_PLUGIN_API_VERSIONS``) checked against
:data:`~memosd.plugins.hookspecs.MEMOSD_PLUGIN_API`, its hook implementations
checked against the specifications (an unknown hook name is reported with a
"did you mean"), then its ``register_*`` hooks run.  Any failure marks the
plugin ``failed`` with the reason, unregisters it and moves on - unless it is
in ``plugins.required``, in which case :class:`RequiredPluginError` aborts
start-up.  A final ``check_pending()`` guards the invariant that nothing
unverified stays registered.

At run time :meth:`PluginManager.call` calls each implementation separately:
one that raises is logged with its plugin's name and turned into
:class:`~memosd.errors.PluginError`; ``BaseException``\\ s that are not
``Exception`` (KeyboardInterrupt, SystemExit, cancellation) propagate.
:class:`ObserverDispatcher` feeds ``on_change`` from its own thread, so a slow
or failing observer never holds up the engine's writer thread.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pluggy

from memosd.errors import MemosError, PluginError
from memosd.plugins import hookspecs
from memosd.plugins.forms import VERDICTS, FormRegistry, plugin_logger
from memosd.plugins.hookspecs import MEMOSD_PLUGIN_API, PROJECT_NAME, SUPPORTED_API_ATTRIBUTE

if TYPE_CHECKING:
    from memosd.engine import ChangeEvent
    from memosd.scheduler.policy import TierPolicy
    from memosd.scheduler.runner import JobHandler

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "STATUS_DISABLED",
    "STATUS_FAILED",
    "STATUS_LOADED",
    "ObserverDispatcher",
    "PluginConfig",
    "PluginInfo",
    "PluginManager",
    "RequiredPluginError",
    "hook_names",
]


#: The one entry-point group third-party plugins are discovered in.
ENTRY_POINT_GROUP: Final = "memosd.plugins"
#: Built-in plugins (module names), loaded before any third-party one.
DEFAULT_PLUGINS: Final = (
    "memosd.plugins.builtin_forms",
    "memosd.plugins.builtin_policies",
    "memosd.plugins.builtin_models",
)
STATUS_LOADED: Final = "loaded"
STATUS_FAILED: Final = "failed"
STATUS_DISABLED: Final = "disabled"
ALLOW_ALL: Final = "*"

#: hook name -> the kind of value each implementation returns (checked at load).
_REGISTRATIONS: Final = {
    "register_memory_forms": "list",
    "register_tier_policies": "list",
    "register_consolidators": "map",
    "register_embedders": "map",
    "register_model_backends": "map",
    "register_job_handlers": "map",
}


def hook_names() -> list[str]:
    """Every hook the API specifies (the functions marked ``@hookspec``)."""
    marker = f"{PROJECT_NAME}_spec"
    return sorted(
        name
        for name in dir(hookspecs)
        if callable(getattr(hookspecs, name)) and hasattr(getattr(hookspecs, name), marker)
    )


class RequiredPluginError(PluginError):
    """A plugin listed in ``plugins.required`` is missing or failed: start-up aborts."""

    default_reason = "plugin"


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """The ``[plugins]`` settings (see :class:`memosd.settings.PluginSettings`)."""

    allow: tuple[str, ...] = (ALLOW_ALL,)
    required: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, section: Any) -> PluginConfig:
        """From :class:`memosd.settings.PluginSettings` (``settings.plugins``)."""
        return cls(
            allow=tuple(section.allow),
            required=tuple(section.required),
            modules=tuple(section.modules),
        )

    def allows(self, name: str) -> bool:
        return ALLOW_ALL in self.allow or name in self.allow or name in self.required


@dataclass(slots=True)
class PluginInfo:
    """One plugin as :func:`PluginManager.report` shows it."""

    name: str
    source: str  # "builtin" | "entry point" | "module"
    version: str | None = None
    status: str = STATUS_LOADED
    reason: str | None = None
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)
    api_versions: list[int] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "reason": self.reason,
            "hooks": list(self.hooks),
            "provides": {k: list(v) for k, v in self.provides.items()},
            "api_versions": self.api_versions,
        }


class _PluginFailedError(Exception):
    """Internal: loading one plugin failed for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PluginManager:
    """Loads plugins (see the module doc) and holds what they registered."""

    def __init__(
        self,
        config: PluginConfig | None = None,
        *,
        entry_points: Callable[[], Iterable[importlib.metadata.EntryPoint]] | None = None,
        defaults: Sequence[str | object] = DEFAULT_PLUGINS,
        quiet: bool = False,
    ) -> None:
        """``quiet``: log nothing (memctl, whose stdout is its output)."""
        self.config = config or PluginConfig()
        self._log: Any = _Silent() if quiet else plugin_logger()
        self._entry_points = entry_points or _installed_entry_points
        self._defaults = tuple(defaults)
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.forms = FormRegistry()
        self.tier_policies: dict[str, tuple[str, TierPolicy]] = {}
        self.consolidators: dict[str, tuple[str, Callable[..., Any]]] = {}
        self.embedders: dict[str, tuple[str, Callable[..., Any]]] = {}
        self.model_backends: dict[str, tuple[str, Callable[..., Any]]] = {}
        self.job_handlers: dict[str, tuple[str, JobHandler]] = {}
        self._loaded = False

    # --- loading -----------------------------------------------------------------------

    def load(self) -> PluginManager:
        """Load every plugin (once).  Raises :class:`RequiredPluginError` only."""
        if self._loaded:
            return self
        self._loaded = True
        for default in self._defaults:
            if isinstance(default, str):
                self._load_one(default, "builtin", _importer(default))
            else:
                name = getattr(default, "__name__", None) or repr(default)
                self._load_one(name, "builtin", _returner(default))
        seen: set[str] = set()
        for ep in sorted(self._entry_points(), key=lambda e: e.name):
            if ep.name in seen:
                self.infos[ep.name].reason = (
                    f"{self.infos[ep.name].reason or ''} (another entry point has the same "
                    f"name: {ep.value})"
                ).strip()
                continue
            seen.add(ep.name)
            version = _dist_version(ep)
            if not self.config.allows(ep.name):
                self.infos[ep.name] = PluginInfo(
                    ep.name,
                    "entry point",
                    version,
                    STATUS_DISABLED,
                    "not in the plugins.allow list",
                )
                continue
            self._load_one(ep.name, "entry point", ep.load, version=version)
        for module in self.config.modules:
            self._load_one(module, "module", _importer(module))
        for name in self.config.required:
            info = self.infos.get(name)
            if info is None:
                raise RequiredPluginError(
                    f"required plugin {name!r} is not installed (no entry point named "
                    f"{name!r} in group {ENTRY_POINT_GROUP!r})",
                    plugin=name,
                )
        # Every registered plugin was verified one by one; this guards the invariant.
        self.pm.check_pending()
        return self

    def register(self, plugin: object, name: str, *, version: str | None = None) -> PluginInfo:
        """Load an already imported plugin object (tests, embedding applications)."""
        return self._load_one(name, "module", _returner(plugin), version=version)

    def _load_one(
        self,
        name: str,
        source: str,
        importer: Callable[[], object],
        *,
        version: str | None = None,
    ) -> PluginInfo:
        info = PluginInfo(name, source, version)
        key = name
        while key in self.infos:  # keep the report of the first plugin of that name
            key += "+"
        self.infos[key] = info
        try:
            try:
                plugin = importer()
            except Exception as exc:
                raise _PluginFailedError(f"import failed: {type(exc).__name__}: {exc}") from exc
            if info.version is None:
                info.version = _module_version(plugin)
            info.api_versions = self._check_api(plugin)
            self._register_hooks(name, plugin, info)
            try:
                self._collect(name, info)
            except BaseException:
                self._forget(name)
                raise
        except _PluginFailedError as failure:
            info.status = STATUS_FAILED
            info.reason = failure.reason
            self._log.error("plugin failed to load", plugin=name, reason=failure.reason)
            # A broken built-in is a broken memosd install: never serve without it.
            if name in self.config.required or source == "builtin":
                raise RequiredPluginError(
                    f"required plugin {name!r} failed to load: {failure.reason}", plugin=name
                ) from failure
            return info
        self._log.info("plugin loaded", plugin=name, version=info.version, hooks=info.hooks)
        return info

    def _check_api(self, plugin: object) -> list[int]:
        declared = getattr(plugin, SUPPORTED_API_ATTRIBUTE, None)
        if declared is None:
            raise _PluginFailedError(
                f"declares no {SUPPORTED_API_ATTRIBUTE} (the memosd plugin API versions it "
                f"supports; this memosd implements version {MEMOSD_PLUGIN_API})"
            )
        if isinstance(declared, int) and not isinstance(declared, bool):
            declared = (declared,)
        if not isinstance(declared, tuple | list | set | frozenset) or not all(
            type(v) is int for v in declared
        ):
            raise _PluginFailedError(
                f"{SUPPORTED_API_ATTRIBUTE} must be a tuple of ints, got {declared!r}"
            )
        versions = sorted(declared)
        if MEMOSD_PLUGIN_API not in versions:
            raise _PluginFailedError(
                f"plugin API version mismatch: the plugin supports {versions}, this memosd "
                f"implements version {MEMOSD_PLUGIN_API}"
            )
        return versions

    def _register_hooks(self, name: str, plugin: object, info: PluginInfo) -> None:
        if self.pm.has_plugin(name) or self.pm.is_registered(plugin):
            raise _PluginFailedError("a plugin with this name or object is already loaded")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            # pluggy keeps what it registered before the bad hook: take it all back.
            with contextlib.suppress(Exception):
                self.pm.unregister(name=name)
            raise _PluginFailedError(f"invalid hook implementation: {exc}") from exc
        known = set(hook_names())
        callers = self.pm.get_hookcallers(plugin) or []
        hooks = sorted(caller.name for caller in callers)
        unknown = [h for h in hooks if h not in known]
        if unknown:
            self.pm.unregister(plugin)
            hints = []
            for hook in unknown:
                close = difflib.get_close_matches(hook, sorted(known), n=1)
                hints.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise _PluginFailedError(
                f"implements unknown hook {', '.join(hints)}; "
                f"known hooks: {', '.join(sorted(known))}"
            )
        if not hooks:
            self._log.warning("plugin implements no hook", plugin=name)
        info.hooks = hooks

    def _forget(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.forms.remove_plugin(name)
        for table in self._tables().values():
            for key in [k for k, (owner, _) in table.items() if owner == name]:
                del table[key]

    def _tables(self) -> dict[str, dict[str, Any]]:
        return {
            "register_tier_policies": self.tier_policies,
            "register_consolidators": self.consolidators,
            "register_embedders": self.embedders,
            "register_model_backends": self.model_backends,
            "register_job_handlers": self.job_handlers,
        }

    def _collect(self, name: str, info: PluginInfo) -> None:
        """Run this plugin's ``register_*`` hooks and store what they return."""
        for hook, kind in _REGISTRATIONS.items():
            impl = self._impl_of(hook, name)
            if impl is None:
                continue
            try:
                value = impl.function()
            except Exception as exc:
                raise _PluginFailedError(f"{hook} raised {type(exc).__name__}: {exc}") from exc
            if value is None:
                continue
            if kind == "map" and not isinstance(value, Mapping):
                raise _PluginFailedError(f"{hook} must return a mapping of name -> object")
            if kind == "list" and (isinstance(value, str | bytes | Mapping)):
                raise _PluginFailedError(f"{hook} must return an iterable of objects")
            try:
                names = self._store(hook, name, value)
            except MemosError as exc:
                raise _PluginFailedError(f"{hook}: {exc.message}") from exc
            if names:
                info.provides[hook.removeprefix("register_")] = names

    def _store(self, hook: str, plugin: str, value: Any) -> list[str]:
        if hook == "register_memory_forms":
            return [self.forms.register(form, plugin).name for form in value]
        if hook == "register_tier_policies":
            from memosd.scheduler.policy import TierPolicy  # noqa: PLC0415 - lazy, heavy-ish

            names = []
            for policy in value:
                if not isinstance(policy, TierPolicy):
                    raise PluginError(f"{policy!r} does not implement the TierPolicy protocol")
                for kind in policy.handlers():
                    owner = self._job_kind_owner(kind)
                    if owner is not None:
                        raise PluginError(f"job kind {kind!r} is already handled by {owner}")
                self._store_named(self.tier_policies, "tier policy", policy.name, plugin, policy)
                names.append(policy.name)
            return names
        if hook == "register_job_handlers":
            for kind in value:
                owner = self._job_kind_owner(kind)
                if owner is not None:
                    raise PluginError(f"job kind {kind!r} is already handled by {owner}")
        table = self._tables()[hook]
        what = hook.removeprefix("register_").rstrip("s").replace("_", " ")
        for key, obj in value.items():
            if not isinstance(key, str) or not callable(obj):
                raise PluginError(f"{what} {key!r}: expected a name and a callable")
            self._store_named(table, what, key, plugin, obj)
        return sorted(value)

    def _job_kind_owner(self, kind: str) -> str | None:
        """Who handles job ``kind`` already (a policy or a plugin), or None."""
        if kind in self.job_handlers:
            return f"plugin {self.job_handlers[kind][0]!r}"
        for plugin, policy in self.tier_policies.values():
            if kind in policy.handlers():
                return f"tier policy {policy.name!r} of plugin {plugin!r}"
        return None

    def all_job_handlers(self) -> dict[str, JobHandler]:
        """Every job handler: the tier policies' and ``register_job_handlers``' (for the runner)."""
        handlers: dict[str, JobHandler] = {}
        for _, policy in self.tier_policies.values():
            handlers.update(policy.handlers())
        handlers.update({kind: handler for kind, (_, handler) in self.job_handlers.items()})
        return handlers

    @staticmethod
    def _store_named(table: dict[str, Any], what: str, key: str, plugin: str, obj: Any) -> None:
        if key in table:
            raise PluginError(f"{what} {key!r} is already registered by plugin {table[key][0]!r}")
        table[key] = (plugin, obj)

    def _impl_of(self, hook: str, plugin_name: str) -> pluggy.HookImpl | None:
        caller: pluggy.HookCaller = getattr(self.pm.hook, hook)
        for impl in caller.get_hookimpls():
            if impl.plugin_name == plugin_name:
                return impl
        return None

    # --- run time ----------------------------------------------------------------------

    def call(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook``; ``[(plugin name, result), ...]``.

        The first implementation that raises stops the call with a
        :class:`PluginError` naming its plugin (the error is logged).
        """
        results = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            results.append((impl.plugin_name, self._call_impl(hook, impl, kwargs)))
        return results

    def _call_impl(self, hook: str, impl: pluggy.HookImpl, kwargs: Mapping[str, Any]) -> Any:
        try:
            return impl.function(*[kwargs[arg] for arg in impl.argnames])
        except VERDICTS:
            raise
        except Exception as exc:
            self._log.exception("plugin hook failed", plugin=impl.plugin_name, hook=hook)
            raise PluginError(
                f"plugin {impl.plugin_name!r}: hook {hook} failed: {type(exc).__name__}: {exc}",
                plugin=impl.plugin_name,
                hook=hook,
            ) from exc

    def call_isolated(self, hook: str, **kwargs: Any) -> list[PluginError]:
        """Call every implementation even if some fail; the errors (already logged)."""
        errors = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                self._call_impl(hook, impl, kwargs)
            except PluginError as exc:
                errors.append(exc)
        return errors

    def notify_change(self, event: ChangeEvent) -> list[PluginError]:
        """Give ``event`` to every ``on_change`` observer (isolated; errors logged)."""
        return self.call_isolated("on_change", event=event)

    def has_observers(self) -> bool:
        return bool(self.pm.hook.on_change.get_hookimpls())

    def register_commands(self, app: Any) -> list[PluginError]:
        """Let plugins add memctl sub-commands to ``app``; failures are returned, not raised."""
        return self.call_isolated("register_commands", app=app)

    def policies(self) -> list[TierPolicy]:
        """The registered tier policies (for :class:`memosd.scheduler.policy.PolicyRegistry`)."""
        return [policy for _, policy in self.tier_policies.values()]

    def report(self) -> list[dict[str, Any]]:
        """Every plugin seen: name, version, source, status, reason, hooks, what it provides."""
        return [info.to_wire() for info in self.infos.values()]

    plugin_report = report

    def loaded(self) -> list[str]:
        return [n for n, i in self.infos.items() if i.status == STATUS_LOADED]


class ObserverDispatcher:
    """Runs ``on_change`` observers on their own thread, in event order.

    :meth:`listener` is what the engine calls (on its writer thread): it only
    enqueues.  Events beyond ``max_queue`` are dropped and counted (observers
    are best-effort; the durable change log is ``engine.changes_since``).
    """

    def __init__(self, manager: PluginManager, *, max_queue: int = 100_000) -> None:
        self.manager = manager
        self.dropped = 0
        self.failures = 0
        self._queue: queue.Queue[ChangeEvent | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None

    def listener(self, event: ChangeEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="memosd-plugin-observers", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                self.failures += len(self.manager.notify_change(event))
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event was handed out; False on timeout (tests)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None


def _importer(module: str) -> Callable[[], object]:
    return lambda: importlib.import_module(module)


def _returner(plugin: object) -> Callable[[], object]:
    return lambda: plugin


class _Silent:
    def _drop(self, *args: Any, **kwargs: Any) -> None:
        pass

    info = warning = error = exception = _drop


def _installed_entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _dist_version(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    version = getattr(dist, "version", None)
    return str(version) if version else None


def _module_version(plugin: object) -> str | None:
    version = getattr(plugin, "__version__", None)
    if isinstance(version, str):
        return version
    if getattr(plugin, "__name__", "").startswith("memosd."):
        from memosd import __version__  # noqa: PLC0415

        return __version__
    return None
