"""What the daemon does with plugins: load at start, validate items, report, observe.

Small functions the service and the daemon call at their edges, so the
plugin logic stays here and their code changes stay one-liners:

* :func:`load_plugins` - from the ``[plugins]`` settings; raises
  :class:`~memosd.plugins.manager.RequiredPluginError` (start-up aborts);
* :func:`validate_add` / :func:`validate_update` - run an item's form over
  the text and payload a client sends (unknown form -> ``bad_request``);
* :func:`plugins_result` - the ``plugins`` op's answer;
* :class:`PluginRuntime` - the loaded manager plus the ``on_change``
  observer thread, attached to an engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memosd.errors import BadRequest
from memosd.memcube.model import Form, MemoryItem
from memosd.plugins.hookspecs import MEMOSD_PLUGIN_API
from memosd.plugins.manager import ObserverDispatcher, PluginConfig, PluginManager

if TYPE_CHECKING:
    from memosd.scheduler.policy import PolicyRegistry
    from memosd.scheduler.runner import JobHandler

__all__ = [
    "PluginRuntime",
    "check_forms",
    "load_plugins",
    "plugins_result",
    "validate_add",
    "validate_update",
]

_NOT_GIVEN: Any = object()
_PLAINTEXT: str = Form.PLAINTEXT.value  # an enum's .value is a property call


def load_plugins(settings: Any) -> PluginManager:
    """A loaded manager for :class:`memosd.settings.Settings` (its ``plugins`` section)."""
    return PluginManager(PluginConfig.from_settings(settings.plugins)).load()


def validate_add(
    manager: PluginManager, form: str | None, text: str, fields: dict[str, Any]
) -> str:
    """Validate a new item through its form; returns the text, updates ``fields["payload"]``."""
    name = _PLAINTEXT if form is None else form
    if not isinstance(name, str):
        raise BadRequest("argument 'form' must be a string", reason="bad_arg", field="form")
    payload = fields.get("payload")
    if payload is not None and type(payload) is not dict:
        raise BadRequest("argument 'payload' must be a map", reason="bad_arg", field="payload")
    new_text, new_payload = manager.forms.validate(name, text, payload)
    if new_payload is not None or "payload" in fields:
        fields["payload"] = new_payload
    return new_text


def validate_update(manager: PluginManager, current: MemoryItem, fields: dict[str, Any]) -> None:
    """Validate an update of ``current`` that changes its text or payload (in place).

    The form sees the values after the update; if it rewrites the text (a
    form that derives its text from the payload), the new text is stored too.
    """
    if "text" not in fields and "payload" not in fields:
        return
    text = fields.get("text", current.text)
    payload = fields.get("payload", current.payload)
    if not isinstance(text, str):
        raise BadRequest("argument 'text' must be a string", reason="bad_arg", field="text")
    if payload is not None and type(payload) is not dict:
        raise BadRequest("argument 'payload' must be a map", reason="bad_arg", field="payload")
    new_text, new_payload = manager.forms.validate(current.form, text, payload)
    if "text" in fields or new_text != current.text:
        fields["text"] = new_text
    if "payload" in fields:
        fields["payload"] = new_payload


def check_forms(forms: Any, export: Any) -> None:
    """Before an import: every live item version passes its form's validation.

    An unknown form, or a version its form rejects, is ``bad_request`` naming
    the item (nothing is imported).  Tombstones carry no content to check.
    """
    for versions in export.items:
        for item in versions:
            if item.status == "deleted":
                continue
            try:
                forms.validate(item.form, item.text, item.payload)
            except BadRequest as exc:
                raise BadRequest(
                    f"import: item {item.id} version {item.version}: {exc.message}",
                    reason=exc.reason or "bad_item",
                    item=item.id,
                ) from None


def plugins_result(manager: PluginManager | None) -> dict[str, Any]:
    """The ``plugins`` op: API version, every plugin's report, forms and policies."""
    if manager is None:
        return {"api": MEMOSD_PLUGIN_API, "plugins": [], "forms": [], "tier_policies": []}
    return {
        "api": MEMOSD_PLUGIN_API,
        "plugins": manager.report(),
        "forms": manager.forms.names(),
        "tier_policies": sorted(manager.tier_policies),
    }


class PluginRuntime:
    """The daemon's plugins: the manager and, if any plugin observes, the observer thread."""

    def __init__(self, manager: PluginManager) -> None:
        self.manager = manager
        self.observers: ObserverDispatcher | None = None

    def policy_registry(self) -> PolicyRegistry:
        """The registered tier policies as the scheduler's registry."""
        from memosd.scheduler.policy import PolicyRegistry  # noqa: PLC0415 - scheduler is heavy

        return PolicyRegistry(self.manager.policies())

    def job_handlers(self) -> dict[str, JobHandler]:
        """Every job handler plugins provide (policies' and ``register_job_handlers``')."""
        return self.manager.all_job_handlers()

    def attach(self, engine: Any) -> None:
        """Start feeding ``on_change`` observers from ``engine``'s change events."""
        if self.manager.has_observers() and self.observers is None:
            self.observers = ObserverDispatcher(self.manager)
            self.observers.start()
            engine.add_listener(self.observers.listener)

    def close(self) -> None:
        if self.observers is not None:
            self.observers.close()
