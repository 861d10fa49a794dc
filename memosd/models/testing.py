"""Deterministic Llama-style models built from a config, for tests and benches.

No download: the weights come from a seeded random initialisation and the
tokenizer is a byte-level one built with the ``tokenizers`` library (256 byte
tokens plus ``<s>``, ``</s>``, ``<pad>``), wrapped in
``PreTrainedTokenizerFast`` and saved with ``save_pretrained`` so that
``AutoTokenizer.from_pretrained(directory)`` and
:meth:`memosd.models.backend.HFBackend.load` read it back.

* :func:`build_tiny_llama` - a few hundred thousand parameters: unit tests.
* :func:`build_model_100m` - about 104M parameters (hidden 768, 12 layers,
  GQA 12/4 heads, MLP 3072): CPU benchmarks.

The same arguments give the same files (same fingerprint) on one machine and
library version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from memosd.errors import BadRequest

__all__ = ["SPECIAL_TOKENS", "build_byte_tokenizer", "build_model_100m", "build_tiny_llama"]

#: Special tokens of the byte tokenizer, in id order after the 256 bytes.
SPECIAL_TOKENS: Final = ("<s>", "</s>", "<pad>")


def build_byte_tokenizer() -> Any:
    """A byte-level fast tokenizer: ids 0-255 are bytes, then :data:`SPECIAL_TOKENS`."""
    # Order the vocabulary by byte value so that id == byte: easy to reason about.
    byte_to_char = _bytes_to_unicode()
    if set(byte_to_char.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("tokenizers' ByteLevel alphabet is not GPT-2's byte map")
    vocab = {byte_to_char[b]: b for b in range(256)}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast_tokenizer_class: Any = PreTrainedTokenizerFast  # untyped constructor
    return fast_tokenizer_class(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _build(
    directory: str | Path,
    *,
    seed: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_positions: int,
    vocab: str,
) -> Path:
    if vocab != "byte":
        raise BadRequest(f"only vocab='byte' is supported, got {vocab!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise BadRequest("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def build_tiny_llama(
    directory: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab: str = "byte",
) -> Path:
    """Build and save a tiny seeded ``LlamaForCausalLM`` + byte tokenizer; return the directory."""
    return _build(
        directory,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=hidden_size * 2,
        max_positions=4096,
        vocab=vocab,
    )


def build_model_100m(directory: str | Path, *, seed: int = 0) -> Path:
    """Build and save a ~104M-parameter Llama-style model (float32, byte tokenizer)."""
    return _build(
        directory,
        seed=seed,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=3072,
        max_positions=8192,
        vocab="byte",
    )
