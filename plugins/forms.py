"""Memory forms: a base class for plugin authors and the registry the daemon uses.

:class:`BaseForm` implements every :class:`~memosd.plugins.hookspecs.MemoryForm`
method with the behaviour of plain text items (payload passed through,
search indexes ``item.text``, size = text bytes + referenced blob bytes,
``payload["blobs"]`` travels on export and is checked by SHA-256 on import);
a form overrides what differs.

:class:`FormRegistry` holds the forms registered through the
``register_memory_forms`` hook.  Each form is wrapped so that a plugin bug
(any exception but the form's own ``BadRequest`` verdict) surfaces as
:class:`~memosd.errors.PluginError` naming the plugin, never as a crash of
the request loop.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from memosd.errors import BadRequest, CodecError, Conflict, MemosError, PluginError, TooLarge
from memosd.memcube.model import FORM_NAME_RE, MemoryItem
from memosd.plugins.hookspecs import FormContent, MemoryForm

__all__ = ["BaseForm", "FormRegistry", "RegisteredForm", "blob_roles", "require_blob_refs"]

_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
#: Errors a form raises on purpose (its verdict on the input): passed through unchanged.
VERDICTS: Final = (BadRequest, TooLarge)


def blob_roles(payload: Mapping[str, Any] | None) -> dict[str, str]:
    """``payload["blobs"]`` as ``{role: sha}`` (a list becomes ``{"0": sha, ...}``)."""
    if not payload:
        return {}
    blobs = payload.get("blobs")
    if isinstance(blobs, dict):
        return {str(k): v for k, v in blobs.items() if isinstance(v, str)}
    if isinstance(blobs, list):
        return {str(i): v for i, v in enumerate(blobs) if isinstance(v, str)}
    return {}


def require_blob_refs(form: str, payload: dict[str, Any] | None) -> dict[str, Any]:
    """Check ``payload["blobs"]`` is a ``{role: sha256 hex}`` map; the payload.

    A helper for forms whose items are backed by blobs (KV caches, adapters).
    """
    if not isinstance(payload, dict):
        raise BadRequest(f"form {form!r}: a payload (a map) is required", reason="bad_payload")
    blobs = payload.get("blobs")
    if not isinstance(blobs, dict):
        raise BadRequest(
            f"form {form!r}: payload.blobs must be a map of role -> sha256 hex",
            reason="bad_payload",
        )
    for role, sha in blobs.items():
        if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
            raise BadRequest(
                f"form {form!r}: payload.blobs.{role} must be a sha256 hex digest, got {sha!r}",
                reason="bad_payload",
            )
    return payload


def plugin_logger() -> Any:
    # structlog (and the rich it pulls in) is imported only when something is logged:
    # memctl loads plugins and should stay quick to start.
    import structlog  # noqa: PLC0415

    return structlog.get_logger("memosd.plugins")


class BaseForm:
    """Defaults for a :class:`MemoryForm`; subclasses set ``name`` and override."""

    name: str = ""
    description: str = ""

    def validate(self, text: str, payload: dict[str, Any] | None) -> FormContent:
        return text, payload

    def index_text(self, item: MemoryItem) -> str | None:
        return item.text or None

    def size_bytes(self, item: MemoryItem, blob_size: Callable[[str], int]) -> int:
        size = len(item.text.encode())
        for sha in sorted(set(self.export_blobs(item).values())):
            size += blob_size(sha)
        return size

    def export_blobs(self, item: MemoryItem) -> Mapping[str, str]:
        return blob_roles(item.payload)

    def import_blobs(self, item: MemoryItem, blobs: Mapping[str, bytes]) -> None:
        for role, sha in self.export_blobs(item).items():
            data = blobs.get(role)
            if data is None:
                raise CodecError(
                    f"item {item.id}: blob {role!r} of form {self.name!r} is missing",
                    reason="missing_blob",
                )
            if hashlib.sha256(data).hexdigest() != sha:
                raise CodecError(
                    f"item {item.id}: blob {role!r} does not match its sha256", reason="bad_blob"
                )


class RegisteredForm:
    """A form as registered by one plugin; every call isolated (see the module doc)."""

    __slots__ = ("form", "plugin")

    def __init__(self, form: MemoryForm, plugin: str) -> None:
        self.form = form
        self.plugin = plugin

    @property
    def name(self) -> str:
        return str(self.form.name)

    @property
    def description(self) -> str:
        return str(getattr(self.form, "description", "") or "")

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.form, method)(*args)
        except VERDICTS:
            raise
        except Exception as exc:
            plugin_logger().exception(
                "plugin form failed", plugin=self.plugin, form=self.name, method=method
            )
            raise PluginError(
                f"plugin {self.plugin!r}: form {self.name!r} failed in {method}: "
                f"{type(exc).__name__}: {exc}",
                plugin=self.plugin,
                hook=f"form.{method}",
            ) from exc

    def validate(self, text: str, payload: dict[str, Any] | None) -> FormContent:
        result = self._call("validate", text, payload)
        if (
            not isinstance(result, tuple)
            or len(result) != 2
            or not isinstance(result[0], str)
            or not (result[1] is None or isinstance(result[1], dict))
        ):
            raise PluginError(
                f"plugin {self.plugin!r}: form {self.name!r}.validate must return "
                f"(text, payload or None), got {type(result).__name__}",
                plugin=self.plugin,
                hook="form.validate",
            )
        return result[0], result[1]

    def index_text(self, item: MemoryItem) -> str | None:
        value = self._call("index_text", item)
        return value if isinstance(value, str) and value else None

    def size_bytes(self, item: MemoryItem, blob_size: Callable[[str], int]) -> int:
        return int(self._call("size_bytes", item, blob_size))

    def export_blobs(self, item: MemoryItem) -> Mapping[str, str]:
        return dict(self._call("export_blobs", item))

    def import_blobs(self, item: MemoryItem, blobs: Mapping[str, bytes]) -> None:
        self._call("import_blobs", item, blobs)  # CodecError is a BadRequest: a verdict


class FormRegistry:
    """The registered memory forms by name."""

    def __init__(self) -> None:
        self._forms: dict[str, RegisteredForm] = {}

    def register(self, form: object, plugin: str) -> RegisteredForm:
        """Add ``form`` (registered by ``plugin``); BadRequest/Conflict if it cannot be."""
        if not isinstance(form, MemoryForm):
            raise BadRequest(f"{form!r} does not implement the MemoryForm protocol")
        name = form.name
        if not isinstance(name, str) or not FORM_NAME_RE.fullmatch(name):
            raise BadRequest(f"form name must match {FORM_NAME_RE.pattern}, got {name!r}")
        existing = self._forms.get(name)
        if existing is not None:
            raise Conflict(
                f"form {name!r} is already registered by plugin {existing.plugin!r}",
                reason="duplicate_form",
            )
        entry = RegisteredForm(form, plugin)
        self._forms[name] = entry
        return entry

    def get(self, name: str) -> RegisteredForm:
        """The form called ``name``; BadRequest (reason ``unknown_form``) if none is."""
        try:
            return self._forms[name]
        except KeyError:
            raise BadRequest(
                f"unknown memory form {name!r} (registered: {', '.join(sorted(self._forms))})",
                reason="unknown_form",
                form=name,
            ) from None

    def validate(self, name: str, text: str, payload: dict[str, Any] | None) -> FormContent:
        """``get(name).validate(text, payload)``."""
        return self.get(name).validate(text, payload)

    def index_text(self, item: MemoryItem) -> str | None:
        """What search should index for ``item``; its text if its form is unknown here."""
        entry = self._forms.get(item.form)
        if entry is None:
            return item.text or None
        try:
            return entry.index_text(item)
        except MemosError:
            return None

    def names(self) -> list[str]:
        return sorted(self._forms)

    def by_plugin(self, plugin: str) -> list[str]:
        return sorted(n for n, f in self._forms.items() if f.plugin == plugin)

    def remove_plugin(self, plugin: str) -> None:
        for name in self.by_plugin(plugin):
            del self._forms[name]

    def __contains__(self, name: object) -> bool:
        return name in self._forms

    def __iter__(self) -> Iterator[RegisteredForm]:
        return iter(list(self._forms.values()))

    def __len__(self) -> int:
        return len(self._forms)
