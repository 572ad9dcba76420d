"""What every command shares: settings, a database connection, durations."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import asyncpg
import click

from ordertrail.db.connection import Connection, connect, database_url
from ordertrail.lib.logging import configure_logging
from ordertrail.lib.settings import Settings, SettingsError

__all__ = [
    "COUNT",
    "DURATION",
    "POSITION",
    "QUARANTINE_ID",
    "TEXT",
    "VERSION",
    "load_settings",
    "with_connection",
    "with_connections",
]

T = TypeVar("T")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


class DurationType(click.ParamType[timedelta, object]):
    """A duration such as ``90s``, ``15m``, ``12h``, ``30d`` or ``2w``."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(str(value))
        if match is None:
            self.fail(
                f"{value!r} is not a duration like 90s, 15m, 12h, 30d or 2w", param, ctx
            )
        amount, unit = match.groups()
        return timedelta(seconds=int(amount) * _UNITS[unit])


DURATION = DurationType()


class StoredTextType(click.ParamType[str, object]):
    """Text that can be compared with what the database stores.

    The shell hands over bytes, and Python keeps those that are not UTF-8 as
    lone surrogates; such an argument can equal no stored value, and the
    database driver would refuse it with a traceback instead of a message.
    """

    name = "text"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        text = str(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(f"{text!r} is not UTF-8 text", param, ctx)
        return text


TEXT = StoredTextType()

_LARGEST_BIGINT = 2**63 - 1
# Numbers are checked against the columns they are compared with, so that one
# too large for PostgreSQL is a usage error rather than a driver traceback.
POSITION = click.IntRange(min=1, max=_LARGEST_BIGINT)
"""A position in the log."""
QUARANTINE_ID = click.IntRange(min=1, max=_LARGEST_BIGINT)
"""The id of a quarantined delivery."""
VERSION = click.IntRange(min=1, max=2**31 - 1)
"""A projection version."""
COUNT = click.IntRange(min=1, max=_LARGEST_BIGINT)
"""How many rows to show."""


def load_settings() -> Settings:
    """Read the settings, turning a bad variable into a usage error."""
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        raise click.UsageError(str(error)) from None
    configure_logging("warning", "console")
    return settings


def with_connection(
    settings: Settings, work: Callable[[Connection], Awaitable[T]]
) -> T:
    """Run ``work`` on one connection to the configured database."""
    return with_connections(settings, 1, lambda connections: work(connections[0]))


def with_connections(
    settings: Settings,
    count: int,
    work: Callable[[list[Connection]], Awaitable[T]],
) -> T:
    """Run ``work`` on ``count`` connections to the configured database."""

    async def run(dsn: str) -> T:
        connections: list[Connection] = []
        try:
            for _ in range(count):
                connections.append(await connect(dsn))
        except (OSError, asyncpg.PostgresError) as error:
            for connection in connections:
                await connection.close()
            raise click.ClickException(f"cannot reach the database: {error}") from None
        try:
            return await work(connections)
        finally:
            for connection in connections:
                await connection.close()

    with database_url(settings) as dsn:
        return asyncio.run(run(dsn))
