"""Parameter memory: a cube's stable long-term memories distilled into a LoRA adapter.

A cube's memory items (their current versions) are turned into training
samples with a fixed template (:mod:`memosd.lora.dataset`), a LoRA adapter is
trained on the shared model backend's model in a spawned worker process
(:mod:`memosd.lora.train`), evaluated against the base model on those
memories and on a control text shipped with the package, and only promoted if
it passes the gate (:mod:`memosd.lora.evaluate`).  The weights are a
content-addressed safetensors blob (:mod:`memosd.lora.adapter`) referenced by
a versioned ``parameter`` memory item with a manifest
(:mod:`memosd.lora.store`): rollback is an item rollback, and purging an item
an adapter was trained on makes that adapter stale until it is retrained
without it and its blob is erased.

The modules import torch; peft and transformers are imported on first use.
See docs/parameter-memory.md.
"""

from __future__ import annotations

from memosd.lora.adapter import (
    ADAPTER_FORMAT,
    AdapterBlob,
    attach_adapter,
    combine_adapters,
    decode_adapter,
    encode_adapter,
    load_adapter_bytes,
)
from memosd.lora.dataset import TEMPLATE, TEMPLATE_ID, build_training_set, format_memory
from memosd.lora.evaluate import EvaluationReport, control_text, judge, perplexity
from memosd.lora.settings import DEFAULT_TARGET_MODULES, LoraSettings
from memosd.lora.store import MANIFEST_FORMAT, AdapterVersion, LoraResult, LoraStore
from memosd.lora.train import CancelToken, TrainingOutput, TrainingProgress, run_training

__all__ = [
    "ADAPTER_FORMAT",
    "DEFAULT_TARGET_MODULES",
    "MANIFEST_FORMAT",
    "TEMPLATE",
    "TEMPLATE_ID",
    "AdapterBlob",
    "AdapterVersion",
    "CancelToken",
    "EvaluationReport",
    "LoraResult",
    "LoraSettings",
    "LoraStore",
    "TrainingOutput",
    "TrainingProgress",
    "attach_adapter",
    "build_training_set",
    "combine_adapters",
    "control_text",
    "decode_adapter",
    "encode_adapter",
    "format_memory",
    "judge",
    "load_adapter_bytes",
    "perplexity",
    "run_training",
]
