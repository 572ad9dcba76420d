"""Applying the log to a projection version, from its checkpoint, in batches.

Each batch is one transaction: read the next events after the checkpoint
(below the snapshot horizon), fold them into the version's table, move the
checkpoint. A crash at any point loses nothing and applies nothing twice: the
rows and the checkpoint commit together, and applying is idempotent by stream
version anyway.

When the projection code raises on an event (a poison event), the batch is
applied up to the event before it, the checkpoint stops there, and the event
and error are recorded on the version; the runner stops until an operator
retries (after a fix) or skips the event.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import structlog

from ordertrail.db.connection import Connection
from ordertrail.eventstore.records import Cursor, RecordedEvent
from ordertrail.eventstore.store import EventStore
from ordertrail.projections import catalogue
from ordertrail.projections.items import FoldFailure, ItemProjection

__all__ = ["Batch", "ProjectionRunner"]

log = structlog.get_logger("ordertrail.projections")


class Batch(msgspec.Struct, frozen=True):
    """What one step of a runner did."""

    applied: int
    """Events read and applied (or found already applied)."""
    checkpoint: Cursor
    failure: FoldFailure | None = None
    seconds: float = 0.0


def _cursor(event: RecordedEvent) -> Cursor:
    return Cursor(event.transaction_id, event.position)


class ProjectionRunner:
    """Moves one projection version's checkpoint forward through the log."""

    def __init__(
        self,
        store: EventStore,
        projection: ItemProjection,
        name: str,
        *,
        batch_size: int = 5000,
        behind_writer: bool = False,
    ) -> None:
        self.store = store
        self.projection = projection
        self.name = name
        self.batch_size = batch_size
        self.behind_writer = behind_writer
        """Whether the inline writer keeps this version's rows current.

        If so, a settled step reads whole only the events its rows do not
        hold yet (an inline fold that failed, a commit from before a swap),
        and moves the checkpoint past the others.
        """

    async def step(self, connection: Connection, *, settled: bool = True) -> Batch:
        """Apply the next batch after the checkpoint, in one transaction."""
        started = time.perf_counter()
        async with connection.transaction():
            checkpoint = await self._locked_checkpoint(connection)
            cursors, events = await self._next(connection, checkpoint, settled=settled)
            if not cursors:
                return Batch(0, checkpoint)
            failure = await self._apply(connection, events) if events else None
            if failure is not None:
                stop = _cursor(failure.event)
                cursors = [cursor for cursor in cursors if cursor < stop]
                events = _before(events, failure.event)
                if events:
                    await self.projection.apply(connection, events)
                await catalogue.record_failure(
                    connection,
                    self.name,
                    self.projection.version,
                    failure.event.position,
                    failure.error,
                )
            if cursors:
                checkpoint = cursors[-1]
                await self._advance(connection, checkpoint, len(cursors))
        if failure is not None:
            log.error(
                "projection.failed",
                projection=self.name,
                version=self.projection.version,
                position=failure.event.position,
                order_id=failure.event.order_id,
                upc=failure.event.upc,
                error=failure.error,
            )
        return Batch(len(cursors), checkpoint, failure, time.perf_counter() - started)

    async def catch_up(
        self,
        connection: Connection,
        *,
        settled: bool = True,
        on_batch: Callable[[Batch], None] | None = None,
    ) -> Batch:
        """Step until no event is left (or one fails); return the last step."""
        while True:
            batch = await self.step(connection, settled=settled)
            if on_batch is not None and batch.applied:
                on_batch(batch)
            if batch.failure is not None or batch.applied < self.batch_size:
                return batch

    async def _next(
        self, connection: Connection, checkpoint: Cursor, *, settled: bool
    ) -> tuple[list[Cursor], list[RecordedEvent]]:
        # The cursors of the events to pass, and those of them to apply.
        if self.behind_writer and settled:
            scan = await self.store.scan_after(
                connection,
                checkpoint,
                self.batch_size,
                unreflected_in=self.projection.table,
            )
            return scan.cursors, scan.unreflected
        events = await self.store.read_after(
            connection, checkpoint, self.batch_size, settled=settled
        )
        return [_cursor(event) for event in events], events

    async def _apply(
        self, connection: Connection, events: list[RecordedEvent]
    ) -> FoldFailure | None:
        # Try the whole batch under a savepoint; if a fold failed, undo it so
        # the caller can apply only what comes before the earliest poison.
        savepoint = connection.transaction()
        await savepoint.start()
        try:
            applied = await self.projection.apply(connection, events)
        except BaseException:
            await savepoint.rollback()
            raise
        if applied.failures:
            await savepoint.rollback()
            return min(applied.failures, key=lambda f: _cursor(f.event))
        await savepoint.commit()
        return None

    async def _locked_checkpoint(self, connection: Connection) -> Cursor:
        row = await connection.fetchrow(
            "SELECT checkpoint_xid, checkpoint_position FROM projections "
            "WHERE name = $1 AND version = $2 FOR UPDATE",
            self.name,
            self.projection.version,
        )
        if row is None:
            msg = f"projection {self.name!r} has no version {self.projection.version}"
            raise LookupError(msg)
        return Cursor(row["checkpoint_xid"], row["checkpoint_position"])

    async def _advance(
        self, connection: Connection, checkpoint: Cursor, count: int
    ) -> None:
        await connection.execute(
            "UPDATE projections SET checkpoint_xid = $3::text::xid8, "
            "checkpoint_position = $4, events_applied = events_applied + $5, "
            "updated_at = now() WHERE name = $1 AND version = $2",
            self.name,
            self.projection.version,
            str(checkpoint.transaction_id),
            checkpoint.position,
            count,
        )


def _before(events: list[RecordedEvent], poison: RecordedEvent) -> list[RecordedEvent]:
    stop = _cursor(poison)
    return [event for event in events if _cursor(event) < stop]
