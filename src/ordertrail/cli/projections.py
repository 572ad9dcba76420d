"""``ordertrail projections``: status, rebuild, skip, retry, drop-old."""

from __future__ import annotations

import sys

import click
import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ordertrail.cli.common import (
    POSITION,
    TEXT,
    VERSION,
    load_settings,
    with_connection,
    with_connections,
)
from ordertrail.db.connection import Connection
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.store import EventStore
from ordertrail.projections import catalogue, rebuild
from ordertrail.projections.catalogue import ProjectionState, ProjectionVersion
from ordertrail.projections.items import PROJECTION_NAME
from ordertrail.projections.runner import Batch
from ordertrail.projections.status import ProjectionStatus, statuses

__all__ = ["projections"]

NAME = click.argument("name", type=TEXT, default=PROJECTION_NAME, required=False)


@click.group()
def projections() -> None:
    """Read models built from the event log, and their versions."""


@projections.command("status")
@NAME
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def status(name: str, as_json: bool) -> None:
    """Show every version: state, checkpoint, head, lag, last error."""
    found = with_connection(load_settings(), lambda c: statuses(c, name))
    if as_json:
        for entry in found:
            click.echo(msgspec.json.encode(entry).decode())
        return
    table = Table()
    for heading in ("version", "table", "state", "checkpoint", "head", "lag", "error"):
        table.add_column(heading, no_wrap=heading != "error")
    for entry in found:
        table.add_row(
            str(entry.version),
            entry.table_name,
            entry.state,
            str(entry.checkpoint_position),
            str(entry.head_position),
            f"{entry.lag_events} events, {entry.lag_seconds:.1f} s",
            _error(entry),
        )
    Console().print(table)


def _error(entry: ProjectionStatus) -> str:
    if entry.error is None:
        return ""
    return f"at position {entry.error_position}: {entry.error}"


