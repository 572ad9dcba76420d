"""``ordertrail quarantine``: look at unreadable deliveries, feed them back."""

from __future__ import annotations

import click
import msgspec
from rich.console import Console
from rich.table import Table

from ordertrail.cli.common import COUNT, QUARANTINE_ID, load_settings, with_connection
from ordertrail.db.connection import Connection
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.store import EventStore
from ordertrail.ingest import quarantine as held
from ordertrail.projections.served import ServedProjection

__all__ = ["quarantine"]


@click.group()
def quarantine() -> None:
    """Authenticated deliveries that could not be read as Locally webhooks."""


@quarantine.command("list")
@click.option(
    "--all",
    "include_released",
    is_flag=True,
    help="Include deliveries already released into the log.",
)
@click.option("--limit", type=COUNT, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def list_quarantine(include_released: bool, limit: int, as_json: bool) -> None:
    """List quarantined deliveries, oldest first."""
    found = with_connection(
        load_settings(),
        lambda c: held.list_held(c, include_released=include_released, limit=limit),
    )
    if as_json:
        for item in found:
            click.echo(msgspec.json.encode(_public(item)).decode())
        return
    table = Table("id", "received", "mode", "bytes", "reason", "released")
    for item in found:
        table.add_row(
            str(item.id),
            item.received_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
            item.mode,
            str(item.body_length) + (" (cut)" if item.truncated else ""),
            item.reason,
            f"position {item.released_position}" if item.released_at else "-",
        )
    Console().print(table)


@quarantine.command("show")
@click.argument("quarantine_id", type=QUARANTINE_ID)
def show_quarantine(quarantine_id: int) -> None:
    """Show one quarantined delivery with its raw body."""
    found = with_connection(load_settings(), lambda c: held.show(c, quarantine_id))
    if found is None:
        raise click.ClickException(f"no quarantined delivery {quarantine_id}")
    document = msgspec.json.encode(_public(found))
    click.echo(msgspec.json.format(document, indent=2).decode())


@quarantine.command("retry")
@click.argument("quarantine_ids", type=QUARANTINE_ID, nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Retry every open one.")
def retry_quarantine(quarantine_ids: tuple[int, ...], retry_all: bool) -> None:
    """Read quarantined deliveries again; append those that now read as webhooks."""
    if not quarantine_ids and not retry_all:
        raise click.UsageError("name quarantine ids, or pass --all")
    settings = load_settings()

    async def retry(connection: Connection) -> list[held.Release]:
        ids = list(quarantine_ids)
        if retry_all:
            ids += [q.id for q in await held.list_held(connection, limit=100_000)]
        store = EventStore(redelivery_window=settings.redelivery_window)
        served = ServedProjection(store, Vocabulary.load(settings.vocabulary_file))
        return [await held.release(connection, store, served, i) for i in ids]

    outcomes = with_connection(settings, retry)
    for outcome in outcomes:
        if outcome.released:
            click.echo(f"{outcome.id}: released as position {outcome.position}")
        else:
            click.echo(f"{outcome.id}: kept: {outcome.reason}")
    if any(not outcome.released for outcome in outcomes):
        raise SystemExit(1)


def _public(item: held.Quarantined) -> dict[str, object]:
    document = msgspec.to_builtins(item)
    assert isinstance(document, dict)
    try:
        document["raw_body"] = item.raw_body.decode("utf-8")
    except UnicodeDecodeError:
        document["raw_body"] = None
    document["raw_body_hex"] = item.raw_body.hex()
    return document
