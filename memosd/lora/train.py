"""Training an adapter: the loop, and the worker process it runs in.

The daemon never trains in its own process.  :func:`run_training` starts a
worker with the ``spawn`` start method (a fresh interpreter: forking a process
that holds LMDB environments, ZeroMQ sockets and threads is unsafe), which
loads the base model from the backend's directory, checks that it still has
the backend's fingerprint, trains, evaluates (:mod:`memosd.lora.evaluate`)
and sends the adapter bytes back.  The parent only relays progress and waits,
so the caller's thread (a scheduler worker thread in the daemon) is busy but
the request loop is not.

Parent ⇄ worker protocol: one one-way pipe (worker → parent) carrying
msgpack maps -- ``{"kind": "progress", ...}`` any number of times, then
exactly one of ``{"kind": "done", "adapter": bytes, ...}``,
``{"kind": "cancelled"}`` or ``{"kind": "error", "error": <wire error>}`` --
and one ``multiprocessing.Event`` (parent → worker) asking it to stop.  The
worker checks the event before every optimiser step and between phases; a
stopped run produces no adapter at all.  The adapter bytes exist only in
memory until :mod:`memosd.lora.store` hands them to the blob store (tmp →
fsync → rename) *before* the WAL record that references them, so no reader
can ever see a half-written adapter, and a worker killed mid-way leaves
nothing behind but an unreferenced temporary the blob GC removes.

:func:`train_peft_model` is the loop itself (also used in-process by tests and
the benchmark through ``in_process=True``).
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import msgpack

from memosd.errors import InternalError, MemosError, error_from_wire
from memosd.lora.adapter import check_fingerprint, encode_adapter, lora_config, wrap_model
from memosd.lora.dataset import TextTokenizer, batches, encode_text
from memosd.lora.evaluate import EvaluationReport, evaluate_adapter, pad_batch, token_nll
from memosd.lora.settings import LoraSettings

# torch is imported where used: the daemon imports this module at start, and
# importing torch costs ~230 MB of RSS that a daemon without LoRA work never needs.

__all__ = [
    "MAX_GRAD_NORM",
    "CancelToken",
    "ProgressCallback",
    "TrainedModel",
    "TrainingOutput",
    "TrainingProgress",
    "run_training",
    "train_peft_model",
]

#: Gradients are clipped to this global norm (a fixed safety net, not a knob).
MAX_GRAD_NORM: Final = 1.0
#: How long a worker may take to honour a cancellation before it is killed.
CANCEL_GRACE_S: Final = 30.0
_POLL_S: Final = 0.05


class CancelToken(Protocol):
    """Anything with ``is_set()`` (``threading.Event``, ``multiprocessing.Event``...)."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class TrainingProgress:
    """One progress report.  ``phase``: loading | training | evaluating | done."""

    phase: str
    step: int
    total_steps: int
    loss: float | None
    eta_s: float | None
    tokens_per_s: float | None
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.loss,
            "eta_s": self.eta_s,
            "tokens_per_s": self.tokens_per_s,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingProgress:
        return cls(
            phase=str(data["phase"]),
            step=int(data["step"]),
            total_steps=int(data["total_steps"]),
            loss=None if data.get("loss") is None else float(data["loss"]),
            eta_s=None if data.get("eta_s") is None else float(data["eta_s"]),
            tokens_per_s=(
                None if data.get("tokens_per_s") is None else float(data["tokens_per_s"])
            ),
            elapsed_s=float(data["elapsed_s"]),
        )


ProgressCallback = Callable[[TrainingProgress], None]


