"""``ordertrail replay`` and ``ordertrail export``: an order's history, the log."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import BinaryIO

import click
import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ordertrail.audit.chains import Finding, chain_event, check_stream
from ordertrail.audit.export import export_lines
from ordertrail.audit.history import (
    AsOf,
    InvalidAsOf,
    ReplayStep,
    parse_as_of,
    past_events,
    replay,
)
from ordertrail.audit.settle import LogNotSettled, settled_position
from ordertrail.cli.common import POSITION, TEXT, load_settings, with_connection
from ordertrail.db.connection import Connection
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import RecordedEvent
from ordertrail.eventstore.store import EventStore
from ordertrail.lib.settings import Settings
from ordertrail.projections import catalogue
from ordertrail.projections.items import PROJECTION_NAME, ItemProjection
from ordertrail.projections.orders import roll_up
from ordertrail.projections.served import ServedProjection

__all__ = ["export", "replay_order"]

_MODES = click.Choice(["live", "test"])


class AsOfType(click.ParamType[AsOf, object]):
    """A global position or an RFC 3339 timestamp with an offset."""

    name = "position|timestamp"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> AsOf:
        if isinstance(value, AsOf):
            return value
        try:
            as_of = parse_as_of(str(value))
            if as_of.moment is not None:
                # A time whose offset carries it past year 1 or 9999 has no
                # UTC value to compare receive times with.
                as_of.moment.astimezone(UTC)
        except InvalidAsOf as error:
            self.fail(str(error), param, ctx)
        except OverflowError:
            self.fail(f"{value!r} is out of the range of dates", param, ctx)
        return as_of


@click.command("replay")
@click.argument("order_id", type=TEXT)
@click.option("--upc", type=TEXT, default=None, help="Only this item of the order.")
@click.option("--mode", type=_MODES, default="live", show_default=True)
@click.option(
    "--as-of",
    type=AsOfType(),
    default=None,
    help="Stop at a global position, or at an RFC 3339 time (received at or before).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per event.")
def replay_order(
    order_id: str, upc: str | None, mode: str, as_of: AsOf | None, as_json: bool
) -> None:
    """Replay an order's events through the item lifecycle, one row per event.

    Each row shows what Locally said, what the vocabulary makes of it, and the
    item's state right after it; anomalies, unrecognized statuses and
    redeliveries are marked, and so is any event whose hash chain disagrees.
    The lifecycle code and vocabulary are those of the served item projection,
    as for the live view.
    """
    settings = load_settings()

    async def read(
        connection: Connection,
    ) -> tuple[list[RecordedEvent], ItemProjection]:
        events = await past_events(connection, mode, order_id, as_of, upc=upc)
        return events, await _served_projection(connection, settings)

    events, projection = with_connection(settings, read)
    if not events:
        scope = f"UPC {upc} of order {order_id}" if upc else f"order {order_id}"
        when = f" as of {as_of.text}" if as_of is not None else ""
        raise click.ClickException(f"no {mode} events for {scope}{when}")
    steps = list(replay(projection, events))
    tampered = _chain_findings(events)
    if as_json:
        for step in steps:
            click.echo(_step_json(step, tampered.get(step.event.position, [])))
        return
    console = Console()
    if not console.is_terminal:
        # Piped to a file or a pager: no terminal width to squeeze into.
        console = Console(width=200)
    console.print(_steps_table(order_id, mode, as_of, steps, tampered))
    if any(step.item is not None for step in steps):
        console.print(_items_table(steps))


async def _served_projection(
    connection: Connection, settings: Settings
) -> ItemProjection:
    served = await catalogue.served(connection, PROJECTION_NAME)
    holder = ServedProjection(EventStore(), Vocabulary.load(settings.vocabulary_file))
    return await holder.load(connection, served.version)


def _chain_findings(events: list[RecordedEvent]) -> dict[int, list[Finding]]:
    streams: dict[str, list[RecordedEvent]] = {}
    for event in events:
        streams.setdefault(event.upc, []).append(event)
    by_position: dict[int, list[Finding]] = {}
    for stream in streams.values():
        ordered = sorted(stream, key=lambda e: (e.version, e.position))
        for finding in check_stream([chain_event(e) for e in ordered]):
            for position in (finding.position, finding.other_position):
                if position is not None:
                    by_position.setdefault(position, []).append(finding)
    return by_position


def _marks(step: ReplayStep, findings: list[Finding]) -> Text:
    marks = Text()
    if step.refused is not None:
        marks.append(f"not applied: {step.refused} ", style="bold red")
    for kind in step.anomalies:
        marks.append(f"anomaly: {kind} ", style="bold red")
    if step.unrecognized and not step.redelivery:
        marks.append("unrecognized status ", style="yellow")
    for finding in findings:
        marks.append(f"TAMPERED: {finding.kind.value} ", style="bold white on red")
    return marks


def _steps_table(
    order_id: str,
    mode: str,
    as_of: AsOf | None,
    steps: list[ReplayStep],
    tampered: dict[int, list[Finding]],
) -> Table:
    title = f"{mode} order {order_id}" + (
        f" as of {as_of.text}" if as_of is not None else ""
    )
    table = Table(title=title, title_justify="left")
    table.add_column("position", justify="right", no_wrap=True)
    table.add_column("version", justify="right")
    table.add_column("upc", no_wrap=True)
    table.add_column("received (UTC)", no_wrap=True)
    table.add_column("raw status")
    table.add_column("meaning")
    table.add_column("redelivery")
    table.add_column("state after")
    table.add_column("fulfilment")
    table.add_column("refund")
    table.add_column("marks")
    for step in steps:
        event = step.event
        meaning = (
            Text(step.meaning.transition.value)
            if step.meaning is not None
            else Text("unrecognized", style="yellow")
        )
        item = step.item
        table.add_row(
            str(event.position),
            str(event.version),
            event.upc,
            event.received_at.strftime("%Y-%m-%d %H:%M:%S"),
            event.raw_status,
            meaning,
            f"of {event.redelivery_of}" if step.redelivery else "",
            item.state if item is not None else "-",
            item.fulfilment if item is not None else "-",
            item.refund if item is not None else "-",
            _marks(step, tampered.get(event.position, [])),
        )
    return table


def _items_table(steps: list[ReplayStep]) -> Table:
    last = {step.event.upc: step.item for step in steps if step.item is not None}
    order = roll_up(list(last.values()))
    table = Table(
        title=f"order state: {order.state}, refund {order.refund}, "
        f"{order.anomaly_count} anomalies, {order.message_count} messages",
        title_justify="left",
    )
    for heading in ("upc", "state", "fulfilment", "refund", "events", "redeliveries"):
        table.add_column(heading)
    for item in order.items:
        table.add_row(
            item.upc,
            item.state,
            item.fulfilment,
            item.refund,
            str(item.event_count),
            str(item.redelivery_count),
        )
    return table


def _step_json(step: ReplayStep, findings: list[Finding]) -> str:
    event = step.event
    document = {
        "position": event.position,
        "version": event.version,
        "upc": event.upc,
        "received_at": event.received_at,
        "raw_status": event.raw_status,
        "meaning": step.meaning.transition.value if step.meaning else None,
        "unrecognized": step.unrecognized,
        "redelivery_of": event.redelivery_of,
        "state": step.item.state if step.item is not None else None,
        "fulfilment": step.item.fulfilment if step.item is not None else None,
        "refund": step.item.refund if step.item is not None else None,
        "anomalies": step.anomalies,
        "refused": step.refused,
        "tampering": [finding.kind.value for finding in findings],
    }
    return msgspec.json.encode(document).decode()


@click.command("export")
@click.option(
    "--mode", type=_MODES, default=None, help="Only this mode; both if unset."
)
@click.option("--from-position", type=POSITION, default=1, show_default=True)
@click.option(
    "--to-position",
    type=POSITION,
    default=None,
    help="Default, and at most: the settled position, below which the log can "
    "no longer change.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write (complete or not at all); standard output if unset.",
)
def export(
    mode: str | None, from_position: int, to_position: int | None, output: Path | None
) -> None:
    """Write every event of a position range as NDJSON, with a summary line.

    raw_body is base64, hashes are hex; the last line gives the count and the
    head of every stream. Check the file with `ordertrail audit verify-export`.
    """
    settings = load_settings()

    async def write(connection: Connection) -> tuple[int, int]:
        try:
            settled = await settled_position(connection)
        except LogNotSettled as error:
            raise click.ClickException(str(error)) from None
        upper = settled if to_position is None else min(to_position, settled)
        lines = 0
        with _destination(output) as stream:
            async for chunk in export_lines(
                connection, mode=mode, from_position=from_position, to_position=upper
            ):
                stream.write(chunk)
                lines += chunk.count(b"\n")
        return upper, lines - 2

    upper, count = with_connection(settings, write)
    where = str(output) if output is not None else "standard output"
    click.echo(
        f"exported {count} events, positions {from_position} to {upper}, to {where}",
        err=True,
    )


@contextlib.contextmanager
def _destination(output: Path | None) -> Iterator[BinaryIO]:
    if output is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    # Written beside the target and renamed at the end, so a file by that
    # name is always a whole export.
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("wb") as stream:
            yield stream
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
