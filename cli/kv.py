"""memctl commands for activation memory (KV caches): ``memctl kv build|list|show|drop|rebuild``.

Registered by the import at the bottom of :mod:`memosd.cli.main`; docs/cli.md
is the reference and docs/activation-memory.md the overview.  ``kv build``
queues a ``kv.build`` job and follows it with a progress bar on stderr
(:func:`memosd.cli.jobs.follow_job`); ``--no-wait`` prints the queued job and
returns.
"""

# Typer maps positional parameters to CLI arguments and options.
# ruff: noqa: PLR0917

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final

import typer

from memosd.cli.jobs import follow_job, job_exit_code
from memosd.cli.main import JsonOpt, SocketOpt, TokenOpt, YesOpt, _confirm, _session, app
from memosd.cli.render import format_time_us, print_kv, print_table
from memosd.errors import BadRequest

__all__ = ["kv_app"]

kv_app = typer.Typer(
    help="Activation memory: KV caches of memories, built once and injected.",
    no_args_is_help=True,
)
app.add_typer(kv_app, name="kv")

_HEADERS: Final = ("ID", "NAME", "TOKENS", "SIZE", "SOURCES", "STALE", "MODEL", "BUILT", "HITS")

IdArg = Annotated[
    str | None, typer.Argument(metavar="[ID]", help="The KV item's id.", show_default=False)
]
NameOpt = Annotated[
    str | None, typer.Option("--name", help="Select the cache by its name instead of its id.")
]


def _size(n: Any) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _row(info: dict[str, Any]) -> list[Any]:
    stale = info.get("stale_reason") or "yes" if info.get("stale") else "no"
    return [
        info.get("item_id"),
        info.get("name") or "-",
        info.get("num_tokens"),
        _size(info.get("bytes")),
        len(info.get("sources") or ()),
        stale,
        str(info.get("fingerprint") or "")[:12],
        format_time_us(info.get("built_us")),
        info.get("hits"),
    ]


def _print_info(out: Any, info: dict[str, Any]) -> None:
    pairs: list[tuple[str, Any]] = [
        ("id", info.get("item_id")),
        ("cube", info.get("cube")),
        ("name", info.get("name")),
        ("version", info.get("version")),
        ("model", info.get("model")),
        ("fingerprint", info.get("fingerprint")),
        ("dtype", info.get("dtype")),
        ("quant", info.get("quant")),
        ("tokens", info.get("num_tokens")),
        ("reused_tokens", info.get("reused_tokens")),
        ("size", _size(info.get("bytes"))),
        ("chunks", info.get("chunks")),
        ("stale", bool(info.get("stale"))),
        ("stale_reason", info.get("stale_reason")),
        ("replaces", info.get("replaces")),
        ("built", format_time_us(info.get("built_us"))),
        ("last_used", format_time_us(info.get("last_used_us"))),
        ("hits", info.get("hits")),
    ]
    print_kv([(k, v) for k, v in pairs if v is not None], out)
    sources = info.get("sources") or []
    if sources:
        out.write("sources:\n")
        for item_id, version in sources:
            out.write(f"  {item_id} v{version}\n")


def _ref(item_id: str | None, name: str | None) -> tuple[str | None, str | None]:
    if (item_id is None) == (name is None):
        raise BadRequest("give the cache's ID or --name (one of them)", reason="bad_arg")
    return item_id, name


