"""Rebuilding a projection into a new version while the old one serves.

1. ``begin``: create version N+1 (its own table) in state ``building``, with
   the vocabulary it is built with. An unfinished build with the same
   vocabulary is resumed from its checkpoint instead.
2. ``build``: run its runner from position 0 to the head of the log. The
   served version keeps answering reads and taking inline updates meanwhile.
3. ``prepare``: add the read indexes, and compare with the served version:
   rows whose content is the same keep their place in the change feed, rows
   that differ are marked to be announced again at the swap.
4. ``swap``: one transaction takes the exclusive side of the swap lock (new
   appends wait, reads go on), applies the last events, announces the rows
   that differ, makes N+1 the served version and points the readers' view at
   its table. The old table stays until ``drop_retired``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import structlog

from ordertrail.db.connection import Connection
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import Cursor, StreamKey
from ordertrail.eventstore.store import EventStore
from ordertrail.projections import catalogue
from ordertrail.projections.catalogue import ProjectionState, ProjectionVersion
from ordertrail.projections.items import (
    PROJECTION_NAME,
    VIEW_COLUMNS,
    FoldFailure,
    ItemProjection,
    ItemView,
    create_view_indexes,
    create_view_table,
)
from ordertrail.projections.runner import Batch, ProjectionRunner

__all__ = [
    "Difference",
    "RebuildBusy",
    "begin",
    "build",
    "differences",
    "drop_retired",
    "prepare",
    "rebuild_lock",
    "swap",
]

log = structlog.get_logger("ordertrail.projections")

# Compared to tell whether a rebuilt row says something new.
_CONTENT = [c for c in VIEW_COLUMNS if c not in {"mode", "order_id", "upc"}]
_SAME = (
    "("
    + ", ".join(f"n.{c}" for c in _CONTENT)
    + ") IS NOT DISTINCT FROM ("
    + ", ".join(f"o.{c}" for c in _CONTENT)
    + ")"
)
_KEYS_MATCH = "n.mode = o.mode AND n.order_id = o.order_id AND n.upc = o.upc"
_SETTLED_HEAD = """
    SELECT transaction_id, position FROM events
    WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY transaction_id DESC, position DESC
    LIMIT 1
"""
# The change feed reads rows above a cursor; no cursor is ever below zero.
_ANNOUNCE = "'0'::xid8"


class RebuildBusy(RuntimeError):
    """Another process is building this projection version."""


class Difference(msgspec.Struct, frozen=True):
    """How a built version differs from the served one."""

    differing: int
    """Items whose rows differ (or exist in one version only)."""
    compared: int
    """Items in the built version."""
    sample: list[dict[str, object]]
    """A few differing items: key, and each differing column's two values."""


async def rebuild_lock(connection: Connection, name: str = PROJECTION_NAME) -> None:
    """Take the session lock that lets one process build ``name`` at a time."""
    got = await connection.fetchval(
        "SELECT pg_try_advisory_lock(hashtext('ordertrail.rebuild'), hashtext($1))",
        name,
    )
    if not got:
        msg = f"another process is rebuilding projection {name!r}"
        raise RebuildBusy(msg)


async def begin(
    connection: Connection,
    vocabulary: Vocabulary,
    name: str = PROJECTION_NAME,
    *,
    fresh: bool = False,
) -> ProjectionVersion:
    """Return the version to build: an interrupted one to resume, or a new one.

    Only a build that was interrupted is resumed, and only with the same
    vocabulary. A build that was completed but not swapped in (a dry run) is
    discarded: the code may have changed since. ``fresh`` discards any.
    """
    async with connection.transaction():
        building = [
            v
            for v in await catalogue.versions(connection, name)
            if v.state is ProjectionState.BUILDING
        ]
        for version in building:
            resumable = (
                not fresh
                and version.prepared_at is None
                and version.vocabulary_digest == vocabulary.digest
            )
            if resumable:
                # Run again after a fix: the event it stopped on gets another try.
                await catalogue.clear_failure(connection, name, version.version)
                log.info(
                    "projection.rebuild_resumed",
                    projection=name,
                    version=version.version,
                    position=version.checkpoint_position,
                )
                resumed = await catalogue.find(connection, name, version.version)
                assert resumed is not None
                return resumed
            await _discard(connection, version)
        number = await connection.fetchval(
            "SELECT coalesce(max(version), 0) + 1 FROM projections WHERE name = $1",
            name,
        )
        table = f"item_view_v{number}"
        await create_view_table(connection, table)
        horizon = await connection.fetchrow(_SETTLED_HEAD)
        await connection.execute(
            "INSERT INTO projections (name, version, table_name, state, vocabulary, "
            "vocabulary_digest, target_position, bulk_horizon_xid, "
            "bulk_horizon_position) "
            "VALUES ($1, $2, $3, 'building', $4, $5, "
            "(SELECT coalesce(max(position), 0) FROM events), $6::text::xid8, $7)",
            name,
            number,
            table,
            vocabulary.text,
            vocabulary.digest,
            str(horizon["transaction_id"]) if horizon else "0",
            horizon["position"] if horizon else 0,
        )
    log.info("projection.rebuild_started", projection=name, version=number)
    record = await catalogue.find(connection, name, number)
    assert record is not None
    return record


