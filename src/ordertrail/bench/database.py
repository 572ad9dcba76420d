"""The benchmark's database: found, created fresh for one run, then dropped.

A fresh database per run keeps runs comparable (the event table starts empty)
and leaves nothing behind on a shared server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import asyncpg

from ordertrail.auth.credentials import CredentialKind, create_credential
from ordertrail.db.connection import connect, embedded_server
from ordertrail.db.migrate import apply_migrations
from ordertrail.lib.settings import Settings

__all__ = [
    "DEFAULT_URL",
    "BenchDatabase",
    "bench_database",
    "count_rows",
    "count_transactions",
    "describe_url",
    "find_server",
]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
"""The server tried when no URL is configured."""

_ENVIRONMENT = ("ORDERTRAIL_DATABASE_URL", "ORDERTRAIL_BENCH_DATABASE_URL")


@dataclass(frozen=True)
class BenchDatabase:
    """A database made for one run, migrated, with a live webhook token."""

    url: str
    name: str
    server_version: str
    token: str


@contextlib.asynccontextmanager
async def find_server() -> AsyncIterator[tuple[str, str]]:
    """Yield the URL of a PostgreSQL server to benchmark on, and where it came from.

    Configured URLs come first, then the local default if it answers, and
    last an embedded server in a temporary directory, stopped on exit.
    """
    for variable in _ENVIRONMENT:
        url = os.environ.get(variable)
        if url:
            yield url, variable
            return
    if await _answers(DEFAULT_URL):
        yield DEFAULT_URL, "default local server"
        return
    with (
        tempfile.TemporaryDirectory(prefix="ordertrail-bench-") as data_dir,
        embedded_server(Settings(data_dir=data_dir)) as url,
    ):
        yield url, "embedded server"


async def _answers(url: str) -> bool:
    try:
        connection = await asyncpg.connect(url, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True


@contextlib.asynccontextmanager
async def bench_database(server_url: str) -> AsyncIterator[BenchDatabase]:
    """Create, migrate and finally drop a database named ``ordertrail_bench_<hex>``."""
    name = f"ordertrail_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = urlsplit(server_url)._replace(path=f"/{name}").geturl()
    try:
        connection = await connect(url)
        try:
            await apply_migrations(connection)
            issued = await create_credential(
                connection, CredentialKind.WEBHOOK_TOKEN, mode="live", label="bench"
            )
            version = await connection.fetchval("SHOW server_version")
        finally:
            await connection.close()
        yield BenchDatabase(url, name, str(version).split()[0], issued.secret)
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            # FORCE ends the servers' pooled connections if they outlived us.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def count_rows(url: str, table: str) -> int:
    """Return the number of rows in ``table``."""
    connection = await asyncpg.connect(url)
    try:
        # The table name is one of ours, never input.
        count = await connection.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await connection.close()
    return int(count)


async def count_transactions(url: str) -> int:
    """Return how many transactions wrote the events table.

    Each event records the id of the transaction that appended it, so events
    over transactions is how many deliveries a group commit shared on average.
    """
    connection = await asyncpg.connect(url)
    try:
        count = await connection.fetchval(
            "SELECT count(DISTINCT transaction_id) FROM events"
        )
    finally:
        await connection.close()
    return int(count)


def describe_url(url: str) -> str:
    """Return ``url`` without its user and password, fit to print."""
    parts = urlsplit(url)
    where = parts.hostname or ""
    if parts.port:
        where += f":{parts.port}"
    # Of the query, only a socket directory says where; the rest may be secret.
    socket = parse_qs(parts.query).get("host")
    return f"{parts.scheme}://{where}{parts.path}" + (
        f"?host={socket[0]}" if socket else ""
    )
