"""Perplexity evaluation and the promotion gate of an adapter.

An adapter may become its cube's active adapter only if both hold:

* memory perplexity (on exactly the samples it was trained on) drops by at
  least ``min_memory_ppl_drop`` versus the base model:
  ``1 - ppl_adapted / ppl_base >= min_memory_ppl_drop`` (default 20 %);
* perplexity on the control text shipped with the package
  (``memosd/lora/control.txt``, generic prose unrelated to any cube) rises by
  at most ``max_control_ppl_rise``:
  ``ppl_adapted / ppl_base - 1 <= max_control_ppl_rise`` (default 10 %) --
  the catastrophic-forgetting guard.

A non-finite perplexity (a diverged adapter) fails the gate.  The base
numbers come from the same model with the adapter disabled, so base and
adapted are measured by identical code on identical tokens.

Perplexity is ``exp(total NLL / predicted tokens)`` over all samples (a token
average, not an average of per-sample perplexities).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from memosd.lora.dataset import TextTokenizer, encode_text
from memosd.lora.settings import LoraSettings

if TYPE_CHECKING:
    # Imported where used: the daemon imports this module at start, and importing
    # torch costs ~230 MB of RSS that a daemon without LoRA work never needs.
    import torch

__all__ = [
    "CONTROL_TEXT_RESOURCE",
    "EvaluationReport",
    "control_sequences",
    "control_text",
    "evaluate_adapter",
    "judge",
    "pad_batch",
    "perplexity",
]

CONTROL_TEXT_RESOURCE: Final = "control.txt"
_IGNORE: Final = -100


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    memory_ppl_base: float
    memory_ppl_adapted: float
    control_ppl_base: float
    control_ppl_adapted: float
    memory_tokens: int
    control_tokens: int
    min_memory_ppl_drop: float
    max_control_ppl_rise: float
    passed: bool
    reasons: tuple[str, ...] = field(default=())

    @property
    def memory_drop(self) -> float:
        """Share by which memory perplexity fell (0.4 = 40 % lower); NaN if undefined."""
        return _ratio_change(self.memory_ppl_adapted, self.memory_ppl_base, drop=True)

    @property
    def control_rise(self) -> float:
        """Share by which control perplexity rose (negative = it fell); NaN if undefined."""
        return _ratio_change(self.control_ppl_adapted, self.control_ppl_base, drop=False)

    def to_dict(self) -> dict[str, Any]:
        """Msgpack- and JSON-safe form: non-finite numbers become None."""
        return {
            "memory_ppl_base": _finite(self.memory_ppl_base),
            "memory_ppl_adapted": _finite(self.memory_ppl_adapted),
            "memory_drop": _finite(self.memory_drop),
            "control_ppl_base": _finite(self.control_ppl_base),
            "control_ppl_adapted": _finite(self.control_ppl_adapted),
            "control_rise": _finite(self.control_rise),
            "memory_tokens": self.memory_tokens,
            "control_tokens": self.control_tokens,
            "min_memory_ppl_drop": self.min_memory_ppl_drop,
            "max_control_ppl_rise": self.max_control_ppl_rise,
            "passed": self.passed,
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        def num(key: str) -> float:
            value = data.get(key)
            return math.inf if value is None else float(value)

        return cls(
            memory_ppl_base=num("memory_ppl_base"),
            memory_ppl_adapted=num("memory_ppl_adapted"),
            control_ppl_base=num("control_ppl_base"),
            control_ppl_adapted=num("control_ppl_adapted"),
            memory_tokens=int(data.get("memory_tokens", 0)),
            control_tokens=int(data.get("control_tokens", 0)),
            min_memory_ppl_drop=float(data["min_memory_ppl_drop"]),
            max_control_ppl_rise=float(data["max_control_ppl_rise"]),
            passed=bool(data["passed"]),
            reasons=tuple(str(r) for r in data.get("reasons", ())),
        )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ratio_change(adapted: float, base: float, *, drop: bool) -> float:
    if not (math.isfinite(adapted) and math.isfinite(base)) or base <= 0:
        return math.nan
    return 1.0 - adapted / base if drop else adapted / base - 1.0


def judge(
    *,
    memory_ppl_base: float,
    memory_ppl_adapted: float,
    control_ppl_base: float,
    control_ppl_adapted: float,
    settings: LoraSettings,
    memory_tokens: int = 0,
    control_tokens: int = 0,
) -> EvaluationReport:
    """The gate's verdict on four perplexities (pure; see the module docstring)."""
    reasons: list[str] = []
    report = EvaluationReport(
        memory_ppl_base=memory_ppl_base,
        memory_ppl_adapted=memory_ppl_adapted,
        control_ppl_base=control_ppl_base,
        control_ppl_adapted=control_ppl_adapted,
        memory_tokens=memory_tokens,
        control_tokens=control_tokens,
        min_memory_ppl_drop=settings.min_memory_ppl_drop,
        max_control_ppl_rise=settings.max_control_ppl_rise,
        passed=False,
    )
    drop, rise = report.memory_drop, report.control_rise
    if math.isnan(drop):
        reasons.append("memory perplexity is not finite")
    elif drop < settings.min_memory_ppl_drop:
        reasons.append(
            f"memory perplexity dropped {drop:.1%}, needs >= {settings.min_memory_ppl_drop:.1%}"
        )
    if math.isnan(rise):
        reasons.append("control perplexity is not finite")
    elif rise > settings.max_control_ppl_rise:
        reasons.append(
            f"control perplexity rose {rise:.1%}, allowed <= {settings.max_control_ppl_rise:.1%}"
        )
    return EvaluationReport(**{**_fields(report), "passed": not reasons, "reasons": tuple(reasons)})


