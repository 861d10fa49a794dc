"""Hugging Face transformers: generate (or score) with activation memory in one call.

::

    from memosd.integrations.hf import generate_with_memory

    loaded = kv_store.load(cube, kv_id, backend)      # or the client's kv_get
    text = generate_with_memory(backend, None, loaded, "Question: ...", max_new_tokens=64)

The prompt is tokenised on its own (no special tokens) and appended to the
cache's token ids; ``generate`` receives all ids plus a *fresh copy* of the
cache (copy-on-read), so it only computes the prompt and the new tokens and
the loaded cache can be reused for the next call.  With a backend the model
fingerprint is checked first (:class:`memosd.errors.Conflict` on mismatch);
with a bare model pass ``fingerprint=`` to get the same check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from memosd.errors import BadRequest
from memosd.kv.cache import LoadedCache, check_fingerprint
from memosd.models.backend import ModelBackend, cache_keyword

__all__ = ["generate_with_memory", "logits_with_memory"]


def _resolve(
    backend_or_model: ModelBackend | Any, tokenizer: Any, fingerprint: str | None
) -> tuple[Any, Any, str | None]:
    if isinstance(backend_or_model, ModelBackend):
        return (
            backend_or_model.model,
            tokenizer if tokenizer is not None else backend_or_model.tokenizer,
            backend_or_model.fingerprint,
        )
    return backend_or_model, tokenizer, fingerprint


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def generate_with_memory(
    backend_or_model: ModelBackend | Any,
    tokenizer: Any,
    loaded_cache: LoadedCache,
    prompt: str | Sequence[int],
    *,
    fingerprint: str | None = None,
    return_ids: bool = False,
    **gen_kwargs: Any,
) -> Any:
    """Generate a continuation of (memory prefix + ``prompt``); returns the new text.

    ``prompt`` is text or token ids; ``gen_kwargs`` go to ``model.generate``
    (``max_new_tokens``, ``do_sample``...).  ``return_ids=True`` returns the
    new token ids instead of decoded text.
    """
    model, tok, expected = _resolve(backend_or_model, tokenizer, fingerprint)
    if expected is not None:
        check_fingerprint(loaded_cache.fingerprint, expected)
    if isinstance(prompt, str):
        if tok is None:
            raise BadRequest("a tokenizer is needed for a text prompt")
        prompt_ids = [int(i) for i in tok(prompt, add_special_tokens=False)["input_ids"]]
    else:
        prompt_ids = [int(i) for i in prompt]
    if not prompt_ids:
        raise BadRequest("the prompt must have at least one token")
    device = _model_device(model)
    input_ids = loaded_cache.input_ids(prompt_ids).to(device)
    gen_kwargs.setdefault("max_new_tokens", 32)
    if tok is not None and getattr(tok, "pad_token_id", None) is not None:
        gen_kwargs.setdefault("pad_token_id", tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **{cache_keyword(model): loaded_cache.new_cache(device)},
            **gen_kwargs,
        )
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new_ids = [int(i) for i in sequences[0, input_ids.shape[1] :].tolist()]
    if return_ids or tok is None:
        return new_ids
    return tok.decode(new_ids, skip_special_tokens=True)


def logits_with_memory(
    backend_or_model: ModelBackend | Any,
    loaded_cache: LoadedCache,
    continuation: Sequence[int],
    *,
    fingerprint: str | None = None,
) -> torch.Tensor:
    """Logits ``[len(continuation), vocab]`` of ``continuation`` after the memory prefix."""
    model, _, expected = _resolve(backend_or_model, None, fingerprint)
    if expected is not None:
        check_fingerprint(loaded_cache.fingerprint, expected)
    device = _model_device(model)
    ids = torch.tensor([list(continuation)], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(
            input_ids=ids, **{cache_keyword(model): loaded_cache.new_cache(device)}, use_cache=True
        )
    logits: torch.Tensor = out.logits[0]
    return logits