class _EventsPerSecond(ProgressColumn):
    """The rebuild's speed, in events a second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} events/s" if speed else "- events/s")


class _Position(ProgressColumn):
    """Where the rebuild is in the log, against its head."""

    def render(self, task: Task) -> Text:
        position = task.fields.get("position", 0)
        return Text(f"position {position:,}/{task.fields.get('head', 0):,}")


@projections.command("rebuild")
@NAME
@click.option(
    "--dry-run",
    is_flag=True,
    help="Build and compare with the served version, but do not swap.",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Start over instead of resuming an interrupted build (after a code change).",
)
@click.option(
    "--batch-size",
    default=5000,
    show_default=True,
    help="Events applied per transaction.",
)
def rebuild_command(name: str, dry_run: bool, fresh: bool, batch_size: int) -> None:
    """Build a new version from the log while the current one serves, then swap.

    The new version uses the configured vocabulary (ORDERTRAIL_VOCABULARY_FILE
    or the shipped one). An interrupted rebuild resumes where it stopped.
    """
    settings = load_settings()
    vocabulary = Vocabulary.load(settings.vocabulary_file)
    store = EventStore(redelivery_window=settings.redelivery_window)
    console = Console(stderr=True)

    async def run(connections: list[Connection]) -> int:
        # The second connection reads ahead while the first folds and writes.
        connection, reader = connections
        try:
            await rebuild.rebuild_lock(connection, name)
        except rebuild.RebuildBusy as busy:
            raise click.ClickException(str(busy)) from None
        record = await rebuild.begin(connection, vocabulary, name, fresh=fresh)
        console.print(
            f"building {name} version {record.version} into {record.table_name} "
            f"with {vocabulary.source}"
        )
        last = await _build(connection, record, store, batch_size, reader)
        if last.failure is not None:
            console.print(
                f"[red]stopped[/red] at position {last.failure.event.position}: "
                f"{last.failure.error}\nfix the projection and run again, or "
                f"`ordertrail projections skip {name} --position "
                f"{last.failure.event.position}`"
            )
            return 1
        await rebuild.prepare(connection, record)
        difference = await rebuild.differences(connection, record)
        console.print(
            f"{difference.differing:,} of {difference.compared:,} items differ "
            "from the served version"
        )
        for sample in difference.sample:
            console.print_json(msgspec.json.encode(sample).decode())
        if dry_run:
            console.print(
                "dry run: not swapped. The next rebuild starts afresh, with the "
                "code and vocabulary of its own time."
            )
            return 0
        swapped = await rebuild.swap(connection, record, store)
        console.print(
            f"[green]serving[/green] {name} version {swapped.version} "
            f"({swapped.table_name}); the old version stays until "
            f"`ordertrail projections drop-old {name}`"
        )
        return 0

    sys.exit(with_connections(settings, 2, run))


async def _build(
    connection: Connection,
    record: ProjectionVersion,
    store: EventStore,
    batch_size: int,
    reader: Connection,
) -> Batch:
    total = await connection.fetchval("SELECT count(*) FROM events")
    head = await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        _EventsPerSecond(),
        _Position(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(
            "rebuilding",
            total=max(total, record.events_applied),
            completed=record.events_applied,
            position=record.checkpoint_position,
            head=head,
        )

        def advance(batch: Batch) -> None:
            # The log grows while the rebuild runs; so does the goal.
            done = progress.tasks[0].completed + batch.applied
            progress.update(
                task,
                completed=done,
                total=max(progress.tasks[0].total or 0, done),
                position=batch.checkpoint.position,
                head=max(head, batch.checkpoint.position),
            )

        return await rebuild.build(
            connection,
            record,
            store,
            batch_size=batch_size,
            on_batch=advance,
            reader=reader,
        )


@projections.command("skip")
@NAME
@click.option(
    "--position", type=POSITION, required=True, help="The event to pass over."
)
@click.option(
    "--version",
    "version_number",
    type=VERSION,
    default=None,
    help="Default: the version that stopped on that position.",
)
@click.option("--reason", type=TEXT, default="", help="Kept with the skip.")
def skip(name: str, position: int, version_number: int | None, reason: str) -> None:
    """Pass over an event a version's code cannot apply, and resume it."""

    async def run(connection: Connection) -> ProjectionVersion:
        version = await _version_for(connection, name, version_number, position)
        async with connection.transaction():
            await catalogue.add_skip(
                connection, name, version.version, position, reason
            )
            await catalogue.clear_failure(connection, name, version.version)
        return version

    version = with_connection(load_settings(), run)
    click.echo(f"{name} version {version.version} will pass over position {position}")


@projections.command("retry")
@NAME
@click.option(
    "--version",
    "version_number",
    type=VERSION,
    default=None,
    help="Default: the served version.",
)
def retry(name: str, version_number: int | None) -> None:
    """Let a failed version try its event again (after a fix)."""

    async def run(connection: Connection) -> tuple[int, bool]:
        version = await _version_for(connection, name, version_number, None)
        return version.version, await catalogue.clear_failure(
            connection, name, version.version
        )

    number, cleared = with_connection(load_settings(), run)
    click.echo(
        f"{name} version {number} "
        + ("will try again" if cleared else "had not failed; nothing to retry")
    )


@projections.command("drop-old")
@NAME
def drop_old(name: str) -> None:
    """Drop the tables of retired versions."""
    dropped = with_connection(load_settings(), lambda c: rebuild.drop_retired(c, name))
    for table in dropped:
        click.echo(f"dropped {table}")
    if not dropped:
        click.echo("no retired version to drop")


async def _version_for(
    connection: Connection, name: str, number: int | None, position: int | None
) -> ProjectionVersion:
    found = await catalogue.versions(connection, name)
    if number is not None:
        chosen = [v for v in found if v.version == number]
    else:
        failed_there = [
            v for v in found if position is not None and v.error_position == position
        ]
        chosen = failed_there or [
            v for v in found if v.state is ProjectionState.SERVING
        ]
    if not chosen:
        raise click.ClickException(f"no such version of projection {name!r}")
    return chosen[0]
