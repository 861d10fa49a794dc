"""The built-in memory forms, registered through the same hook as a plugin's.

* ``plaintext`` - text memories; the payload, if any, is free-form.
* ``activation`` - a KV cache (:mod:`memosd.kv`): ``payload["blobs"]`` maps
  roles to chunk blobs, ``payload["manifest"]`` describes them; its text is
  a description, not memory, so search leaves it out.
* ``parameter`` - a LoRA adapter (:mod:`memosd.lora`): same payload shape
  (``blobs["adapter"]``), also kept out of search.

Sizes count the referenced blob bytes (the tensors are the cost); the
description text of model-side forms is not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from memosd.errors import BadRequest
from memosd.memcube.model import Form, MemoryItem
from memosd.plugins.forms import BaseForm, require_blob_refs
from memosd.plugins.hookspecs import FormContent, MemoryForm, hookimpl

__all__ = [
    "MEMOSD_PLUGIN_API_VERSIONS",
    "ActivationForm",
    "ParameterForm",
    "PlaintextForm",
    "register_memory_forms",
]

MEMOSD_PLUGIN_API_VERSIONS: Final = (1,)


class PlaintextForm(BaseForm):
    name = str(Form.PLAINTEXT)
    description = "Text memories (conversation turns, notes, consolidated facts)."


class _BlobBackedForm(BaseForm):
    """Items whose content is blobs described by a manifest; text is a description."""

    manifest_key: str = "manifest"

    def validate(self, text: str, payload: dict[str, Any] | None) -> FormContent:
        checked = require_blob_refs(self.name, payload)
        if not isinstance(checked.get(self.manifest_key), dict):
            raise BadRequest(
                f"form {self.name!r}: payload.{self.manifest_key} must be a map",
                reason="bad_payload",
            )
        return text, checked

    def index_text(self, item: MemoryItem) -> str | None:
        return None

    def size_bytes(self, item: MemoryItem, blob_size: Callable[[str], int]) -> int:
        return sum(blob_size(sha) for sha in sorted(set(self.export_blobs(item).values())))


class ActivationForm(_BlobBackedForm):
    name = str(Form.ACTIVATION)
    description = "KV caches of memory text for a configured model (safetensors chunk blobs)."


class ParameterForm(_BlobBackedForm):
    name = str(Form.PARAMETER)
    description = "LoRA adapters distilled from a cube's long-term memory (adapter blob)."


@hookimpl
def register_memory_forms() -> Iterable[MemoryForm]:
    return [PlaintextForm(), ActivationForm(), ParameterForm()]
