"""The built-in tier policies and consolidators, registered like a plugin's.

The scheduler modules (numpy, the embedder) are imported inside the hooks,
so loading this plugin (memctl does) costs nothing until the daemon asks
for policies.  The plaintext policy writes items of its own internal form
``tier-segment`` (topic segments; empty text, kept out of search), which it
registers here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from memosd.memcube.model import MemoryItem
from memosd.plugins.forms import BaseForm
from memosd.plugins.hookspecs import MemoryForm, hookimpl

if TYPE_CHECKING:
    from memosd.scheduler.consolidate import Consolidator
    from memosd.scheduler.policy import TierPolicy

__all__ = [
    "MEMOSD_PLUGIN_API_VERSIONS",
    "SegmentForm",
    "register_consolidators",
    "register_memory_forms",
    "register_tier_policies",
]

MEMOSD_PLUGIN_API_VERSIONS: Final = (1,)
#: Must equal memosd.scheduler.policies_builtin.SEGMENT_FORM (checked by a test).
SEGMENT_FORM: Final = "tier-segment"


class SegmentForm(BaseForm):
    name = SEGMENT_FORM
    description = "Topic segments of the plaintext tier policy (internal; not searchable)."

    def index_text(self, item: MemoryItem) -> str | None:
        return None


@hookimpl
def register_memory_forms() -> Iterable[MemoryForm]:
    return [SegmentForm()]


@hookimpl
def register_tier_policies() -> Iterable[TierPolicy]:
    from memosd.scheduler.policies_builtin import builtin_policies  # noqa: PLC0415 - heavy

    return list(builtin_policies())


def _extractive(embedder: Any, **settings: Any) -> Consolidator:
    from memosd.scheduler.consolidate import ExtractiveConsolidator  # noqa: PLC0415

    return ExtractiveConsolidator(embedder, **settings)


def _openai(embedder: Any = None, **settings: Any) -> Consolidator:
    from memosd.scheduler.consolidate import OpenAICompatibleConsolidator  # noqa: PLC0415

    consolidator: Consolidator = OpenAICompatibleConsolidator(**settings)
    return consolidator


@hookimpl
def register_consolidators() -> Mapping[str, Callable[..., Consolidator]]:
    return {"extractive": _extractive, "openai": _openai}
