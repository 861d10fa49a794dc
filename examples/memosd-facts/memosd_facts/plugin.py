"""The memosd-facts plugin: the hooks memosd calls (entry point ``facts``).

memosd imports this module through the ``memosd.plugins`` entry-point
group, checks ``MEMOSD_PLUGIN_API_VERSIONS``, then calls the hooks below.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Annotated, Any, Final

import typer

from memosd.plugins import MemoryForm, hookimpl
from memosd.scheduler.policy import TierPolicy
from memosd_facts.form import FACT_FORM, FactForm
from memosd_facts.policy import FactValidityPolicy

__all__ = [
    "MEMOSD_PLUGIN_API_VERSIONS",
    "register_commands",
    "register_memory_forms",
    "register_tier_policies",
]

#: The memosd plugin API versions this plugin was written for.
MEMOSD_PLUGIN_API_VERSIONS: Final = (1,)


@hookimpl
def register_memory_forms() -> Iterable[MemoryForm]:
    return [FactForm()]


@hookimpl
def register_tier_policies() -> Iterable[TierPolicy]:
    return [FactValidityPolicy()]


def _time_us(text: str | None) -> int | None:
    if text is None:
        return None
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1_000_000)


def _client(socket: str | None) -> Any:
    from memosd.client import Client  # noqa: PLC0415 - only commands that talk need pyzmq
    from memosd.settings import default_socket_path  # noqa: PLC0415

    return Client(socket or default_socket_path())


facts_app = typer.Typer(help="Structured facts (memosd-facts plugin).", no_args_is_help=True)
SocketOpt = Annotated[str | None, typer.Option("--socket", envvar="MEMOSD_SOCKET")]


@facts_app.command("add")
def add_fact(  # noqa: PLR0917 - typer: the signature is the command line
    cube: str,
    subject: str,
    predicate: str,
    obj: Annotated[str, typer.Argument(metavar="OBJECT")],
    valid_from: Annotated[str | None, typer.Option(help="ISO-8601 time.")] = None,
    valid_to: Annotated[str | None, typer.Option(help="ISO-8601 time.")] = None,
    socket: SocketOpt = None,
) -> None:
    """Add a fact SUBJECT PREDICATE OBJECT to CUBE; prints its id."""
    payload: dict[str, Any] = {"subject": subject, "predicate": predicate, "object": obj}
    for key, value in (("valid_from_us", valid_from), ("valid_to_us", valid_to)):
        if value is not None:
            payload[key] = _time_us(value)
    with _client(socket) as client:
        item = client.add(cube, "", form=FACT_FORM, payload=payload)
    typer.echo(item.id)


@facts_app.command("list")
def list_facts(cube: str, socket: SocketOpt = None) -> None:
    """The active facts of CUBE, one per line: id, subject, predicate, object."""
    with _client(socket) as client:
        for item in client.list_items(cube, form=FACT_FORM):
            p = item.payload or {}
            typer.echo(f"{item.id}\t{p.get('subject')}\t{p.get('predicate')}\t{p.get('object')}")


@hookimpl
def register_commands(app: typer.Typer) -> None:
    app.add_typer(facts_app, name="facts")
