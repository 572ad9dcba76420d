"""Appending to and reading from the events table.

Appends run inside a transaction the caller owns, so the same transaction can
update read models (read-your-writes) and commit once for many deliveries.

Ordering. Each stream is guarded by a transaction-scoped advisory lock taken
before anything is written, so the transaction id, which PostgreSQL assigns
at the first write (the INSERT into events), is allocated only once the
stream is ours. Within a stream, versions, positions and transaction ids
therefore all rise together, and (transaction_id, position) is a total order
of the log that respects every stream's order. Readers tail the log in that
order and only below the snapshot horizon, where every transaction has ended.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from ordertrail.db.connection import Connection
from ordertrail.eventstore.hashing import GENESIS, canonical, chain_hash
from ordertrail.eventstore.records import (
    EVENT_TYPE,
    Appended,
    Cursor,
    Delivery,
    RecordedEvent,
    StreamKey,
)

__all__ = [
    "EVENTS_CHANNEL",
    "INSERT",
    "EventStore",
    "NewEvent",
    "Scan",
    "insert_arguments",
    "stream_lock_key",
    "stream_lock_keys",
]

EVENTS_CHANNEL = "ordertrail_events"
"""NOTIFY channel: the payload is the highest position a commit appended."""

SCHEMA_VERSION = 1

_COLUMNS = (
    "position, transaction_id, mode, order_id, upc, version, event_type, "
    "schema_version, raw_status, raw_body, body_sha256, received_at, request_id, "
    "client_address, token_id, idempotency_key, redelivery_of, previous_hash, hash"
)


def stream_lock_key(stream: StreamKey) -> int:
    """Return the advisory lock key that guards appends to ``stream``."""
    text = f"{stream.mode}\x1f{stream.order_id}\x1f{stream.upc}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big", signed=True)


def stream_lock_keys(streams: Sequence[StreamKey]) -> list[int]:
    """Return the lock keys of ``streams`` in the order to take them.

    Sorted keys: two transactions always lock shared streams in the same
    order, so they queue instead of deadlocking.
    """
    return sorted({stream_lock_key(stream) for stream in streams})


class NewEvent:
    """A delivery with its place in its stream, ready to insert."""

    __slots__ = (
        "body_sha256",
        "delivery",
        "hash",
        "position",
        "previous_hash",
        "redelivery_of",
        "repeats",
        "version",
    )

    def __init__(
        self, delivery: Delivery, version: int, previous_hash: bytes, body_sha256: bytes
    ) -> None:
        self.delivery = delivery
        self.version = version
        self.previous_hash = previous_hash
        self.body_sha256 = body_sha256
        self.hash = chain_hash(
            previous_hash,
            canonical(
                mode=delivery.mode,
                order_id=delivery.order_id,
                upc=delivery.upc,
                version=version,
                event_type=EVENT_TYPE,
                raw_status=delivery.raw_status,
                raw_body=delivery.raw_body,
                received_at=delivery.received_at,
            ),
        )
        self.position = 0
        self.redelivery_of: int | None = None
        self.repeats: NewEvent | None = None
        """The original in the same batch, whose position is not known yet."""

    @property
    def appended(self) -> Appended:
        """The answer a sender gets for this delivery."""
        return Appended(self.position, self.version, self.redelivery_of)

    def recorded(self) -> RecordedEvent:
        """Return the event as a reader will see it once committed.

        The transaction id is left at 0: it is known only to the database,
        and nothing that reads a fresh append needs it.
        """
        d = self.delivery
        return RecordedEvent(
            position=self.position,
            transaction_id=0,
            mode=d.mode,
            order_id=d.order_id,
            upc=d.upc,
            version=self.version,
            event_type=EVENT_TYPE,
            schema_version=SCHEMA_VERSION,
            raw_status=d.raw_status,
            raw_body=d.raw_body,
            body_sha256=self.body_sha256,
            received_at=d.received_at,
            request_id=d.request_id,
            client_address=d.client_address,
            token_id=d.token_id,
            idempotency_key=d.idempotency_key,
            redelivery_of=self.redelivery_of,
            previous_hash=self.previous_hash,
            hash=self.hash,
        )


class _Seen:
    """An original event of a stream, which a later delivery may repeat."""

    __slots__ = ("body_sha256", "event", "idempotency_key", "position", "received_at")

    def __init__(
        self,
        position: int,
        body_sha256: bytes,
        idempotency_key: str | None,
        received_at: datetime,
        event: NewEvent | None = None,
    ) -> None:
        self.position = position
        self.body_sha256 = body_sha256
        self.idempotency_key = idempotency_key
        self.received_at = received_at
        self.event = event


class _StreamHead:
    __slots__ = ("hash", "seen", "version")

    def __init__(self, version: int, hash_: bytes) -> None:
        self.version = version
        self.hash = hash_
        self.seen: list[_Seen] = []


class Scan(msgspec.Struct, frozen=True):
    """What ``EventStore.scan_after`` found."""

    cursors: list[Cursor]
    """The cursor of every event scanned, in log order."""
    unreflected: list[RecordedEvent]
    """The events scanned that the table did not hold yet, in log order."""


class EventStore:
    """The events table, for appends (in a caller's transaction) and reads."""

    def __init__(self, *, redelivery_window: float = 120.0) -> None:
        self.redelivery_window = timedelta(seconds=redelivery_window)

    async def append(
        self, connection: Connection, deliveries: Sequence[Delivery]
    ) -> list[NewEvent]:
        """Append ``deliveries`` in order, inside the caller's transaction.

        Returns one ``NewEvent`` per delivery, with its position, version and,
        for a redelivery, the position of the event it repeats.
        """
        streams = sorted({delivery.stream for delivery in deliveries})
        await connection.execute(_LOCK, stream_lock_keys(streams))
        events, _ = await self.place(connection, deliveries, streams)
        await connection.execute(INSERT, *insert_arguments(events))
        return events

    async def place(
        self,
        connection: Connection,
        deliveries: Sequence[Delivery],
        streams: Sequence[StreamKey],
        *,
        rows_of: str | None = None,
        row_columns: tuple[str, ...] = (),
    ) -> tuple[list[NewEvent], dict[StreamKey, dict[str, Any]]]:
        """Give each delivery its place in its stream, ready for ``INSERT``.

        The caller holds the streams' locks (``stream_lock_keys``). One query
        reads each stream's head and the originals a delivery may repeat, and
        draws the batch's positions. With ``rows_of``, the same query returns
        ``row_columns`` of each stream's row in that table (keyed by mode,
        order_id and upc), so that a caller updating a read model in the same
        transaction needs no second round trip.
        """
        # Only originals can be repeated: those received inside the window,
        # and those whose idempotency key a delivery in this batch presents.
        earliest = min(delivery.received_at for delivery in deliveries)
        keys = [d.idempotency_key for d in deliveries if d.idempotency_key is not None]
        records = await connection.fetch(
            _place_statement(rows_of, row_columns),
            [stream.mode for stream in streams],
            [stream.order_id for stream in streams],
            [stream.upc for stream in streams],
            earliest - self.redelivery_window,
            keys,
            len(deliveries),
        )
        heads: dict[StreamKey, _StreamHead] = {}
        rows: dict[StreamKey, dict[str, Any]] = {}
        positions: list[int] = []
        for record in records:
            # By index: the row's columns may repeat these names.
            stream = StreamKey(record[0], record[1], record[2])
            heads[stream] = _head(record)
            if record["positions"] is not None:
                positions = sorted(record["positions"])
            if row_columns and record["row_found"]:
                rows[stream] = dict(zip(row_columns, record[_FIXED:], strict=True))
        events = [
            self._place(delivery, heads[delivery.stream]) for delivery in deliveries
        ]
        # Drawn in one statement, the numbers rise in the order asked: each
        # delivery takes the next, so positions rise in delivery order, as the
        # identity column would number the rows of one INSERT.
        for event, position in zip(events, positions, strict=True):
            event.position = position
        for event in events:
            if event.repeats is not None:
                event.redelivery_of = event.repeats.position
        return events, rows

    def _place(self, delivery: Delivery, head: _StreamHead) -> NewEvent:
        body_sha256 = hashlib.sha256(delivery.raw_body).digest()
        original = self._original_of(delivery, body_sha256, head.seen)
        event = NewEvent(delivery, head.version + 1, head.hash, body_sha256)
        head.version = event.version
        head.hash = event.hash
        if original is None:
            head.seen.append(
                _Seen(
                    0,
                    body_sha256,
                    delivery.idempotency_key,
                    delivery.received_at,
                    event,
                )
            )
        elif original.event is not None:
            event.repeats = original.event
        else:
            event.redelivery_of = original.position
        return event

    def _original_of(
        self, delivery: Delivery, body_sha256: bytes, seen: list[_Seen]
    ) -> _Seen | None:
        # An idempotency key, when the sender gives one, is the whole truth:
        # the same key is a redelivery whatever the body, a new key is not.
        if delivery.idempotency_key is not None:
            return next(
                (s for s in seen if s.idempotency_key == delivery.idempotency_key), None
            )
        cutoff = delivery.received_at - self.redelivery_window
        return next(
            (
                s
                for s in reversed(seen)
                if s.body_sha256 == body_sha256 and s.received_at >= cutoff
            ),
            None,
        )

    async def read_after(
        self,
        connection: Connection,
        cursor: Cursor,
        limit: int = 1000,
        *,
        settled: bool = True,
    ) -> list[RecordedEvent]:
        """Return up to ``limit`` committed events after ``cursor``, in log order.

        Only events whose transaction id is below the snapshot's xmin are
        returned. Every transaction below that horizon has ended, and any
        transaction still to commit has a larger id, so a reader that carries
        the last returned event's cursor forward never skips an event, however
        late its transaction commits.

        ``settled=False`` drops the horizon; it is safe only while nothing can
        append (a projection swap holds every appender back).
        """
        rows = await connection.fetch(
            _READ_SETTLED if settled else _READ_ALL,
            str(cursor.transaction_id),
            cursor.position,
            limit,
        )
        return [_recorded(row) for row in rows]

    async def scan_after(
        self,
        connection: Connection,
        cursor: Cursor,
        limit: int,
        *,
        unreflected_in: str,
    ) -> Scan:
        """Scan up to ``limit`` settled events after ``cursor``, as ``read_after``.

        Only the events that the rows of the table ``unreflected_in`` (an
        item view) do not yet hold come back whole; of the others, the cursor
        alone. A runner following a version that the inline writer keeps
        current finds nearly every event already applied, and reading and
        decoding each one only to pass over it was most of what it cost.
        """
        rows = await connection.fetch(
            _scan_statement(unreflected_in),
            str(cursor.transaction_id),
            cursor.position,
            limit,
        )
        cursors = [Cursor(row[0], row[1]) for row in rows]
        unreflected = [
            RecordedEvent(**dict(zip(_COLUMN_NAMES, row[2:], strict=True)))
            for row in rows
            if row[2] is not None
        ]
        return Scan(cursors, unreflected)

    async def read_stream(
        self,
        connection: Connection,
        stream: StreamKey,
        *,
        after_version: int = 0,
    ) -> list[RecordedEvent]:
        """Return a stream's events after ``after_version``, in version order."""
        rows = await connection.fetch(
            f"""
            SELECT {_COLUMNS} FROM events
            WHERE mode = $1 AND order_id = $2 AND upc = $3 AND version > $4
            ORDER BY version
            """,
            stream.mode,
            stream.order_id,
            stream.upc,
            after_version,
        )
        return [_recorded(row) for row in rows]

    async def read_order(
        self,
        connection: Connection,
        mode: str,
        order_id: str,
        *,
        after_position: int = 0,
        limit: int = 1000,
    ) -> list[RecordedEvent]:
        """Return the events of every item of an order, in position order."""
        rows = await connection.fetch(
            f"""
            SELECT {_COLUMNS} FROM events
            WHERE order_id = $1 AND mode = $2 AND position > $3
            ORDER BY position
            LIMIT $4
            """,
            order_id,
            mode,
            after_position,
            limit,
        )
        return [_recorded(row) for row in rows]


def _head(record: asyncpg.Record) -> _StreamHead:
    version = record["head_version"]
    head = (
        _StreamHead(version, record["head_hash"])
        if version
        else _StreamHead(0, GENESIS)
    )
    found = record["seen_positions"]
    if found:
        head.seen = [
            _Seen(position, body_sha256, idempotency_key, received_at)
            for position, body_sha256, idempotency_key, received_at in zip(
                found,
                record["seen_sha256"],
                record["seen_keys"],
                record["seen_received_at"],
                strict=True,
            )
        ]
    return head


def _recorded(row: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(**dict(row.items()))


_READ_SETTLED = f"""
    SELECT {_COLUMNS} FROM events
    WHERE (transaction_id, position) > ($1::text::xid8, $2)
      AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY transaction_id, position
    LIMIT $3
"""

_COLUMN_NAMES = tuple(name.strip() for name in _COLUMNS.split(","))


@functools.lru_cache(maxsize=16)
def _scan_statement(table: str) -> str:
    # An event is reflected when its stream's row holds its version or a
    # later one; the whole event is joined in only for the others. The
    # outer columns of an unreflected event follow the two of its cursor.
    whole = ", ".join(f"e.{name}" for name in _COLUMN_NAMES)
    return f"""
        WITH scanned AS (
            SELECT transaction_id, position, order_id, mode, upc, version
            FROM events
            WHERE (transaction_id, position) > ($1::text::xid8, $2)
              AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
            ORDER BY transaction_id, position
            LIMIT $3
        )
        SELECT s.transaction_id AS scanned_xid, s.position AS scanned_position,
               {whole}
        FROM scanned s
        LEFT JOIN events e
          ON e.order_id = s.order_id AND e.position = s.position
         AND NOT EXISTS (
             SELECT FROM {table} v
             WHERE v.mode = s.mode AND v.order_id = s.order_id
               AND v.upc = s.upc AND v.version >= s.version
         )
        ORDER BY s.transaction_id, s.position
    """


_READ_ALL = f"""
    SELECT {_COLUMNS} FROM events
    WHERE (transaction_id, position) > ($1::text::xid8, $2)
    ORDER BY transaction_id, position
    LIMIT $3
"""

_LOCK = "SELECT pg_advisory_xact_lock(key) FROM unnest($1::bigint[]) AS key"

_PLACE = """
    SELECT k.mode, k.order_id, k.upc, h.version AS head_version, h.hash AS head_hash,
           r.positions AS seen_positions, r.sha256 AS seen_sha256,
           r.keys AS seen_keys, r.received_at AS seen_received_at,
           CASE WHEN k.n = 1 THEN (
               SELECT array_agg(nextval(pg_get_serial_sequence('events', 'position')))
               FROM generate_series(1, $6)
           ) END AS positions,
           {row_found} AS row_found{row_columns}
    FROM unnest($1::text[], $2::text[], $3::text[])
         WITH ORDINALITY AS k(mode, order_id, upc, n)
    LEFT JOIN LATERAL (
        SELECT e.version, e.hash FROM events e
        WHERE e.mode = k.mode AND e.order_id = k.order_id AND e.upc = k.upc
        ORDER BY e.version DESC LIMIT 1
    ) h ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(e.position ORDER BY e.position) AS positions,
               array_agg(e.body_sha256 ORDER BY e.position) AS sha256,
               array_agg(e.idempotency_key ORDER BY e.position) AS keys,
               array_agg(e.received_at ORDER BY e.position) AS received_at
        FROM events e
        WHERE e.mode = k.mode AND e.order_id = k.order_id AND e.upc = k.upc
          AND e.redelivery_of IS NULL
          AND (e.received_at >= $4 OR e.idempotency_key = ANY($5::text[]))
    ) r ON true{rows_join}
"""
# The row columns follow the fixed ones, from this index on.
_FIXED = 11


@functools.lru_cache(maxsize=16)
def _place_statement(rows_of: str | None, row_columns: tuple[str, ...]) -> str:
    if rows_of is None or not row_columns:
        return _PLACE.format(row_found="false", row_columns="", rows_join="")
    return _PLACE.format(
        row_found="v.mode IS NOT NULL",
        row_columns="".join(f", v.{column}" for column in row_columns),
        rows_join=(
            f'\n    LEFT JOIN "{rows_of}" v\n'
            "      ON v.mode = k.mode AND v.order_id = k.order_id AND v.upc = k.upc"
        ),
    )


class _Row(msgspec.Struct):
    """An event as one object of the JSON document that ``INSERT`` reads."""

    position: int
    mode: str
    order_id: str
    upc: str
    version: int
    raw_status: str
    raw_body: bytes
    body_sha256: bytes
    received_at: datetime
    request_id: str
    client_address: str | None
    token_id: str
    idempotency_key: str | None
    redelivery_of: int | None
    previous_hash: bytes
    hash: bytes


def insert_arguments(events: Sequence[NewEvent]) -> list[Any]:
    """Return the parameters of ``INSERT`` for ``events``, which have positions.

    The rows travel as one JSON document rather than an array per column:
    asyncpg inspects every element of an array parameter through the
    abstract collection classes, which cost the writer more CPU than the
    rest of a batch's Python, while msgspec writes the document in one call.
    Bytes travel as base64.
    """
    rows = [
        _Row(
            event.position,
            d.mode,
            d.order_id,
            d.upc,
            event.version,
            d.raw_status,
            d.raw_body,
            event.body_sha256,
            d.received_at,
            d.request_id,
            d.client_address,
            d.token_id,
            d.idempotency_key,
            event.redelivery_of,
            event.previous_hash,
            event.hash,
        )
        for event in events
        for d in (event.delivery,)
    ]
    return [rows, EVENT_TYPE, SCHEMA_VERSION]


INSERT = """
    INSERT INTO events (
        position, mode, order_id, upc, version, event_type, schema_version,
        raw_status, raw_body, body_sha256, received_at, request_id,
        client_address, token_id, idempotency_key, redelivery_of,
        previous_hash, hash
    ) OVERRIDING SYSTEM VALUE
    SELECT position, mode, order_id, upc, version, $2, $3, raw_status,
           decode(raw_body, 'base64'), decode(body_sha256, 'base64'),
           received_at, request_id, client_address, token_id, idempotency_key,
           redelivery_of, decode(previous_hash, 'base64'), decode(hash, 'base64')
    FROM jsonb_to_recordset($1::jsonb) AS d(
        position bigint, mode text, order_id text, upc text, version int,
        raw_status text, raw_body text, body_sha256 text,
        received_at timestamptz, request_id text, client_address text,
        token_id text, idempotency_key text, redelivery_of bigint,
        previous_hash text, hash text
    )"""
"""Inserts events placed by ``EventStore.place``, with the positions they drew.

Its parameters, ``insert_arguments``, are numbered from 1; it can stand as a
common table expression of a larger statement that numbers its own after.
"""