@dataclass(slots=True)
class TrainedModel:
    """What :func:`train_peft_model` returns (``peft_model`` None if cancelled)."""

    peft_model: Any
    loss_curve: list[float]
    steps: int
    tokens: int
    seconds: float
    diverged: bool

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TrainingOutput:
    """The result of one training run (adapter None if it was cancelled)."""

    adapter: bytes | None
    report: EvaluationReport | None
    loss_curve: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    diverged: bool = False

    @property
    def cancelled(self) -> bool:
        return self.adapter is None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def _pad_id(tokenizer: TextTokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def train_peft_model(
    model: Any,
    sequences: Sequence[list[int]],
    settings: LoraSettings,
    *,
    pad_id: int,
    emit: ProgressCallback | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainedModel:
    """Wrap ``model`` (in place) in a fresh LoRA adapter and train it on ``sequences``.

    Deterministic for a given seed (LoRA init, sample order, dropout).  Stops
    early, keeping what it has, when the loss stops being finite (the gate
    will reject it); returns ``peft_model=None`` when ``should_stop()``.
    """
    import torch  # noqa: PLC0415 - see the note on torch at the top

    if not sequences:
        raise InternalError("no training sequences")
    torch.manual_seed(settings.seed)
    peft_model: Any = wrap_model(model, lora_config(settings))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    per_epoch = math.ceil(len(sequences) / settings.batch_size)
    total = per_epoch * settings.epochs
    loss_curve: list[float] = []
    tokens = 0
    step = 0
    diverged = False
    started = time.monotonic()
    peft_model.train()
    for epoch in range(settings.epochs):
        for batch in batches(sequences, settings.batch_size, seed=settings.seed, epoch=epoch):
            if should_stop():
                return TrainedModel(None, loss_curve, step, tokens, _since(started), False)
            nll, count = token_nll(peft_model, *pad_batch(batch, pad_id))
            loss = nll / max(count, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            step += 1
            tokens += sum(len(s) for s in batch)
            value = float(loss.item())
            loss_curve.append(value)
            elapsed = _since(started)
            if emit is not None:
                emit(
                    TrainingProgress(
                        phase="training",
                        step=step,
                        total_steps=total,
                        loss=value if math.isfinite(value) else None,
                        eta_s=elapsed / step * (total - step),
                        tokens_per_s=tokens / elapsed if elapsed > 0 else None,
                        elapsed_s=elapsed,
                    )
                )
            if not math.isfinite(value):
                diverged = True
                break
        if diverged:
            break
    peft_model.eval()
    return TrainedModel(peft_model, loss_curve, step, tokens, _since(started), diverged)


def _since(started: float) -> float:
    return time.monotonic() - started


def _train_and_evaluate(
    model: Any,
    tokenizer: TextTokenizer,
    fingerprint: str,
    texts: Sequence[str],
    settings: LoraSettings,
    *,
    emit: ProgressCallback,
    should_stop: Callable[[], bool],
    started: float,
) -> TrainingOutput:
    pad_id = _pad_id(tokenizer)
    sequences = [encode_text(tokenizer, t, settings.max_seq_len) for t in texts]
    trained = train_peft_model(
        model, sequences, settings, pad_id=pad_id, emit=emit, should_stop=should_stop
    )
    if trained.peft_model is None or should_stop():
        return TrainingOutput(None, None)
    emit(TrainingProgress("evaluating", trained.steps, trained.steps, None, None, None, 0.0))
    report = evaluate_adapter(trained.peft_model, tokenizer, sequences, settings, pad_id=pad_id)
    if should_stop():
        return TrainingOutput(None, None)
    adapter = encode_adapter(trained.peft_model, base_fingerprint=fingerprint, settings=settings)
    emit(
        TrainingProgress(
            "done",
            trained.steps,
            trained.steps,
            trained.loss_curve[-1] if trained.loss_curve else None,
            0.0,
            trained.tokens_per_s,
            time.monotonic() - started,
        )
    )
    return TrainingOutput(
        adapter=adapter,
        report=report,
        loss_curve=trained.loss_curve,
        steps=trained.steps,
        tokens=trained.tokens,
        train_seconds=trained.seconds,
        diverged=trained.diverged,
    )


def run_training(
    backend: Any,
    texts: Sequence[str],
    settings: LoraSettings,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    in_process: bool = False,
    fingerprint_cache_dir: str | Path | None = None,
) -> TrainingOutput:
    """Train and evaluate an adapter for ``backend`` on ``texts``.

    By default in a spawned worker process (see the module docstring);
    ``in_process=True`` trains a deep copy of ``backend.model`` in this
    process instead (tests, benchmarks): the backend's own model is never
    modified either way.  Returns an output with ``adapter=None`` when
    cancelled.  ``fingerprint_cache_dir``: where the worker keeps its
    fingerprint sidecar (default: the user cache directory).  Errors of the
    worker are re-raised here as the same :class:`MemosError` class.
    """
    emit = progress if progress is not None else (lambda _p: None)
    should_stop = cancel.is_set if cancel is not None else (lambda: False)
    if in_process:
        started = time.monotonic()
        model = copy.deepcopy(backend.model)
        return _train_and_evaluate(
            model,
            backend.tokenizer,
            backend.fingerprint,
            texts,
            settings,
            emit=emit,
            should_stop=should_stop,
            started=started,
        )
    return _run_in_worker(
        backend,
        texts,
        settings,
        emit=emit,
        cancel=cancel,
        fingerprint_cache_dir=fingerprint_cache_dir,
    )


def _run_in_worker(
    backend: Any,
    texts: Sequence[str],
    settings: LoraSettings,
    *,
    emit: ProgressCallback,
    cancel: CancelToken | None,
    fingerprint_cache_dir: str | Path | None = None,
) -> TrainingOutput:
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    spec = msgpack.packb(
        {
            "model_path": str(backend.path),
            "dtype": str(backend.dtype),
            "fingerprint": str(backend.fingerprint),
            "texts": list(texts),
            "settings": settings.to_dict(),
            "fingerprint_cache_dir": (
                None if fingerprint_cache_dir is None else str(fingerprint_cache_dir)
            ),
        }
    )
    process = ctx.Process(
        target=_worker_main, args=(spec, writer, stop), name="memosd-lora-train", daemon=True
    )
    process.start()
    writer.close()  # the parent's copy: EOF on the reader once the worker is gone
    cancel_deadline: float | None = None
    try:
        while True:
            if cancel is not None and cancel.is_set() and cancel_deadline is None:
                stop.set()
                cancel_deadline = time.monotonic() + CANCEL_GRACE_S
            if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                process.kill()
                return TrainingOutput(None, None)
            if not reader.poll(_POLL_S):
                if not process.is_alive() and not reader.poll(0):
                    raise InternalError(
                        f"training worker exited with code {process.exitcode} without a result",
                        reason="worker_died",
                    )
                continue
            try:
                message = msgpack.unpackb(reader.recv_bytes())
            except EOFError:
                continue  # the loop above reports the dead worker
            kind = message.get("kind")
            if kind == "progress":
                emit(TrainingProgress.from_dict(message["progress"]))
            elif kind == "cancelled":
                return TrainingOutput(None, None)
            elif kind == "error":
                raise error_from_wire(message["error"])
            elif kind == "done":
                if cancel is not None and cancel.is_set():
                    return TrainingOutput(None, None)
                return TrainingOutput(
                    adapter=bytes(message["adapter"]),
                    report=EvaluationReport.from_dict(message["report"]),
                    loss_curve=[float(x) for x in message["loss_curve"]],
                    steps=int(message["steps"]),
                    tokens=int(message["tokens"]),
                    train_seconds=float(message["train_seconds"]),
                    diverged=bool(message["diverged"]),
                )
    finally:
        reader.close()
        process.join(timeout=5.0)
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)


def _worker_main(spec_bytes: bytes, conn: Any, stop: Any) -> None:
    """Entry point of the spawned worker (module level so spawn can import it)."""

    def send(message: dict[str, Any]) -> None:
        conn.send_bytes(msgpack.packb(message))

    try:
        spec = msgpack.unpackb(spec_bytes)
        settings = LoraSettings.from_mapping(spec["settings"])
        if settings.torch_threads:
            import torch  # noqa: PLC0415 - see the note on torch at the top

            torch.set_num_threads(settings.torch_threads)
        started = time.monotonic()
        send({"kind": "progress", "progress": _phase("loading", started)})
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        from memosd.models.backend import HFBackend  # noqa: PLC0415

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no tqdm in the journal
        cache_dir = spec.get("fingerprint_cache_dir")
        backend = HFBackend.load(
            spec["model_path"],
            dtype=spec["dtype"],
            fingerprint_cache_dir=None if cache_dir is None else Path(cache_dir),
        )
        # The directory may have changed since the daemon loaded it.
        check_fingerprint(spec["fingerprint"], backend.fingerprint)
        parent = multiprocessing.parent_process()

        def should_stop() -> bool:
            # Also stop when the daemon died (SIGKILL): nobody would take the result.
            return bool(stop.is_set()) or (parent is not None and not parent.is_alive())

        if should_stop():
            send({"kind": "cancelled"})
            return
        output = _train_and_evaluate(
            backend.model,  # this process's own copy: free to wrap in place
            backend.tokenizer,
            backend.fingerprint,
            spec["texts"],
            settings,
            emit=lambda p: send({"kind": "progress", "progress": p.to_dict()}),
            should_stop=should_stop,
            started=started,
        )
        if output.adapter is None or output.report is None:
            send({"kind": "cancelled"})
            return
        send(
            {
                "kind": "done",
                "adapter": output.adapter,
                "report": output.report.to_dict(),
                "loss_curve": output.loss_curve,
                "steps": output.steps,
                "tokens": output.tokens,
                "train_seconds": output.train_seconds,
                "diverged": output.diverged,
            }
        )
    except MemosError as exc:
        send({"kind": "error", "error": exc.to_wire()})
    except BaseException as exc:  # the parent must hear about every failure
        detail = "".join(traceback.format_exception(exc))[-4000:]
        send(
            {
                "kind": "error",
                "error": InternalError(f"training failed: {exc!r}\n{detail}").to_wire(),
            }
        )
    finally:
        conn.close()


def _phase(phase: str, started: float) -> dict[str, Any]:
    return TrainingProgress(phase, 0, 0, None, None, None, time.monotonic() - started).to_dict()
