"""memctl commands for parameter memory (LoRA adapters).

``memctl lora train|show|get|rollback|retrain|forget``.  Registered by the
import at the bottom of :mod:`memosd.cli.main`; docs/cli.md is the
reference, docs/parameter-memory.md the background.  Training runs as a
daemon job: ``train`` and ``retrain`` follow it with a progress bar (steps,
loss, ETA) unless ``--no-wait``; Ctrl-C stops following, not the job
(``memctl job cancel ID`` stops it).
"""

# Typer maps positional parameters to CLI arguments and options.
# ruff: noqa: PLR0917

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from memosd.cli.jobs import follow_job, job_exit_code
from memosd.cli.main import JsonOpt, SocketOpt, TokenOpt, _session, app
from memosd.cli.render import format_time_us, print_kv, print_table
from memosd.errors import BadRequest

__all__ = ["lora_app", "parse_settings"]

lora_app = typer.Typer(
    help="Parameter memory: LoRA adapters trained from a cube's memories.", no_args_is_help=True
)
app.add_typer(lora_app, name="lora")

NoWaitOpt = Annotated[
    bool,
    typer.Option("--no-wait", help="Queue the job and return at once (print the job)."),
]
WaitTimeoutOpt = Annotated[
    float | None,
    typer.Option("--wait-timeout", help="Stop following after this many seconds.", min=0.1),
]


def parse_settings(pairs: list[str], flags: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameter overrides from ``--set KEY=VALUE`` (JSON values) and the flags."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise BadRequest(f"--set expects KEY=VALUE, got {pair!r}", reason="bad_arg")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    for key, value in flags.items():
        if value is not None:
            out[key] = value
    if isinstance(out.get("target_modules"), str):
        out["target_modules"] = [m for m in out["target_modules"].split(",") if m]
    return out


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _ppl(evaluation: dict[str, Any], what: str) -> str:
    base = evaluation.get(f"{what}_ppl_base")
    adapted = evaluation.get(f"{what}_ppl_adapted")
    if base is None or adapted is None:
        return "-"
    change = evaluation.get("memory_drop" if what == "memory" else "control_rise")
    if what == "memory" and change is not None:
        change = -change
    return f"{base:.1f}->{adapted:.1f} ({_pct(change)})"


def _size(n: Any) -> str:
    n = int(n or 0)
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def _version_rows(versions: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            v["version"],
            v["status"],
            v["items"],
            _ppl(v.get("evaluation") or {}, "memory"),
            _ppl(v.get("evaluation") or {}, "control"),
            _size(v.get("size")),
            format_time_us(v.get("recorded_us")),
        ]
        for v in versions
    ]


_HEADERS = ["VERSION", "STATUS", "ITEMS", "MEMORY PPL", "CONTROL PPL", "SIZE", "RECORDED"]


def _print_result(out: TextIO, job: dict[str, Any]) -> None:
    """One paragraph about an ended training job."""
    result = job.get("result") or {}
    state = job.get("state")
    if state != "succeeded":
        error = job.get("error") or {}
        out.write(f"job {job['id']} {state}: {error.get('message', '')}\n".rstrip() + "\n")
        return
    outcome = result.get("outcome")
    if outcome in ("promoted", "rejected"):
        evaluation = result.get("evaluation") or {}
        out.write(
            f"adapter version {result.get('version')} of cube {result.get('cube')}: {outcome} "
            f"({result.get('items')} memories, {result.get('steps')} steps, "
            f"{result.get('tokens_per_s', 0):.0f} tokens/s)\n"
        )
        out.write(f"  memory perplexity  {_ppl(evaluation, 'memory')}\n")
        out.write(f"  control perplexity {_ppl(evaluation, 'control')}\n")
        for reason in evaluation.get("reasons") or ():
            out.write(f"  gate: {reason}\n")
        out.write(f"  active version: {result.get('active_version')}\n")
    if result.get("dropped_versions"):
        out.write(f"  forgotten stale versions: {result['dropped_versions']}\n")
    if outcome == "up_to_date":
        out.write(f"cube {result.get('cube')}: no stale adapter version, nothing to retrain\n")
    elif outcome == "forgotten":
        out.write(f"cube {result.get('cube')}: no memory left to train on; stale versions gone\n")


def _follow(s: Any, job: dict[str, Any], no_wait: bool, wait_timeout: float | None) -> None:
    if no_wait:
        if not s.emit(job):
            s.line(f"queued job {job['id']} ({job['kind']}); follow it with `memctl job wait`")
        return
    final = follow_job(s.client, job["id"], err=s.err, json_out=s.json, timeout=wait_timeout)
    if not s.emit(final):
        _print_result(s.out, final)
    code = job_exit_code(final)
    if code:
        raise typer.Exit(code)


