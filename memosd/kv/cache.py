"""A loaded KV cache, copy-on-read, and conversions to and from transformers caches.

:class:`LoadedCache` holds the per-layer keys and values of a cached prefix
(``[1, kv_heads, T, head_dim]`` each) and the token ids they cover.  Its
tensors are never handed to a model: :attr:`LoadedCache.cache` builds a **new**
``transformers.DynamicCache`` holding copies on every access.  Generation
appends to (and may reorder) the ``DynamicCache`` it is given; with
copy-on-read that never reaches the stored tensors, so one loaded cache
serves any number of generations, concurrently too.  (MemOS hands out the
same cache object, and its users saw the second answer continue the first.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from memosd.errors import BadRequest, Conflict
from memosd.models.fingerprint import short_fingerprint

__all__ = ["LoadedCache", "check_fingerprint", "dynamic_cache_from", "layers_of"]

LayerKV = tuple[torch.Tensor, torch.Tensor]


def layers_of(cache: Any) -> list[LayerKV]:
    """The ``(keys, values)`` per layer of a transformers cache (``[B, H, T, D]``)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise BadRequest(f"unsupported cache type {type(cache).__name__}")
    out: list[LayerKV] = []
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise BadRequest("sliding-window cache layers are not supported")
        if layer.keys is None or layer.values is None:
            raise BadRequest("cache layer is empty")
        out.append((layer.keys, layer.values))
    return out


def check_fingerprint(expected: str, actual: str, *, what: str = "KV cache") -> None:
    """Refuse a cache built for another model: :class:`Conflict` ``fingerprint_mismatch``."""
    if expected != actual:
        raise Conflict(
            f"{what} was built for model {short_fingerprint(expected)}, "
            f"this is {short_fingerprint(actual)}",
            reason="fingerprint_mismatch",
            expected=expected,
            actual=actual,
        )


@dataclass(frozen=True, slots=True, eq=False)
class LoadedCache:
    """The KV cache of a memory prefix, ready to inject (see the module docstring).

    ``layers[l] = (k, v)``, each ``[1, kv_heads, num_tokens, head_dim]``; treat
    them as read-only (they may be backed by a read-only receive buffer).
    """

    layers: tuple[LayerKV, ...]
    token_ids: tuple[int, ...]
    fingerprint: str
    dtype: str
    item_id: str | None = None
    version: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(
            k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers
        )

    @property
    def cache(self) -> Any:
        """A fresh ``DynamicCache`` holding a copy of the tensors (copy-on-read)."""
        return self.new_cache()

    def new_cache(self, device: str | torch.device | None = None) -> Any:
        """A fresh ``DynamicCache`` with copies of the tensors, optionally on ``device``."""
        data = [
            (k.to(device, copy=True), v.to(device, copy=True))
            if device is not None
            else (k.clone(), v.clone())
            for k, v in self.layers
        ]
        return dynamic_cache_from(data)

    def input_ids(self, continuation: Sequence[int]) -> torch.Tensor:
        """``[1, num_tokens + len(continuation)]`` ids: what ``generate`` expects with the cache."""
        return torch.tensor([[*self.token_ids, *continuation]], dtype=torch.long)

    def check_model(self, fingerprint: str) -> None:
        """Raise :class:`Conflict` unless this cache was built for ``fingerprint``."""
        check_fingerprint(self.fingerprint, fingerprint)


def dynamic_cache_from(data: Sequence[LayerKV]) -> Any:
    """A ``DynamicCache`` that takes ownership of ``data`` (``[B, H, T, D]`` per layer)."""
    # Install the copies directly instead of DynamicCache(ddp_cache_data=...),
    # whose update() would concatenate (copy) them once more.
    cache: Any = DynamicCache()
    for index, (k, v) in enumerate(data):
        cache.update(k[:, :, :0], v[:, :, :0], index)
        layer = cache.layers[index]
        layer.keys, layer.values = k, v
    return cache
