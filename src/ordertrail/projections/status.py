"""How far each projection version is behind the log, for operators."""

from __future__ import annotations

from datetime import datetime

import msgspec

from ordertrail.db.connection import Connection
from ordertrail.projections import catalogue
from ordertrail.projections.catalogue import ProjectionState, ProjectionVersion

__all__ = ["ProjectionStatus", "statuses"]

# A served version further behind than this many events is catching up
# rather than live (the runner applies thousands per batch).
_LIVE_LAG = 1000


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One projection version as an operator sees it."""

    name: str
    version: int
    table_name: str
    state: str
    """live, catching-up, rebuilding, failed or retired."""
    checkpoint_position: int
    head_position: int
    """The highest position in the log."""
    lag_events: int
    """Events after the checkpoint."""
    lag_seconds: float
    """How long the oldest event after the checkpoint has waited."""
    events_applied: int
    vocabulary_digest: str | None
    error: str | None
    error_position: int | None
    failed_at: datetime | None
    swapped_at: datetime | None
    updated_at: datetime


async def statuses(
    connection: Connection, name: str | None = None
) -> list[ProjectionStatus]:
    """Return the status of every version (of ``name``, or of all)."""
    head = await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")
    return [
        await _status(connection, version, head)
        for version in await catalogue.versions(connection, name)
    ]


async def _status(
    connection: Connection, version: ProjectionVersion, head: int
) -> ProjectionStatus:
    lag = (
        await connection.fetchrow(
            """
        SELECT count(*) AS events,
               coalesce(extract(epoch FROM now() - min(received_at)), 0) AS seconds
        FROM events
        WHERE (transaction_id, position) > ($1::text::xid8, $2)
        """,
            str(version.checkpoint_xid),
            version.checkpoint_position,
        )
        if version.state is not ProjectionState.RETIRED
        else None
    )
    events = int(lag["events"]) if lag else 0
    return ProjectionStatus(
        name=version.name,
        version=version.version,
        table_name=version.table_name,
        state=_state(version, events),
        checkpoint_position=version.checkpoint_position,
        head_position=int(head),
        lag_events=events,
        lag_seconds=float(lag["seconds"]) if lag else 0.0,
        events_applied=version.events_applied,
        vocabulary_digest=version.vocabulary_digest,
        error=version.error,
        error_position=version.error_position,
        failed_at=version.failed_at,
        swapped_at=version.swapped_at,
        updated_at=version.updated_at,
    )


def _state(version: ProjectionVersion, lag: int) -> str:
    if version.failed:
        return "failed"
    if version.state is ProjectionState.BUILDING:
        return "rebuilding"
    if version.state is ProjectionState.RETIRED:
        return "retired"
    return "live" if lag <= _LIVE_LAG else "catching-up"
