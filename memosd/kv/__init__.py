"""Activation memory: KV caches of memory text, stored safely and injected fast.

The model does not have to re-read memory it has already read: the keys and
values of a memory prefix are computed once, stored as content-addressed
safetensors chunks bound to the model's fingerprint, and injected as
``past_key_values`` so generation starts after the prefix.

Layers (each module's docstring documents its part):

* :mod:`memosd.kv.template` - memory items → prefix text and token ids.
* :mod:`memosd.kv.chunks` - chained chunk keys and reuse planning (pure).
* :mod:`memosd.kv.codec` - chunk blobs (safetensors) and the manifest.
* :mod:`memosd.kv.cache` - :class:`LoadedCache`, copy-on-read.
* :mod:`memosd.kv.frames` - caches as ZeroMQ frames, zero-copy.
* :mod:`memosd.kv.budget` - byte budget eviction policies (pure).
* :mod:`memosd.kv.build` - :class:`KvStore`: build, load, staleness, budget.

See docs/activation-memory.md for the whole picture and the numbers.
"""

from __future__ import annotations

from memosd.kv.budget import EvictionPolicy, HeatAwarePolicy, KvEntry, LRUPolicy
from memosd.kv.build import ACTIVATION_FORM, KvInfo, KvStore, StalenessReport
from memosd.kv.cache import LoadedCache
from memosd.kv.chunks import CHUNK_TOKENS
from memosd.kv.codec import KvManifest
from memosd.kv.frames import cache_to_frames, frames_to_cache
from memosd.kv.template import DEFAULT_TEMPLATE, Prefix, PrefixTemplate

__all__ = [
    "ACTIVATION_FORM",
    "CHUNK_TOKENS",
    "DEFAULT_TEMPLATE",
    "EvictionPolicy",
    "HeatAwarePolicy",
    "KvEntry",
    "KvInfo",
    "KvManifest",
    "KvStore",
    "LRUPolicy",
    "LoadedCache",
    "Prefix",
    "PrefixTemplate",
    "StalenessReport",
    "cache_to_frames",
    "frames_to_cache",
]