async def _discard(connection: Connection, version: ProjectionVersion) -> None:
    # A build for another vocabulary would swap in the wrong meanings.
    await connection.execute(
        "DELETE FROM projection_skips WHERE name = $1 AND version = $2",
        version.name,
        version.version,
    )
    await connection.execute(
        "DELETE FROM projections WHERE name = $1 AND version = $2",
        version.name,
        version.version,
    )
    await connection.execute(f'DROP TABLE IF EXISTS "{version.table_name}"')
    log.info(
        "projection.version_dropped",
        projection=version.name,
        version=version.version,
        state=version.state.value,
    )


async def projection_of(
    connection: Connection,
    record: ProjectionVersion,
    store: EventStore,
    fallback: Vocabulary,
) -> ItemProjection:
    """Return the item projection that writes ``record``'s table."""
    skipped = await catalogue.skipped_positions(connection, record.name, record.version)
    return ItemProjection(
        record.vocabulary_or(fallback),
        store,
        version=record.version,
        table=record.table_name,
        skipped=skipped,
    )


async def build(
    connection: Connection,
    record: ProjectionVersion,
    store: EventStore,
    *,
    batch_size: int = 5000,
    on_batch: Callable[[Batch], None] | None = None,
    reader: Connection | None = None,
) -> Batch:
    """Apply the log to a building version up to the settled head.

    First stream by stream up to the horizon fixed by ``begin`` (each item is
    folded whole and written once), then in log order from that horizon, as
    any runner follows the log. A second connection as ``reader`` lets the
    first phase read ahead while it folds.
    """
    projection = await projection_of(connection, record, store, Vocabulary.default())
    if not record.bulk_done:
        failure = await _bulk(
            connection,
            record,
            projection,
            batch_size=batch_size,
            on_batch=on_batch,
            reader=reader,
        )
        if failure is not None:
            return Batch(0, record.checkpoint, failure)
    runner = ProjectionRunner(store, projection, record.name, batch_size=batch_size)
    return await runner.catch_up(connection, on_batch=on_batch)


class _Bulk(msgspec.Struct, array_like=True, frozen=True):
    """An event as the bulk phase reads it: only what folding needs."""

    mode: str
    order_id: str
    upc: str
    version: int
    position: int
    transaction_id: int
    event_type: str
    schema_version: int
    raw_status: str
    raw_body: bytes
    received_at: datetime
    redelivery_of: int | None


_BULK_READ = """
    SELECT mode, order_id, upc, version, position, transaction_id, event_type,
           schema_version, raw_status, raw_body, received_at, redelivery_of
    FROM events
    WHERE (mode, order_id, upc, version) > ($1, $2, $3, $4)
      AND (transaction_id, position) <= ($5::text::xid8, $6)
    ORDER BY mode, order_id, upc, version
    LIMIT $7
"""

# A version past any real one: resuming after a stream skips all of it.
_WHOLE_STREAM = 2**31 - 1


class _WholeStreams:
    """Cuts batches of events, in stream order, into whole streams.

    The stream a batch ends in may go on in the next one; its events wait
    here until the stream is complete.
    """

    def __init__(self) -> None:
        self._stream: tuple[str, str, str] | None = None
        self._events: list[_Bulk] = []

    def cut(self, events: list[_Bulk], *, last: bool) -> list[list[_Bulk]]:
        """Return the streams ``events`` complete (all of them if ``last``)."""
        complete: list[list[_Bulk]] = []
        for event in events:
            stream = (event.mode, event.order_id, event.upc)
            if stream != self._stream:
                if self._events:
                    complete.append(self._events)
                self._stream, self._events = stream, []
            self._events.append(event)
        if last and self._events:
            complete.append(self._events)
            self._events = []
        return complete


