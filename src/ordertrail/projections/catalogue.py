"""The catalogue of projection versions: what is served, built, retired.

Each version of a projection owns a table and remembers the vocabulary it
was built with, its checkpoint (the place in the log up to which every event
is in its table), and, when its code failed on an event, that event and the
error. Readers reach the served version through a view named after the
projection; a swap replaces the view in the same transaction that changes the
states, so a reader sees either the old version or the new one, never a mix.
"""

from __future__ import annotations

import enum
import functools
from datetime import datetime

import msgspec

from ordertrail.db.connection import Connection
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import Cursor

__all__ = [
    "PROJECTIONS_CHANNEL",
    "ProjectionState",
    "ProjectionVersion",
    "add_skip",
    "adopt_vocabulary",
    "clear_failure",
    "find",
    "record_failure",
    "served",
    "skipped_positions",
    "versions",
]

PROJECTIONS_CHANNEL = "ordertrail_projections"


class ProjectionState(enum.StrEnum):
    """Where a version is in its life."""

    SERVING = "serving"
    BUILDING = "building"
    RETIRED = "retired"


class ProjectionVersion(msgspec.Struct, frozen=True, kw_only=True):
    """One version of a projection, as the catalogue records it."""

    name: str
    version: int
    table_name: str
    state: ProjectionState
    checkpoint_xid: int
    checkpoint_position: int
    vocabulary: str | None
    vocabulary_digest: str | None
    target_position: int | None
    events_applied: int
    started_at: datetime
    swapped_at: datetime | None
    retired_at: datetime | None
    failed_at: datetime | None
    error: str | None
    error_position: int | None
    created_at: datetime
    updated_at: datetime
    bulk_horizon_xid: int | None
    bulk_horizon_position: int | None
    bulk_after: list[str] | None
    """The last stream (mode, order_id, upc) the bulk phase wrote."""
    bulk_done: bool
    prepared_at: datetime | None

    @property
    def bulk_horizon(self) -> Cursor:
        """Where the stream-by-stream phase of a rebuild stops."""
        return Cursor(self.bulk_horizon_xid or 0, self.bulk_horizon_position or 0)

    @property
    def checkpoint(self) -> Cursor:
        """The place in the log up to which every event is applied."""
        return Cursor(self.checkpoint_xid, self.checkpoint_position)

    @property
    def failed(self) -> bool:
        """Whether the version stopped on an event its code could not apply."""
        return self.failed_at is not None

    def vocabulary_or(self, fallback: Vocabulary) -> Vocabulary:
        """Return the vocabulary this version was built with."""
        if self.vocabulary is None:
            return fallback
        return _recorded_vocabulary(self.vocabulary, f"{self.table_name} (recorded)")


@functools.lru_cache(maxsize=16)
def _recorded_vocabulary(text: str, source: str) -> Vocabulary:
    # The runner asks for its version's vocabulary at every catch-up, and a
    # catch-up follows each commit: parsing the TOML anew cost more than the
    # catch-up itself. One instance per text also keeps its lookups warm.
    return Vocabulary.parse(text, source=source)


_COLUMNS = ", ".join(ProjectionVersion.__struct_fields__)


async def versions(
    connection: Connection, name: str | None = None
) -> list[ProjectionVersion]:
    """Return every version (of ``name``, or of all projections), newest first."""
    rows = await connection.fetch(
        f"SELECT {_COLUMNS} FROM projections WHERE $1::text IS NULL OR name = $1 "
        "ORDER BY name, version DESC",
        name,
    )
    return [msgspec.convert(dict(row.items()), ProjectionVersion) for row in rows]


async def find(
    connection: Connection, name: str, version: int
) -> ProjectionVersion | None:
    """Return one version, or ``None``."""
    row = await connection.fetchrow(
        f"SELECT {_COLUMNS} FROM projections WHERE name = $1 AND version = $2",
        name,
        version,
    )
    return msgspec.convert(dict(row.items()), ProjectionVersion) if row else None


async def served(connection: Connection, name: str) -> ProjectionVersion:
    """Return the version readers are served."""
    row = await connection.fetchrow(
        f"SELECT {_COLUMNS} FROM projections WHERE name = $1 AND state = 'serving'",
        name,
    )
    if row is None:
        msg = f"no version of projection {name!r} is being served"
        raise LookupError(msg)
    return msgspec.convert(dict(row.items()), ProjectionVersion)


async def adopt_vocabulary(
    connection: Connection, name: str, vocabulary: Vocabulary
) -> None:
    """Record ``vocabulary`` on the served version if it has none yet.

    The first version is created by a migration, before any vocabulary is
    known; it adopts the one the service starts with.
    """
    await connection.execute(
        "UPDATE projections SET vocabulary = $2, vocabulary_digest = $3, "
        "updated_at = now() "
        "WHERE name = $1 AND state = 'serving' AND vocabulary IS NULL",
        name,
        vocabulary.text,
        vocabulary.digest,
    )


async def skipped_positions(
    connection: Connection, name: str, version: int
) -> frozenset[int]:
    """Return the positions an operator told this version to skip."""
    rows = await connection.fetch(
        "SELECT position FROM projection_skips WHERE name = $1 AND version = $2",
        name,
        version,
    )
    return frozenset(row["position"] for row in rows)


async def add_skip(
    connection: Connection, name: str, version: int, position: int, reason: str
) -> None:
    """Record that ``version`` passes over the event at ``position``."""
    await connection.execute(
        "INSERT INTO projection_skips (name, version, position, reason) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        name,
        version,
        position,
        reason,
    )


async def record_failure(
    connection: Connection, name: str, version: int, position: int, error: str
) -> None:
    """Record the event a version's code failed on; its runner stops there."""
    await connection.execute(
        "UPDATE projections SET failed_at = now(), error = $3, error_position = $4, "
        "updated_at = now() WHERE name = $1 AND version = $2",
        name,
        version,
        error,
        position,
    )


async def clear_failure(connection: Connection, name: str, version: int) -> bool:
    """Let a failed version's runner try again; return whether it had failed."""
    status = await connection.execute(
        "UPDATE projections SET failed_at = NULL, error = NULL, error_position = NULL, "
        "updated_at = now() WHERE name = $1 AND version = $2 AND failed_at IS NOT NULL",
        name,
        version,
    )
    return status.endswith(" 1")