@lora_app.command("train")
def lora_train(
    ctx: typer.Context,
    cube: str,
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Base model directory (on the daemon's host; Hugging Face)."
        ),
    ],
    from_tier: Annotated[
        str | None,
        typer.Option("--from-tier", help="Train on this tier's active items [default: long]."),
    ] = None,
    items: Annotated[
        list[str] | None,
        typer.Option("--items", "--item", help="Train on these items (repeat, or comma-separate)."),
    ] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="LoRA rank r.", min=1)] = None,
    alpha: Annotated[int | None, typer.Option("--alpha", help="LoRA alpha.", min=1)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs.", min=1)] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Samples per step.", min=1)
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Training-set token budget.", min=1)
    ] = None,
    target_modules: Annotated[
        str | None,
        typer.Option("--target-modules", help="Comma-separated module names (q_proj,v_proj)."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed.", min=0)] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any other LoRA setting: KEY=VALUE (repeatable)."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float32, bfloat16, float16 or auto.")
    ] = None,
    no_wait: NoWaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Train a LoRA adapter on a cube's memories (a daemon job; progress bar until done).

    Defaults come from the daemon's [lora] settings; the adapter becomes the
    active version only if it passes the promotion gate.
    """
    with _session(ctx, json_out, socket, token) as s:
        if from_tier is not None and items:
            raise BadRequest("give --from-tier or --items, not both", reason="bad_arg")
        item_ids = [i for raw in items or () for i in raw.split(",") if i] or None
        settings = parse_settings(
            set_ or [],
            {
                "rank": rank,
                "alpha": alpha,
                "learning_rate": lr,
                "epochs": epochs,
                "batch_size": batch_size,
                "max_tokens": max_tokens,
                "target_modules": target_modules,
                "seed": seed,
            },
        )
        job = s.client.lora_train(
            cube,
            str(Path(model).expanduser().absolute()),
            from_tier=from_tier,
            items=item_ids,
            settings=settings or None,
            dtype=dtype,
        )
        _follow(s, job, no_wait, wait_timeout)


@lora_app.command("retrain")
def lora_retrain(
    ctx: typer.Context,
    cube: str,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Base model directory [default: the adapter's]."),
    ] = None,
    no_wait: NoWaitOpt = False,
    wait_timeout: WaitTimeoutOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Retrain a stale adapter without its purged memories; forget the stale versions."""
    with _session(ctx, json_out, socket, token) as s:
        job = s.client.lora_retrain(
            cube, model=str(Path(model).expanduser().absolute()) if model else None
        )
        _follow(s, job, no_wait, wait_timeout)


@lora_app.command("show")
def lora_show(
    ctx: typer.Context,
    cube: str,
    version: Annotated[
        int | None, typer.Option("--version", "-v", help="One version, in full.", min=1)
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """A cube's adapter versions: status (active/rejected/stale/superseded), items, metrics."""
    with _session(ctx, json_out, socket, token) as s:
        shown = s.client.lora_show(cube, version)
        if s.emit(shown):
            return
        if version is None:
            print_table(
                _HEADERS,
                _version_rows(shown["versions"]),
                s.out,
                empty=f"Cube {cube} has no LoRA adapter.",
            )
            if shown.get("stale"):
                s.line("stale versions are never served; `memctl lora retrain` replaces them")
            return
        training = shown.get("training") or {}
        evaluation = shown.get("evaluation") or {}
        print_kv(
            [
                ("version", shown["version"]),
                ("status", shown["status"]),
                ("item", shown["item_id"]),
                ("recorded", format_time_us(shown.get("recorded_us"))),
                ("base model", (shown.get("base_model") or {}).get("path")),
                ("fingerprint", shown.get("base_fingerprint")),
                ("adapter", f"{_size(shown.get('size'))} sha256 {shown.get('sha256')}"),
                ("memory ppl", _ppl(evaluation, "memory")),
                ("control ppl", _ppl(evaluation, "control")),
                ("gate", "; ".join(evaluation.get("reasons") or ()) or shown.get("gate")),
                ("steps", training.get("steps")),
                ("tokens/s", round(training.get("tokens_per_s") or 0)),
                ("settings", shown.get("settings")),
                ("purged items", ", ".join(shown.get("purged_items") or ()) or "-"),
            ],
            s.out,
        )
        s.line("trained on:")
        for item_id, item_version in shown.get("trained_on") or ():
            s.line(f"  {item_id} v{item_version}")


@lora_app.command("get")
def lora_get(
    ctx: typer.Context,
    cube: str,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory to write the peft adapter to.")
    ],
    version: Annotated[
        int | None, typer.Option("--version", "-v", help="A version [default: active].", min=1)
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty directory.")
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write an adapter as a peft adapter directory (PeftModel.from_pretrained loads it)."""
    with _session(ctx, json_out, socket, token) as s:
        if output.exists() and any(output.iterdir()) and not force:
            raise BadRequest(f"{output} is not empty; use --force", reason="exists")
        adapter = s.client.lora_get(cube, version)
        from memosd.client import save_lora  # noqa: PLC0415 - torch only here

        target = save_lora(adapter, output)
        summary = {
            "cube": cube,
            "version": adapter.version,
            "status": adapter.status,
            "path": str(target),
            "bytes": len(adapter.data),
            "sha256": adapter.sha256,
            "base_fingerprint": adapter.base_fingerprint,
        }
        if not s.emit(summary):
            s.line(
                f"wrote adapter version {adapter.version} of cube {cube} to {target} "
                f"({_size(len(adapter.data))})"
            )


@lora_app.command("rollback")
def lora_rollback(
    ctx: typer.Context,
    cube: str,
    version: int,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Make a new adapter version equal to VERSION (active if its gate passed)."""
    with _session(ctx, json_out, socket, token) as s:
        rolled = s.client.lora_rollback(cube, version)
        if not s.emit(rolled):
            s.line(
                f"cube {cube}: adapter version {rolled['version']} = version {version} "
                f"({rolled['status']})"
            )


@lora_app.command("forget")
def lora_forget(
    ctx: typer.Context,
    cube: str,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Forget stale adapter versions now (their weights are deleted), without retraining."""
    with _session(ctx, json_out, socket, token) as s:
        result = s.client.lora_forget(cube)
        if not s.emit(result):
            dropped = result["dropped_versions"]
            s.line(
                f"cube {cube}: forgot versions {dropped}"
                if dropped
                else f"cube {cube}: no stale adapter version"
            )