def _fields(report: EvaluationReport) -> dict[str, Any]:
    return {name: getattr(report, name) for name in EvaluationReport.__dataclass_fields__}


def control_text() -> str:
    """The shipped control text (package data)."""
    return resources.files("memosd.lora").joinpath(CONTROL_TEXT_RESOURCE).read_text("utf-8")


def control_sequences(tokenizer: TextTokenizer, settings: LoraSettings) -> list[list[int]]:
    """The control text as windows of ``max_seq_len`` tokens, ``control_max_tokens`` in all."""
    paragraphs = [p.strip() for p in control_text().split("\n\n") if p.strip()]
    out: list[list[int]] = []
    budget = settings.control_max_tokens
    for paragraph in paragraphs:
        ids = encode_text(tokenizer, " ".join(paragraph.split()), 1 << 30)
        for start in range(0, len(ids), settings.max_seq_len):
            window = ids[start : start + settings.max_seq_len][:budget]
            if len(window) >= 2:
                out.append(window)
                budget -= len(window)
            if budget < 2:
                return out
    return out


def pad_batch(
    sequences: Sequence[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (pads ignored)."""
    import torch  # noqa: PLC0415 - see the module's torch import

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), _IGNORE, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids = torch.tensor(seq, dtype=torch.long)
        input_ids[row, : len(seq)] = ids
        mask[row, : len(seq)] = 1
        labels[row, : len(seq)] = ids
    return input_ids, mask, labels


def token_nll(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of a batch and the number of predicted tokens."""
    import torch  # noqa: PLC0415 - see the module's torch import

    logits = model(input_ids=input_ids, attention_mask=mask).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=_IGNORE,
        reduction="sum",
    )
    return nll, int((shift_labels != _IGNORE).sum().item())


def perplexity(
    model: Any, sequences: Sequence[list[int]], *, pad_id: int, batch_size: int = 8
) -> float:
    """Token-level perplexity of ``model`` on ``sequences`` (inf if it diverged)."""
    import torch  # noqa: PLC0415 - see the module's torch import

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            nll, n = token_nll(model, *pad_batch(chunk, pad_id))
            total += float(nll.item())
            count += n
    if count == 0:
        return math.nan
    mean = total / count
    if not math.isfinite(mean):
        return math.inf
    return math.exp(mean) if mean < 700 else math.inf


@contextlib.contextmanager
def _adapter_disabled(peft_model: Any) -> Iterator[None]:
    with peft_model.disable_adapter():
        yield


def evaluate_adapter(
    peft_model: Any,
    tokenizer: TextTokenizer,
    memory_sequences: Sequence[list[int]],
    settings: LoraSettings,
    *,
    pad_id: int,
) -> EvaluationReport:
    """Measure base (adapter disabled) and adapted perplexities, then :func:`judge`."""
    control = control_sequences(tokenizer, settings)
    was_training = peft_model.training
    peft_model.eval()
    try:
        with _adapter_disabled(peft_model):
            memory_base = perplexity(peft_model, memory_sequences, pad_id=pad_id)
            control_base = perplexity(peft_model, control, pad_id=pad_id)
        memory_adapted = perplexity(peft_model, memory_sequences, pad_id=pad_id)
        control_adapted = perplexity(peft_model, control, pad_id=pad_id)
    finally:
        peft_model.train(was_training)
    return judge(
        memory_ppl_base=memory_base,
        memory_ppl_adapted=memory_adapted,
        control_ppl_base=control_base,
        control_ppl_adapted=control_adapted,
        settings=settings,
        memory_tokens=sum(len(s) - 1 for s in memory_sequences),
        control_tokens=sum(len(s) - 1 for s in control),
    )
