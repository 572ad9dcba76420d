"""Migrations: applied once, safely repeated, safe from two processes at once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ordertrail.db.migrate import MigrationError, apply_migrations, available, pending
from tests.support import with_database


async def applied_versions(connection: asyncpg.Connection) -> list[int]:
    rows = await connection.fetch(
        "SELECT version FROM schema_migrations ORDER BY version"
    )
    return [row["version"] for row in rows]


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [migration.version for migration in available()]

    assert versions == list(range(1, len(versions) + 1))


async def test_migrating_twice_applies_nothing_the_second_time(server_url: str) -> None:
    async with with_database(server_url) as url:
        connection = await asyncpg.connect(url)
        try:
            first = await apply_migrations(connection)
            second = await apply_migrations(connection)
            versions = await applied_versions(connection)
            left = await pending(connection)
        finally:
            await connection.close()

    assert [m.version for m in first] == [m.version for m in available()]
    assert second == []
    assert left == []
    assert versions == [m.version for m in available()]


async def test_two_connections_migrating_at_once_apply_each_migration_once(
    server_url: str,
) -> None:
    async with with_database(server_url) as url:
        connections = [await asyncpg.connect(url) for _ in range(2)]
        try:
            results = await asyncio.gather(
                *(apply_migrations(connection) for connection in connections)
            )
            versions = await applied_versions(connections[0])
            tables = await connections[0].fetchval(
                "SELECT count(*) FROM pg_tables "
                "WHERE tablename IN ('events', 'item_view_v1')"
            )
        finally:
            for connection in connections:
                await connection.close()

    everything = [m.version for m in available()]
    # One of them did the work; the other waited on the lock and found none.
    assert sorted(len(result) for result in results) == [0, len(everything)]
    assert versions == everything
    assert tables == 2


async def test_running_database_is_current(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as connection:
        assert await pending(connection) == []
        assert await apply_migrations(connection) == []


async def test_edited_migration_is_refused(server_url: str) -> None:
    async with with_database(server_url) as url:
        connection = await asyncpg.connect(url)
        try:
            await apply_migrations(connection)
            await connection.execute(
                "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1"
            )
            with pytest.raises(MigrationError, match="0001_event_store was changed"):
                await apply_migrations(connection)
            # The refused run left no lock behind for the next one.
            assert (
                await connection.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid()"
                )
                == 0
            )
        finally:
            await connection.close()
