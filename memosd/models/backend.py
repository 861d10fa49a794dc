"""The model backend interface and its Hugging Face implementation.

:class:`ModelBackend` is what activation memory (:mod:`memosd.kv`) and
parameter memory (:mod:`memosd.lora`) need from a model: the torch module, the
tokenizer, where it came from, how it runs (dtype, device) and its
fingerprint (:mod:`memosd.models.fingerprint`).

:class:`HFBackend` loads any causal LM from a **local** directory with
``AutoModelForCausalLM`` and ``AutoTokenizer`` (``local_files_only=True``: the
daemon never downloads), on CPU unless a CUDA device is asked for and
available, in eval mode.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from memosd.errors import BadRequest, NotFound
from memosd.models.fingerprint import model_fingerprint, short_fingerprint

if TYPE_CHECKING:
    # Imported where a model is used: the daemon imports this module at start,
    # and importing torch costs ~230 MB of RSS (a daemon without models never needs it).
    import torch

__all__ = [
    "DTYPES",
    "HFBackend",
    "ModelBackend",
    "cache_keyword",
    "output_cache",
    "resolve_device",
    "resolve_dtype",
    "torch_dtype_of",
]

#: dtype names accepted by :meth:`HFBackend.load` ("auto": the config's dtype);
#: each is the name of a ``torch`` dtype.
DTYPES: Final = ("float32", "float16", "bfloat16")


@runtime_checkable
class ModelBackend(Protocol):
    """A loaded causal LM, its tokenizer and its identity."""

    @property
    def model(self) -> Any:
        """The ``torch.nn.Module`` (a transformers ``PreTrainedModel`` for :class:`HFBackend`)."""

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (a transformers ``PreTrainedTokenizerBase`` for :class:`HFBackend`)."""

    @property
    def path(self) -> Path:
        """The model directory."""

    @property
    def dtype(self) -> str:
        """The dtype the model runs in, by name (``"float32"``...)."""

    @property
    def device(self) -> str:
        """The torch device the model lives on (``"cpu"``, ``"cuda:0"``...)."""

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 identity of (config, tokenizer, dtype, weights)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ...


def resolve_dtype(dtype: str, directory: Path) -> str:
    """A name from :data:`DTYPES`; ``"auto"`` reads the dtype from ``config.json``."""
    if dtype == "auto":
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BadRequest(f"cannot read {directory / 'config.json'}: {exc}") from None
        found = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = str(found)
    if dtype not in DTYPES:
        raise BadRequest(
            f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}", reason="bad_dtype"
        )
    return dtype


def torch_dtype_of(name: str) -> torch.dtype:
    """The ``torch`` dtype of a name from :data:`DTYPES`."""
    import torch  # noqa: PLC0415 - see the module's torch import

    dtype: torch.dtype = getattr(torch, name)
    return dtype


def resolve_device(device: str | None) -> str:
    """``None``/``"cpu"`` → cpu; ``"auto"`` → cuda when available; ``"cuda[:N]"`` checked."""
    if device is None or device == "cpu":
        return "cpu"
    import torch  # noqa: PLC0415 - see the module's torch import

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadRequest(f"device {device!r} asked but CUDA is not available")
        return device if ":" in device else "cuda:0"
    raise BadRequest(f"device must be cpu, cuda[:N] or auto, got {device!r}")


@dataclass(frozen=True, slots=True, eq=False)
class HFBackend:
    """A Hugging Face causal LM loaded from a local directory (see :meth:`load`)."""

    model: Any
    tokenizer: Any
    path: Path
    dtype: str
    device: str
    fingerprint: str

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        device: str | None = None,
        fingerprint_cache_dir: Path | None = None,
    ) -> HFBackend:
        """Load model and tokenizer from ``path`` (never the network), in eval mode.

        ``dtype`` is a name from :data:`DTYPES` or ``"auto"`` (the config's);
        ``device`` is ``None`` (CPU), ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
        Raises :class:`NotFound` if the directory has no ``config.json``.
        """
        # transformers takes seconds to import: only pay it when a model is loaded.
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        directory = Path(path).expanduser().resolve()
        if not (directory / "config.json").is_file():
            raise NotFound(f"no model at {directory} (config.json missing)", reason="no_model")
        dtype_name = resolve_dtype(dtype, directory)
        device_name = resolve_device(device)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, dtype=torch_dtype_of(dtype_name)
        )
        model.to(device_name)
        model.eval()
        fingerprint = model_fingerprint(
            directory, dtype=dtype_name, cache_dir=fingerprint_cache_dir
        )
        return cls(model, tokenizer, directory, dtype_name, device_name, fingerprint)

    @property
    def short_fingerprint(self) -> str:
        """The first 12 hex digits of :attr:`fingerprint`."""
        return short_fingerprint(self.fingerprint)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype_of(self.dtype)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS or other special tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    def __repr__(self) -> str:
        return (
            f"HFBackend(path={str(self.path)!r}, dtype={self.dtype!r}, device={self.device!r}, "
            f"fingerprint={self.short_fingerprint!r})"
        )


def cache_keyword(model: Any) -> str:
    """The keyword ``model`` takes a KV cache under (``forward`` and ``generate``).

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name
    warns, and is to be removed); earlier versions only know
    ``past_key_values``.  A peft wrapper is looked through to its base model.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (``cache`` or ``past_key_values``)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output["past_key_values"]
