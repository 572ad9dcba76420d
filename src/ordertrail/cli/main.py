"""The ``ordertrail`` command: serve, migrate, credentials, quarantine, tests."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path

import click

from ordertrail import __version__
from ordertrail.cli.audit import audit, start_checkpointer
from ordertrail.cli.common import DURATION, load_settings, with_connection
from ordertrail.cli.credentials import keys, tokens
from ordertrail.cli.history import export, replay_order
from ordertrail.cli.projections import projections
from ordertrail.cli.quarantine import quarantine
from ordertrail.cli.send_test import send_test
from ordertrail.db.connection import Connection, database_url
from ordertrail.db.migrate import Migration, apply_migrations

__all__ = ["cli"]


@click.group()
@click.version_option(__version__, prog_name="ordertrail")
def cli() -> None:
    """Receive Locally webhooks as events and serve item and order state.

    Configuration comes from ORDERTRAIL_* environment variables; with no
    ORDERTRAIL_DATABASE_URL, an embedded PostgreSQL keeps its data in
    ORDERTRAIL_DATA_DIR (default ~/.local/share/ordertrail).
    """


@cli.command()
def migrate() -> None:
    """Apply pending schema migrations (safe to run twice, or from two places)."""
    settings = load_settings()

    async def run(connection: Connection) -> list[Migration]:
        return await apply_migrations(connection)

    applied = with_connection(settings, run)
    for migration in applied:
        click.echo(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        click.echo("schema is current")


@cli.command()
@click.option("--host", default=None, help="Default: ORDERTRAIL_HOST or 127.0.0.1.")
@click.option(
    "--port", type=int, default=None, help="Default: ORDERTRAIL_PORT or 8000."
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Server processes; each runs its own writer and pool.",
)
@click.option(
    "--checkpoint-every",
    type=DURATION,
    default=None,
    help="Also record a signed audit checkpoint this often (such as 1h); "
    "needs ORDERTRAIL_AUDIT_KEY.",
)
def serve(
    host: str | None, port: int | None, workers: int, checkpoint_every: timedelta | None
) -> None:
    """Serve the webhook endpoint and the read API."""
    from granian.constants import HTTPModes, Interfaces, Loops  # noqa: PLC0415
    from granian.server import Server  # noqa: PLC0415 - only needed here

    settings = load_settings()
    host = host or settings.host
    port = port or settings.port
    with database_url(settings) as dsn:
        # Workers are separate processes: they find the database (embedded
        # or not) through the environment, and migrate before serving.
        os.environ["ORDERTRAIL_DATABASE_URL"] = dsn
        asyncio.run(_migrate(dsn))
        if checkpoint_every is not None:
            start_checkpointer(settings, dsn, checkpoint_every)
        where = (
            "external PostgreSQL"
            if settings.database_url
            else f"embedded PostgreSQL, data in {settings.pgdata}"
        )
        click.echo(
            f"ordertrail {__version__} on http://{host}:{port} ({where})", err=True
        )
        click.echo(f"API reference: http://{host}:{port}/schema", err=True)
        # As the benchmarks serve (bench/servers.py; granian picks uvloop
        # there once it is installed): uvloop, whose loop wakes and socket
        # calls cost less than asyncio's own, and HTTP/1.1 alone, what Locally
        # and the readers speak; no route needs WebSockets.
        Server(
            "ordertrail.api.app:create_app",
            address=host,
            port=port,
            interface=Interfaces.ASGI,
            http=HTTPModes.http1,
            websockets=False,
            loop=Loops.uvloop,
            workers=workers,
            factory=True,
            log_access=False,
        ).serve()


async def _migrate(dsn: str) -> None:
    from ordertrail.db.connection import connect  # noqa: PLC0415

    connection = await connect(dsn)
    try:
        await apply_migrations(connection)
    finally:
        await connection.close()


@cli.group()
def schemas() -> None:
    """The committed OpenAPI document and webhook payload JSON Schema."""


@schemas.command("write")
@click.option(
    "--folder",
    type=click.Path(path_type=Path),
    default=Path("schemas"),
    show_default=True,
)
def write(folder: Path) -> None:
    """Write the schema files as the code defines them."""
    from ordertrail.api.schemas import write_schemas  # noqa: PLC0415

    for path in write_schemas(folder):
        click.echo(f"wrote {path}")


@schemas.command("check")
@click.option(
    "--folder",
    type=click.Path(path_type=Path),
    default=Path("schemas"),
    show_default=True,
)
def check(folder: Path) -> None:
    """Exit non-zero if a committed schema file differs from the code."""
    from ordertrail.api.schemas import stale_schemas  # noqa: PLC0415

    stale = stale_schemas(folder)
    for name in stale:
        click.echo(f"stale: {folder / name} (run `make schemas`)", err=True)
    if stale:
        raise SystemExit(1)
    click.echo("schemas are current")


cli.add_command(tokens)
cli.add_command(keys)
cli.add_command(quarantine)
cli.add_command(projections)
cli.add_command(send_test)
cli.add_command(replay_order)
cli.add_command(export)
cli.add_command(audit)


if __name__ == "__main__":
    cli()
