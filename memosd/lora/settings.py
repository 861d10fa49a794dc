"""Hyperparameters and promotion margins of parameter memory (one frozen value).

Every field has a documented default (see docs/parameter-memory.md for the
reasoning and the measurements behind them).  :meth:`LoraSettings.from_mapping`
is the one way to build settings from untrusted input (a request, a TOML
section): unknown keys and wrong types raise :class:`BadRequest` naming the
field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from memosd.errors import BadRequest

__all__ = ["DEFAULT_TARGET_MODULES", "LoraSettings"]

#: The attention query and value projections.  Hu et al. (LoRA, 2021, §7.1)
#: found that, for a fixed parameter budget, adapting W_q and W_v together
#: beats adapting any single matrix or all four attention matrices at a lower
#: rank; it is also peft's default for Llama-family models, the smallest
#: adapter that works, and leaves the MLP (where most general knowledge sits)
#: untouched, which helps the control-text guard.
DEFAULT_TARGET_MODULES: Final = ("q_proj", "v_proj")


def _doc(help_text: str) -> dict[str, str]:
    return {"help": help_text}


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """How a cube's adapter is trained and when it may become active."""

    rank: int = field(default=8, metadata=_doc("LoRA rank r of each adapted matrix"))
    alpha: int = field(
        default=16, metadata=_doc("LoRA scaling numerator: the update is (alpha / rank) * BA")
    )
    dropout: float = field(
        default=0.0,
        metadata=_doc("dropout on the LoRA input; 0 because the goal is to memorise a few texts"),
    )
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES, metadata=_doc("names of the linear modules to adapt")
    )
    learning_rate: float = field(default=2e-3, metadata=_doc("AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=_doc("AdamW weight decay"))
    epochs: int = field(default=4, metadata=_doc("passes over the training samples"))
    batch_size: int = field(default=8, metadata=_doc("samples per optimiser step"))
    max_tokens: int = field(
        default=65_536,
        metadata=_doc("token budget of the training set (one epoch); later items are skipped"),
    )
    max_seq_len: int = field(
        default=256, metadata=_doc("tokens per sample; longer memories are truncated")
    )
    seed: int = field(default=0, metadata=_doc("seed of sample order, dropout and LoRA init"))
    min_memory_ppl_drop: float = field(
        default=0.20,
        metadata=_doc("gate: perplexity on the trained memories must drop by at least this share"),
    )
    max_control_ppl_rise: float = field(
        default=0.10,
        metadata=_doc("gate: perplexity on the control text may rise by at most this share"),
    )
    control_max_tokens: int = field(
        default=2048, metadata=_doc("tokens of the shipped control text used by the gate")
    )
    torch_threads: int = field(
        default=0, metadata=_doc("torch intra-op threads in the training worker; 0 = torch default")
    )

    def __post_init__(self) -> None:
        # Accept lists from msgpack/TOML but keep the frozen value hashable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check_int(self.rank, "rank", 1, 1024)
        _check_int(self.alpha, "alpha", 1, 1 << 20)
        _check_float(self.dropout, "dropout", 0.0, 0.95)
        if not self.target_modules or not all(
            isinstance(m, str) and m for m in self.target_modules
        ):
            raise BadRequest("target_modules must be a non-empty list of module names")
        _check_float(self.learning_rate, "learning_rate", 0.0, 1e3, open_low=True)
        _check_float(self.weight_decay, "weight_decay", 0.0, 10.0)
        _check_int(self.epochs, "epochs", 1, 1000)
        _check_int(self.batch_size, "batch_size", 1, 4096)
        _check_int(self.max_tokens, "max_tokens", 1, 1 << 32)
        _check_int(self.max_seq_len, "max_seq_len", 2, 1 << 20)
        _check_int(self.seed, "seed", 0, (1 << 63) - 1)
        _check_float(self.min_memory_ppl_drop, "min_memory_ppl_drop", 0.0, 1.0)
        _check_float(self.max_control_ppl_rise, "max_control_ppl_rise", 0.0, 1e6)
        _check_int(self.control_max_tokens, "control_max_tokens", 2, 1 << 24)
        _check_int(self.torch_threads, "torch_threads", 0, 1024)

    def to_dict(self) -> dict[str, Any]:
        """Msgpack-safe form, as recorded in the adapter manifest."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, base: LoraSettings | None = None
    ) -> LoraSettings:
        """``base`` (default: the defaults) with ``values`` applied; unknown keys refused."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                hint = difflib.get_close_matches(str(key), names, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise BadRequest(f"unknown LoRA setting {key!r}{extra}", reason="bad_setting")
        return dataclasses.replace(base or cls(), **dict(values))

    @staticmethod
    def describe() -> list[dict[str, Any]]:
        """(name, default, help) of every field, for docs and ``memctl lora settings``."""
        out: list[dict[str, Any]] = []
        defaults = LoraSettings()
        for f in dataclasses.fields(LoraSettings):
            default = getattr(defaults, f.name)
            out.append(
                {
                    "name": f.name,
                    "default": list(default) if isinstance(default, tuple) else default,
                    "help": f.metadata.get("help", ""),
                }
            )
        return out


def _check_int(value: object, name: str, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(
            f"LoRA setting {name} must be an int in [{low}, {high}], got {value!r}",
            reason="bad_setting",
        )


def _check_float(
    value: object, name: str, low: float, high: float, *, open_low: bool = False
) -> None:
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    ok = math.isfinite(number) and (low < number if open_low else low <= number) and number <= high
    if not ok:
        bound = "(" if open_low else "["
        raise BadRequest(
            f"LoRA setting {name} must be a number in {bound}{low}, {high}], got {value!r}",
            reason="bad_setting",
        )
