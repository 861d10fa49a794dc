"""The adapter blob: LoRA weights as one self-describing safetensors file.

Layout (``ADAPTER_FORMAT`` = ``memosd-lora-adapter/1``): a plain safetensors
file whose tensors are peft's adapter state dict *without* the adapter name
(``base_model.model.<module path>.lora_A.weight``... as
``get_peft_model_state_dict`` returns it), and whose string metadata holds:

* ``format`` - ``memosd-lora-adapter/1``;
* ``base_fingerprint`` - the :mod:`memosd.models.fingerprint` of the model it
  was trained on (it refuses to load into any other model);
* ``lora_config`` - JSON ``{"r", "lora_alpha", "lora_dropout",
  "target_modules"}``.

No pickle: safetensors holds only raw tensors plus this header, so a blob can
be inspected with any safetensors reader and loaded without running code.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from memosd.errors import BadRequest, Conflict, CorruptionError
from memosd.lora.settings import LoraSettings

if TYPE_CHECKING:
    # Imported where used: the daemon imports this module at start, and importing
    # torch costs ~230 MB of RSS that a daemon without LoRA work never needs.
    import torch

__all__ = [
    "ADAPTER_FORMAT",
    "AdapterBlob",
    "attach_adapter",
    "check_fingerprint",
    "combine_adapters",
    "decode_adapter",
    "encode_adapter",
    "load_adapter_bytes",
    "lora_config",
    "wrap_model",
]

ADAPTER_FORMAT: Final = "memosd-lora-adapter/1"


@dataclass(frozen=True, slots=True)
class AdapterBlob:
    """A decoded adapter blob."""

    tensors: dict[str, torch.Tensor]
    base_fingerprint: str
    config: dict[str, Any]

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def lora_config(config: LoraSettings | Mapping[str, Any]) -> Any:
    """A peft ``LoraConfig`` from settings or from a blob's ``lora_config``."""
    from peft import LoraConfig  # noqa: PLC0415  (peft imports transformers: seconds)

    if isinstance(config, LoraSettings):
        values: Mapping[str, Any] = _config_dict(config)
    else:
        values = config
    return LoraConfig(
        r=int(values["r"]),
        lora_alpha=int(values["lora_alpha"]),
        lora_dropout=float(values["lora_dropout"]),
        target_modules=list(values["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _config_dict(settings: LoraSettings) -> dict[str, Any]:
    return {
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.target_modules),
    }


def encode_adapter(
    peft_model: Any, *, base_fingerprint: str, settings: LoraSettings, adapter_name: str = "default"
) -> bytes:
    """The adapter ``adapter_name`` of ``peft_model`` as blob bytes (see module docstring)."""
    from peft import get_peft_model_state_dict  # noqa: PLC0415

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    metadata = {
        "format": ADAPTER_FORMAT,
        "base_fingerprint": base_fingerprint,
        "lora_config": json.dumps(_config_dict(settings), sort_keys=True),
    }
    from safetensors.torch import save as save_safetensors  # noqa: PLC0415 - see the module's torch import

    data: bytes = save_safetensors(tensors, metadata=metadata)
    return data


def decode_adapter(data: bytes) -> AdapterBlob:
    """Parse blob bytes; :class:`CorruptionError` if they are not an adapter blob."""
    from safetensors import SafetensorError  # noqa: PLC0415 - see the module's torch import
    from safetensors.torch import load as load_safetensors  # noqa: PLC0415 - see the module's torch import

    try:
        tensors: dict[str, torch.Tensor] = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        if metadata.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"format is {metadata.get('format')!r}, not {ADAPTER_FORMAT!r}")
        config = json.loads(metadata["lora_config"])
        fingerprint = str(metadata["base_fingerprint"])
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CorruptionError(
            f"not a memosd LoRA adapter blob: {exc}", reason="bad_adapter"
        ) from exc
    return AdapterBlob(tensors, fingerprint, config)


def check_fingerprint(blob_fingerprint: str, model_fingerprint: str) -> None:
    """:class:`Conflict` (reason ``fingerprint_mismatch``) unless the two are equal."""
    if blob_fingerprint != model_fingerprint:
        raise Conflict(
            f"adapter was trained on base model {blob_fingerprint[:12]}, "
            f"not on this model ({model_fingerprint[:12]}); retrain it for this model",
            reason="fingerprint_mismatch",
            adapter_fingerprint=blob_fingerprint,
            model_fingerprint=model_fingerprint,
        )


def attach_adapter(
    model: Any, blob: AdapterBlob, *, model_fingerprint: str, adapter_name: str = "default"
) -> Any:
    """Load ``blob`` into ``model`` as ``adapter_name`` and return the peft model.

    ``model`` is either a plain transformers model (it is wrapped *in place*:
    peft injects LoRA layers into its modules) or a ``PeftModel`` that gets
    one more adapter.  The fingerprint is checked first.
    """
    from peft import PeftModel, set_peft_model_state_dict  # noqa: PLC0415

    check_fingerprint(blob.base_fingerprint, model_fingerprint)
    config = lora_config(blob.config)
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise BadRequest(f"the model already has an adapter named {adapter_name!r}")
        model.add_adapter(adapter_name, config)
        peft_model: Any = model
    else:
        peft_model = wrap_model(model, config, adapter_name=adapter_name)
    result: Any = set_peft_model_state_dict(peft_model, blob.tensors, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        raise CorruptionError(
            "adapter tensors do not match the model's LoRA layers "
            f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})",
            reason="bad_adapter",
        )
    peft_model.set_adapter(adapter_name)
    peft_model.eval()
    return peft_model