async def _bulk(
    connection: Connection,
    record: ProjectionVersion,
    projection: ItemProjection,
    *,
    batch_size: int,
    on_batch: Callable[[Batch], None] | None,
    reader: Connection | None,
) -> FoldFailure | None:
    horizon = record.bulk_horizon
    after: tuple[str, str, str, int] = ("", "", "", 0)
    if record.bulk_after:
        mode, order_id, upc = record.bulk_after
        after = (mode, order_id, upc, _WHOLE_STREAM)

    def fetch(source: Connection, after: tuple[str, str, str, int]) -> Any:
        return source.fetch(
            _BULK_READ,
            *after,
            str(horizon.transaction_id),
            horizon.position,
            batch_size,
        )

    # With a reader connection of its own, the next batch is read while this
    # one is folded and written: the database's work overlaps Python's.
    upcoming = asyncio.ensure_future(fetch(reader or connection, after))
    streams = _WholeStreams()
    while True:
        started = time.perf_counter()
        events = [_Bulk(*row) for row in await upcoming]
        full = len(events) == batch_size
        if events:
            last = events[-1]
            after = (last.mode, last.order_id, last.upc, last.version)
        if full and reader is not None:
            upcoming = asyncio.ensure_future(fetch(reader, after))
        complete = streams.cut(events, last=not full)
        failure = await _write_streams(connection, record, projection, complete)
        if failure is not None:
            if full and reader is not None:
                await upcoming
            return failure
        if on_batch is not None and events:
            on_batch(
                Batch(
                    len(events),
                    Cursor(0, events[-1].position),
                    seconds=time.perf_counter() - started,
                )
            )
        if not full:
            break
        if reader is None:
            upcoming = asyncio.ensure_future(fetch(connection, after))
    await connection.execute(
        "UPDATE projections SET bulk_done = true, checkpoint_xid = $3::text::xid8, "
        "checkpoint_position = $4, updated_at = now() "
        "WHERE name = $1 AND version = $2",
        record.name,
        record.version,
        str(horizon.transaction_id),
        horizon.position,
    )
    return None


async def _write_streams(
    connection: Connection,
    record: ProjectionVersion,
    projection: ItemProjection,
    streams: list[list[_Bulk]],
) -> FoldFailure | None:
    views = []
    for events in streams:
        try:
            item = projection.fold(None, events)
        except Exception as error:  # noqa: BLE001 - projection code is fallible
            return await _stop_on(connection, record, projection, events, error)
        assert item is not None
        views.append(ItemView.of(item))
    if not views:
        return None
    last = views[-1]
    async with connection.transaction():
        await connection.copy_records_to_table(
            record.table_name,
            records=[tuple(getattr(v, c) for c in VIEW_COLUMNS) for v in views],
            columns=list(VIEW_COLUMNS),
        )
        await connection.execute(
            "UPDATE projections SET bulk_after = $3, events_applied = events_applied "
            "+ $4, updated_at = now() WHERE name = $1 AND version = $2",
            record.name,
            record.version,
            [last.mode, last.order_id, last.upc],
            sum(len(events) for events in streams),
        )
    return None


async def _stop_on(
    connection: Connection,
    record: ProjectionVersion,
    projection: ItemProjection,
    events: list[_Bulk],
    error: Exception,
) -> FoldFailure:
    poison = projection.failing_event(None, events)
    recorded = await projection.store.read_stream(
        connection,
        StreamKey(poison.mode, poison.order_id, poison.upc),
        after_version=poison.version - 1,
    )
    await catalogue.record_failure(
        connection, record.name, record.version, poison.position, repr(error)
    )
    log.error(
        "projection.failed",
        projection=record.name,
        version=record.version,
        position=poison.position,
        order_id=poison.order_id,
        upc=poison.upc,
        error=repr(error),
    )
    return FoldFailure(recorded[0], repr(error))


