"""Model backends: load a local causal LM and identify it by a fingerprint.

Activation memory (KV caches, :mod:`memosd.kv`) and parameter memory (LoRA
adapters, :mod:`memosd.lora`) are only meaningful for the exact model they
were computed with.  This package loads such a model from a local directory
(never from the network) and computes its *fingerprint*, the identity every
derived artefact carries and is checked against before use.

* :mod:`memosd.models.backend` - the :class:`ModelBackend` protocol and the
  Hugging Face implementation :class:`HFBackend`.
* :mod:`memosd.models.fingerprint` - how a fingerprint is computed.
* :mod:`memosd.models.testing` - tiny deterministic Llama models built from a
  config (no download), for tests and benchmarks.
"""

from __future__ import annotations

from memosd.models.backend import HFBackend, ModelBackend
from memosd.models.fingerprint import model_fingerprint

__all__ = ["HFBackend", "ModelBackend", "model_fingerprint"]