def wrap_model(model: Any, config: Any, *, adapter_name: str = "default") -> Any:
    """``peft.get_peft_model`` (wraps ``model`` in place) without its known deprecation noise."""
    from peft import get_peft_model  # noqa: PLC0415

    with warnings.catch_warnings():
        # peft probes transformers' deprecated ``is_gradient_checkpointing``.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        return get_peft_model(model, config, adapter_name=adapter_name)


def load_adapter_bytes(
    data: bytes, model: Any, *, model_fingerprint: str, adapter_name: str = "default"
) -> Any:
    """Client-side helper: blob bytes (as the daemon returns them) → peft model.

    ``model`` is deep-copied first, so a shared base model stays untouched.
    """
    return attach_adapter(
        copy.deepcopy(model),
        decode_adapter(data),
        model_fingerprint=model_fingerprint,
        adapter_name=adapter_name,
    )


def combine_adapters(
    blobs: Sequence[AdapterBlob],
    weights: Sequence[float],
    model: Any,
    *,
    model_fingerprint: str,
    combination_type: str = "cat",
    adapter_name: str = "combined",
) -> Any:
    """One peft model (over a deep copy of ``model``) serving a weighted mix of adapters.

    ``combination_type="cat"`` (default) is exact: the combined update is
    ``sum(w_i * B_i A_i)`` at rank ``sum(r_i)``; peft's other types
    (``"linear"``, ``"svd"``...) are passed through to ``add_weighted_adapter``.
    Every blob's fingerprint is checked against ``model_fingerprint``.
    """
    if not blobs or len(blobs) != len(weights):
        raise BadRequest("combine needs one weight per adapter and at least one adapter")
    for blob in blobs:
        check_fingerprint(blob.base_fingerprint, model_fingerprint)
    peft_model: Any = copy.deepcopy(model)
    names = [f"a{index}" for index in range(len(blobs))]
    for name, blob in zip(names, blobs, strict=True):
        peft_model = attach_adapter(
            peft_model, blob, model_fingerprint=model_fingerprint, adapter_name=name
        )
    peft_model.add_weighted_adapter(
        names,
        [float(w) for w in weights],
        adapter_name=adapter_name,
        combination_type=combination_type,
    )
    peft_model.set_adapter(adapter_name)
    peft_model.eval()
    return peft_model
