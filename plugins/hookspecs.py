"""The memosd plugin API: every hook a plugin may implement, in one module.

A plugin is any object (usually a module) with functions decorated by
:data:`hookimpl` whose names are hook names below, plus the attribute
``MEMOSD_PLUGIN_API_VERSIONS`` (the API versions it supports, e.g. ``(1,)``).
Built-in memory forms and tier policies register through these same hooks
(see :data:`memosd.plugins.manager.DEFAULT_PLUGINS`).

Rules shared by every hook:

* Hooks are called with keyword arguments; an implementation may accept
  fewer arguments than the specification names (pluggy), so adding an
  argument to a hook is not a breaking change.  Renaming or removing one is,
  and bumps :data:`MEMOSD_PLUGIN_API`.
* ``register_*`` hooks run once, when the daemon (or memctl) loads plugins.
  Names must be unique across plugins; a duplicate fails the later plugin.
* An implementation that raises is logged with its plugin's name; the
  request or job it was serving fails with :class:`~memosd.errors.PluginError`
  and the daemon keeps serving.  A form's :meth:`MemoryForm.validate` may
  raise :class:`~memosd.errors.BadRequest` to reject a payload: that is its
  verdict, passed to the client unchanged.

docs/plugins.md documents every hook (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:
    import typer

    from memosd.embed import Embedder
    from memosd.engine import ChangeEvent
    from memosd.memcube.model import MemoryItem
    from memosd.models.backend import ModelBackend
    from memosd.scheduler.consolidate import Consolidator
    from memosd.scheduler.policy import TierPolicy
    from memosd.scheduler.runner import JobHandler

__all__ = [
    "MEMOSD_PLUGIN_API",
    "PROJECT_NAME",
    "SUPPORTED_API_ATTRIBUTE",
    "FormContent",
    "MemoryForm",
    "hookimpl",
    "hookspec",
    "on_change",
    "register_commands",
    "register_consolidators",
    "register_embedders",
    "register_job_handlers",
    "register_memory_forms",
    "register_model_backends",
    "register_tier_policies",
]

#: The plugin API version this memosd implements.  A plugin lists the versions
#: it supports in ``MEMOSD_PLUGIN_API_VERSIONS``; without this one in it, the
#: plugin is reported as failed and not loaded.
MEMOSD_PLUGIN_API: Final = 1
#: The attribute a plugin object sets to the API versions it supports.
SUPPORTED_API_ATTRIBUTE: Final = "MEMOSD_PLUGIN_API_VERSIONS"
PROJECT_NAME: Final = "memosd"

hookspec: Final = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl: Final = pluggy.HookimplMarker(PROJECT_NAME)

#: What :meth:`MemoryForm.validate` returns: the text and payload to store.
FormContent = tuple[str, dict[str, Any] | None]


@runtime_checkable
class MemoryForm(Protocol):
    """A kind of memory item (``MemoryItem.form``): plaintext, activation, a plugin's.

    Implementations are usually subclasses of
    :class:`memosd.plugins.forms.BaseForm`, which provides every method but
    :attr:`name` with sensible defaults.  Methods must be pure and quick
    (no I/O but the callables they are given): they run on request threads.
    """

    @property
    def name(self) -> str:
        """The form's name, ``[a-z][a-z0-9_.-]{0,63}``; unique across plugins."""
        ...

    @property
    def description(self) -> str:
        """One line for ``memctl plugins`` and the docs."""
        ...

    def validate(self, text: str, payload: dict[str, Any] | None) -> FormContent:
        """Check (and normalise) what a client wants to store; BadRequest if invalid.

        Called on ``add`` and on an ``update`` that changes text or payload,
        with the values after the update.  Returns the text and payload to
        store (a form may derive its text from the payload).
        """
        ...

    def index_text(self, item: MemoryItem) -> str | None:
        """The text search indexes for ``item``; ``None`` keeps it out of search."""
        ...

    def size_bytes(self, item: MemoryItem, blob_size: Callable[[str], int]) -> int:
        """Bytes ``item`` accounts for (tier budgets); ``blob_size(sha)`` sizes a blob."""
        ...

    def export_blobs(self, item: MemoryItem) -> Mapping[str, str]:
        """``{role: sha256 hex}`` of the blobs that must travel with ``item`` on export."""
        ...

    def import_blobs(self, item: MemoryItem, blobs: Mapping[str, bytes]) -> None:
        """Check the blobs (by role) arriving with ``item`` on import; CodecError if wrong."""
        ...


# --- the hooks -------------------------------------------------------------------------


@hookspec
def register_memory_forms() -> Iterable[MemoryForm]:  # type: ignore[empty-body]
    """Memory forms this plugin provides (:class:`MemoryForm` objects).

    The daemon validates every ``add``/``update`` through the item's form; an
    item of a form no plugin registers is refused with ``bad_request``.
    """


@hookspec
def register_tier_policies() -> Iterable[TierPolicy]:  # type: ignore[empty-body]
    """Tier policies (:class:`memosd.scheduler.policy.TierPolicy` objects).

    A policy decides, from change events and the clock, which durable jobs to
    run; its :meth:`~memosd.scheduler.policy.TierPolicy.handlers` execute them.
    Cubes enable policies by name in ``CubeConfig.tier_policy["policies"]``.
    """


@hookspec
def register_consolidators() -> Mapping[str, Callable[..., Consolidator]]:  # type: ignore[empty-body]
    """Consolidator factories by name (segment turns -> long-term facts).

    ``factory(embedder=..., **settings)`` returns a
    :class:`memosd.scheduler.consolidate.Consolidator`; a tier policy picks one
    by name from its settings.
    """


@hookspec
def register_embedders() -> Mapping[str, Callable[..., Embedder]]:  # type: ignore[empty-body]
    """Text embedder factories by name (:class:`memosd.embed.Embedder`).

    ``factory(**options)`` builds the embedder; the name is what a cube's
    ``CubeConfig.embedding_model`` refers to.
    """


@hookspec
def register_model_backends() -> Mapping[str, Callable[..., ModelBackend]]:  # type: ignore[empty-body]
    """Model backend factories by name (:class:`memosd.models.backend.ModelBackend`).

    Backends run the base model that KV caches and LoRA adapters belong to.
    """


@hookspec
def register_job_handlers() -> Mapping[str, JobHandler]:  # type: ignore[empty-body]
    """Durable job handlers by job kind, for jobs not owned by a tier policy.

    Kinds are namespaced by the plugin (``"facts.reindex"``); a kind handled
    twice fails the later plugin.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add ``memctl`` sub-commands: ``app`` is memctl's root Typer app.

    Add a group with ``app.add_typer(sub_app, name="facts")`` or a command
    with ``@app.command()``.  Commands talk to the daemon through
    :class:`memosd.client.Client`; memctl loads these only when the daemon's
    settings (allow-list) permit the plugin.
    """


@hookspec
def on_change(event: ChangeEvent) -> None:
    """Observe every acknowledged change (:class:`memosd.engine.ChangeEvent`).

    Called after the write is durable, from a dedicated observer thread, in
    LSN order.  Must not block for long; an observer that raises is logged
    and the other observers still run.  Observers cannot veto a write.
    """
