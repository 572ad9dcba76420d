"""Plain SQL migrations, applied in order and recorded.

Each file in ``migrations/`` is named ``NNNN_description.sql`` and runs in its
own transaction. A session advisory lock makes concurrent runs (two services
starting at once) wait for each other, and a recorded checksum catches a
migration that was edited after it was applied.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import structlog

from ordertrail.db.connection import Connection

__all__ = ["Migration", "MigrationError", "apply_migrations", "available", "pending"]

log = structlog.get_logger("ordertrail.db")

# Any constant works; it only has to be the same in every process.
_MIGRATION_LOCK = 0x6F7264657274  # "ordert"


class MigrationError(RuntimeError):
    """The database's recorded migrations do not match the code's."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file of the schema's history."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text, recorded when it is applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """Return the migrations shipped with the code, oldest first."""
    folder = resources.files("ordertrail.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(
                Migration(int(number), rest.removesuffix(".sql"), entry.read_text())
            )
    return sorted(found, key=lambda migration: migration.version)


async def _ensure_history(connection: Connection) -> None:
    await connection.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


async def pending(connection: Connection) -> list[Migration]:
    """Return the migrations not yet applied; raise if history disagrees."""
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations')")
    applied: dict[int, str] = {}
    if exists is not None:
        rows = await connection.fetch("SELECT version, checksum FROM schema_migrations")
        applied = {row["version"]: row["checksum"] for row in rows}
    todo = []
    for migration in available():
        recorded = applied.get(migration.version)
        if recorded is None:
            todo.append(migration)
        elif recorded != migration.checksum:
            msg = (
                f"migration {migration.version:04d}_{migration.name} was changed "
                "after it was applied; add a new migration instead"
            )
            raise MigrationError(msg)
    return todo


async def apply_migrations(connection: Connection) -> list[Migration]:
    """Apply every pending migration and return the ones applied."""
    await connection.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await _ensure_history(connection)
        todo = await pending(connection)
        for migration in todo:
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info(
                "migration.applied", version=migration.version, name=migration.name
            )
        return todo
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
