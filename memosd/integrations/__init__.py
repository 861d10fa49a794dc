"""Glue between memosd and model libraries.

* :mod:`memosd.integrations.hf` - generate with a memory KV cache in one
  call (Hugging Face transformers).
"""

from __future__ import annotations

__all__: list[str] = []