async def prepare(connection: Connection, record: ProjectionVersion) -> None:
    """Index the built table and mark, against the served one, what changed."""
    served = await catalogue.served(connection, record.name)
    await create_view_indexes(connection, record.table_name)
    await connection.execute(
        "UPDATE projections SET prepared_at = now() WHERE name = $1 AND version = $2",
        record.name,
        record.version,
    )
    new, old = record.table_name, served.table_name
    async with connection.transaction():
        await connection.execute(
            f"""
            UPDATE "{new}" n
            SET change_xid = CASE WHEN {_SAME} THEN o.change_xid ELSE {_ANNOUNCE} END,
                updated_at = CASE WHEN {_SAME} THEN o.updated_at ELSE n.updated_at END
            FROM "{old}" o
            WHERE {_KEYS_MATCH}
            """
        )
        await connection.execute(
            f"""
            UPDATE "{new}" n SET change_xid = {_ANNOUNCE}
            WHERE NOT EXISTS (SELECT 1 FROM "{old}" o WHERE {_KEYS_MATCH})
            """
        )


async def differences(
    connection: Connection, record: ProjectionVersion, *, sample: int = 10
) -> Difference:
    """Compare a built version with the served one, item by item."""
    served = await catalogue.served(connection, record.name)
    new, old = record.table_name, served.table_name
    counts = await connection.fetchrow(
        f"""
        SELECT count(*) FILTER (WHERE o.upc IS NULL OR NOT {_SAME}) AS differing,
               count(*) AS compared
        FROM "{new}" n LEFT JOIN "{old}" o ON {_KEYS_MATCH}
        """
    )
    assert counts is not None
    rows = await connection.fetch(
        f"""
        SELECT to_jsonb(n) AS new, to_jsonb(o) AS old
        FROM "{new}" n LEFT JOIN "{old}" o ON {_KEYS_MATCH}
        WHERE o.upc IS NULL OR NOT {_SAME}
        ORDER BY n.mode, n.order_id, n.upc
        LIMIT $1
        """,
        sample,
    )
    return Difference(
        counts["differing"],
        counts["compared"],
        [_contrast(r["new"], r["old"]) for r in rows],
    )


def _contrast(
    new: dict[str, object], old: dict[str, object] | None
) -> dict[str, object]:
    key = {k: new[k] for k in ("mode", "order_id", "upc")}
    if old is None:
        return {**key, "only_in": "rebuilt version"}
    changed = {
        column: {"served": old.get(column), "rebuilt": new.get(column)}
        for column in _CONTENT
        if new.get(column) != old.get(column)
    }
    return {**key, "changes": changed}


async def swap(
    connection: Connection, record: ProjectionVersion, store: EventStore
) -> ProjectionVersion:
    """Make a built version the served one, in one transaction."""
    name = record.name
    current = await catalogue.find(connection, name, record.version)
    if current is None or current.failed:
        msg = f"{name} version {record.version} stopped on an event; it cannot serve"
        raise RuntimeError(msg)
    projection = await projection_of(connection, record, store, Vocabulary.default())
    runner = ProjectionRunner(store, projection, name)
    async with connection.transaction():
        # New appends wait here; appends in flight finish first. Reads go on.
        await connection.execute(
            "SELECT pg_advisory_xact_lock(hashtext('ordertrail.swap'), hashtext($1))",
            name,
        )
        # Nothing can append now, so every event in the table has committed:
        # read to the end without the horizon.
        last = await runner.catch_up(connection, settled=False)
        if last.failure is not None:
            msg = f"position {last.failure.event.position}: {last.failure.error}"
            raise RuntimeError(msg)
        await connection.execute(
            f'UPDATE "{record.table_name}" SET change_xid = pg_current_xact_id(), '
            f"updated_at = now() WHERE change_xid = {_ANNOUNCE}"
        )
        await connection.execute(
            "UPDATE projections SET state = 'retired', retired_at = now(), "
            "updated_at = now() WHERE name = $1 AND state = 'serving'",
            name,
        )
        await connection.execute(
            "UPDATE projections SET state = 'serving', swapped_at = now(), "
            "updated_at = now() WHERE name = $1 AND version = $2",
            name,
            record.version,
        )
        await connection.execute(
            f'CREATE OR REPLACE VIEW item_view AS SELECT * FROM "{record.table_name}"'
        )
    log.info("projection.swapped", projection=name, version=record.version)
    swapped = await catalogue.find(connection, name, record.version)
    assert swapped is not None
    return swapped


async def drop_retired(
    connection: Connection, name: str = PROJECTION_NAME
) -> list[str]:
    """Drop the tables of retired versions; return the tables dropped."""
    dropped = []
    for version in await catalogue.versions(connection, name):
        if version.state is ProjectionState.RETIRED:
            async with connection.transaction():
                await _discard(connection, version)
            dropped.append(version.table_name)
    return dropped
