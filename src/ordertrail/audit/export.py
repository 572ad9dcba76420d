"""Exports of the log as NDJSON, for verification away from the database.

An export is UTF-8 text, one JSON object per line:

- the first line, ``{"export": {...}}``: the format name
  (``ordertrail.export.v1``), the ``mode`` exported (null for both), the
  position range ``from_position`` to ``to_position`` (both inclusive),
  ``exported_at``, and ``encoding``, which restates the rules below;
- then one line per event, in position order, holding every column of the
  events table under its column name;
- the last line, ``{"summary": {...}}``: ``count`` (event lines), the
  ``first_position`` and ``last_position`` exported (null if none), the
  range again, ``heads`` (for every stream seen, ``[mode, order_id, upc,
  version, hash]`` of its last event in the range, in the byte order of the
  stream keys), ``streams`` (how many) and ``heads_digest``: the digest of
  those heads as ``audit/digest.py`` specifies. An export of both modes from
  position 1 to a checkpoint's position has that checkpoint's digest.

Encodings: ``raw_body`` is standard base64 with padding (RFC 4648 section 4);
``body_sha256``, ``previous_hash`` and ``hash`` are lowercase hex;
``received_at`` is UTC in the canonical form of the event hash
(``YYYY-MM-DDTHH:MM:SS.ffffffZ``); ``transaction_id`` is a JSON integer
(it can exceed 2**53: read it with a parser that keeps big integers).

A file without its summary line was cut short. The upper bound of the range
should be a settled position (``settle.py``), so that the same range exported
twice gives the same lines; ``to_position`` says which bound was used.

Everything is read in one repeatable-read, read-only transaction through a
server-side cursor, and written in chunks: memory stays flat however long
the log. The transaction waits while the reader does not read, and the
server ends a transaction idle for a minute (the service's connections set
``idle_in_transaction_session_timeout``): a client that stalls that long gets
a file without its summary line, which says it is incomplete.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import msgspec
import structlog

from ordertrail.audit.digest import HeadsDigest
from ordertrail.db.connection import Connection
from ordertrail.eventstore.hashing import format_received_at

__all__ = [
    "ENCODING",
    "EXPORT_FORMAT",
    "ExportHeader",
    "ExportedEvent",
    "export_lines",
]

log = structlog.get_logger("ordertrail.audit")

EXPORT_FORMAT = "ordertrail.export.v1"

ENCODING = {
    "raw_body": "base64 (RFC 4648, standard alphabet, padded)",
    "body_sha256": "hex",
    "previous_hash": "hex",
    "hash": "hex",
    "received_at": "UTC, YYYY-MM-DDTHH:MM:SS.ffffffZ",
}


class ExportHeader(msgspec.Struct, frozen=True, kw_only=True):
    """The first line's content: what the export holds and how it is written."""

    format: str
    mode: str | None
    from_position: int
    to_position: int
    exported_at: str
    encoding: dict[str, str]


class ExportedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event line: every column of the events table."""

    position: int
    transaction_id: int
    mode: str
    order_id: str
    upc: str
    version: int
    event_type: str
    schema_version: int
    raw_status: str
    raw_body: bytes
    body_sha256: str
    received_at: str
    request_id: str
    client_address: str | None
    token_id: str
    idempotency_key: str | None
    redelivery_of: int | None
    previous_hash: str
    hash: str


_EVENTS = """
    SELECT position, transaction_id, mode, order_id, upc, version, event_type,
           schema_version, raw_status, raw_body, body_sha256, received_at,
           request_id, client_address, token_id, idempotency_key, redelivery_of,
           previous_hash, hash
    FROM events
    WHERE position >= $1 AND position <= $2 AND ($3::text IS NULL OR mode = $3)
    ORDER BY position
"""

_HEADS = """
    SELECT DISTINCT ON (mode COLLATE "C", order_id COLLATE "C", upc COLLATE "C")
           mode, order_id, upc, version, hash
    FROM events
    WHERE position >= $1 AND position <= $2 AND ($3::text IS NULL OR mode = $3)
    ORDER BY mode COLLATE "C", order_id COLLATE "C", upc COLLATE "C", version DESC
"""

_FLUSH_AT = 64 * 1024


async def export_lines(
    connection: Connection,
    *,
    mode: str | None,
    from_position: int,
    to_position: int,
    prefetch: int = 2000,
) -> AsyncIterator[bytes]:
    """Yield the export of positions ``from_position`` to ``to_position``.

    Chunks of about 64 KiB, each ending at a line end. ``connection`` must not
    be in a transaction; this opens one and ends it when the export is done
    or abandoned.
    """
    encoder = msgspec.json.Encoder()
    header = ExportHeader(
        format=EXPORT_FORMAT,
        mode=mode,
        from_position=from_position,
        to_position=to_position,
        exported_at=format_received_at(datetime.now(UTC)),
        encoding=ENCODING,
    )
    buffer = bytearray(encoder.encode({"export": header}) + b"\n")
    count = 0
    first: int | None = None
    last: int | None = None
    bounds = (from_position, to_position, mode)

    async with connection.transaction(isolation="repeatable_read", readonly=True):
        async for row in connection.cursor(_EVENTS, *bounds, prefetch=prefetch):
            encoder.encode_into(_exported(row), buffer, -1)
            buffer += b"\n"
            count += 1
            last = row[0]
            if first is None:
                first = last
            if len(buffer) >= _FLUSH_AT:
                yield bytes(buffer)
                buffer.clear()

        summary = {
            "format": EXPORT_FORMAT,
            "count": count,
            "first_position": first,
            "last_position": last,
            "from_position": from_position,
            "to_position": to_position,
            "mode": mode,
        }
        # The heads go last, written as they are read, so the summary of a
        # long log is never held whole.
        buffer += encoder.encode({"summary": summary})[:-2] + b',"heads":['
        digest = HeadsDigest()
        async for row in connection.cursor(_HEADS, *bounds, prefetch=prefetch):
            if digest.count:
                buffer += b","
            digest.add(row[0], row[1], row[2], row[3], row[4])
            buffer += encoder.encode((row[0], row[1], row[2], row[3], row[4].hex()))
            if len(buffer) >= _FLUSH_AT:
                yield bytes(buffer)
                buffer.clear()
        buffer += b'],"streams":%d,"heads_digest":"%s"}}\n' % (
            digest.count,
            digest.digest().hex().encode(),
        )
    yield bytes(buffer)
    log.info(
        "audit.export_written",
        mode=mode,
        from_position=from_position,
        to_position=to_position,
        events=count,
        streams=digest.count,
    )


def _exported(row: asyncpg.Record) -> ExportedEvent:
    # Columns by index, in the order of the SELECT above: a name lookup per
    # column would cost more than the encoding.
    return ExportedEvent(
        position=row[0],
        transaction_id=row[1],
        mode=row[2],
        order_id=row[3],
        upc=row[4],
        version=row[5],
        event_type=row[6],
        schema_version=row[7],
        raw_status=row[8],
        raw_body=row[9],
        body_sha256=row[10].hex(),
        received_at=format_received_at(row[11]),
        request_id=row[12],
        client_address=row[13],
        token_id=row[14],
        idempotency_key=row[15],
        redelivery_of=row[16],
        previous_hash=row[17].hex(),
        hash=row[18].hex(),
    )