@kv_app.command("build")
def kv_build(
    ctx: typer.Context,
    cube: str,
    model: Annotated[
        Path,
        typer.Option("--model", help="Local directory of a causal LM (Hugging Face layout)."),
    ],
    items: Annotated[
        list[str] | None,
        typer.Option("--items", "--item", help="An item to cache (repeatable).", metavar="ID"),
    ] = None,
    tier: Annotated[
        str | None, typer.Option("--tier", help="Cache every active item of this tier.")
    ] = None,
    query: Annotated[
        str | None, typer.Option("--query", help="Cache the best hits of this search.")
    ] = None,
    top: Annotated[
        int | None, typer.Option("--top", help="How many hits of --query [default: 10].", min=1)
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="A stable name (kept across rebuilds).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="float32, float16, bfloat16 or auto [default: daemon's]."),
    ] = None,
    quant: Annotated[
        str | None, typer.Option("--quant", help="none or int8 [default: the daemon's].")
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Queue the build and print the job; do not wait.")
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Build the KV cache of some memories for a model (a background job, followed)."""
    with _session(ctx, json_out, socket, token) as s:
        if sum(x is not None for x in (items or None, tier, query)) != 1:
            raise BadRequest("give exactly one of --items, --tier, --query", reason="bad_arg")
        queued = s.client.kv_build(
            cube,
            model=model,
            items=items or None,
            tier=tier,
            query=query,
            top=top,
            dtype=dtype,
            name=name,
            quant=quant,
            wait=False,
        )["job"]
        if no_wait:
            if not s.emit({"job": queued}):
                s.line(f"queued job {queued['id']} (memctl job wait {queued['id']})")
            return
        job = follow_job(s.client, queued["id"], err=s.err, json_out=s.json, label="kv build")
        code = job_exit_code(job)
        if code:
            if not s.emit({"job": job}):
                error = job.get("error") or {}
                s.err.write(f"memctl: kv build failed: {error.get('message') or job['state']}\n")
            raise typer.Exit(code)
        info = s.client.kv_show(cube, job["result"]["item_id"])
        if not s.emit({"job": job, "info": info}):
            result = job["result"]
            s.line(
                f"built KV cache {result['item_id']}: {result['num_tokens']} tokens "
                f"({result['reused_tokens']} reused), {_size(result['bytes'])}"
            )


@kv_app.command("list")
def kv_list(
    ctx: typer.Context,
    cube: str,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """The KV caches of a cube."""
    with _session(ctx, json_out, socket, token) as s:
        caches = s.client.kv_list(cube)
        if not s.emit(caches):
            print_table(_HEADERS, [_row(c) for c in caches], s.out, empty="no KV caches")


@kv_app.command("show")
def kv_show(
    ctx: typer.Context,
    cube: str,
    item_id: IdArg = None,
    name: NameOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """One KV cache: model, size, sources, staleness, use."""
    with _session(ctx, json_out, socket, token) as s:
        kv_id, kv_name = _ref(item_id, name)
        info = s.client.kv_show(cube, kv_id, name=kv_name)
        if not s.emit(info):
            _print_info(s.out, info)


@kv_app.command("drop")
def kv_drop(
    ctx: typer.Context,
    cube: str,
    item_id: IdArg = None,
    name: NameOpt = None,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Purge a KV cache and its tensors (asks unless --yes)."""
    with _session(ctx, json_out, socket, token) as s:
        kv_id, kv_name = _ref(item_id, name)
        _confirm(yes, f"purge KV cache {kv_id or kv_name!r}")
        record = s.client.kv_drop(cube, kv_id, name=kv_name)
        wire = {"cube": record.cube, "id": record.id, "versions": record.versions}
        if not s.emit(wire):
            s.line(f"dropped KV cache {record.id}")


@kv_app.command("rebuild")
def kv_rebuild(
    ctx: typer.Context,
    cube: str,
    item_id: IdArg = None,
    name: NameOpt = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Queue the rebuilds; do not wait.")
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
    token: TokenOpt = None,
) -> None:
    """Rebuild one cache from its sources' current versions, or every stale cache of CUBE."""
    with _session(ctx, json_out, socket, token) as s:
        queued = s.client.kv_rebuild(cube, item_id, name=name)
        if no_wait:
            if not s.emit({"jobs": queued}):
                for job in queued:
                    s.line(f"queued job {job['id']} for {job['args']['item_id']}")
                if not queued:
                    s.line("nothing to rebuild")
            return
        done = [
            follow_job(s.client, j["id"], err=s.err, json_out=s.json, label="kv rebuild")
            for j in queued
        ]
        if not s.emit({"jobs": done}):
            for job in done:
                result = job.get("result") or {}
                what = result.get("skipped") or result.get("item_id") or job["state"]
                s.line(f"{job['args']['item_id']}: {what}")
            if not done:
                s.line("nothing to rebuild")
        codes = [job_exit_code(j) for j in done if job_exit_code(j)]
    if codes:
        raise typer.Exit(codes[0])
