"""Authenticated deliveries that could not be read, kept whole.

A delivery that passed authentication but is not a Locally payload (not
JSON, a missing order_id, a number where a string belongs) is answered 422 and
kept here with the reason, so nothing authenticated is lost. Once the code
understands such bodies, an operator releases them into the log with
``ordertrail quarantine retry``; they keep their original receive time.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
import msgspec
import structlog

from ordertrail.db.connection import Connection
from ordertrail.eventstore.records import Delivery
from ordertrail.eventstore.store import EventStore
from ordertrail.ingest.payload import decode_webhook
from ordertrail.ingest.writer import append_and_project
from ordertrail.projections.served import ServedProjection

__all__ = ["Quarantined", "Release", "hold", "list_held", "release", "show"]

log = structlog.get_logger("ordertrail.quarantine")


class Quarantined(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery held in quarantine."""

    id: int
    received_at: datetime
    mode: str
    request_id: str
    client_address: str | None
    token_id: str
    content_type: str | None
    idempotency_key: str | None
    raw_body: bytes
    body_length: int
    truncated: bool
    reason: str
    released_at: datetime | None
    released_position: int | None


class Release(msgspec.Struct, frozen=True):
    """What happened to one quarantined delivery on a retry."""

    id: int
    released: bool
    position: int | None = None
    reason: str | None = None


async def hold(
    connection: Connection | asyncpg.Pool,
    *,
    received_at: datetime,
    mode: str,
    request_id: str,
    client_address: str | None,
    token_id: str,
    content_type: str | None,
    idempotency_key: str | None,
    raw_body: bytes,
    body_length: int,
    truncated: bool,
    reason: str,
) -> int:
    """Keep a delivery in quarantine; return its quarantine id."""
    quarantine_id = await connection.fetchval(
        """
        INSERT INTO quarantine (received_at, mode, request_id, client_address, token_id,
            content_type, idempotency_key, raw_body, body_length, truncated, reason)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        RETURNING id
        """,
        received_at,
        mode,
        request_id,
        client_address,
        token_id,
        content_type,
        idempotency_key,
        raw_body,
        body_length,
        truncated,
        reason,
    )
    assert isinstance(quarantine_id, int)
    return quarantine_id


_COLUMNS = (
    "id, received_at, mode, request_id, client_address, token_id, content_type, "
    "idempotency_key, raw_body, body_length, truncated, reason, released_at, "
    "released_position"
)


async def list_held(
    connection: Connection, *, include_released: bool = False, limit: int = 100
) -> list[Quarantined]:
    """Return quarantined deliveries, oldest first."""
    rows = await connection.fetch(
        f"SELECT {_COLUMNS} FROM quarantine "
        "WHERE $1 OR released_at IS NULL ORDER BY id LIMIT $2",
        include_released,
        limit,
    )
    return [Quarantined(**dict(row.items())) for row in rows]


async def show(connection: Connection, quarantine_id: int) -> Quarantined | None:
    """Return one quarantined delivery."""
    row = await connection.fetchrow(
        f"SELECT {_COLUMNS} FROM quarantine WHERE id = $1",
        quarantine_id,
    )
    return Quarantined(**dict(row.items())) if row is not None else None


async def release(
    connection: Connection,
    store: EventStore,
    served: ServedProjection,
    quarantine_id: int,
) -> Release:
    """Try a quarantined delivery again with the current code.

    If it now reads as a webhook it is appended as an event (with its
    original receive time and metadata) and marked released in the same
    transaction; otherwise it stays, with the reason it still fails.
    """
    held = await show(connection, quarantine_id)
    if held is None:
        return Release(
            quarantine_id, released=False, reason="no such quarantined delivery"
        )
    if held.released_at is not None:
        return Release(
            quarantine_id,
            released=False,
            position=held.released_position,
            reason="already released",
        )
    if held.truncated:
        return Release(
            quarantine_id,
            released=False,
            reason="only the first part of this body was kept",
        )
    try:
        webhook = decode_webhook(held.raw_body)
    except msgspec.DecodeError as error:
        return Release(quarantine_id, released=False, reason=str(error))
    delivery = Delivery(
        mode=held.mode,
        order_id=webhook.order_id,
        upc=webhook.upc,
        raw_status=webhook.status,
        raw_body=held.raw_body,
        received_at=held.received_at,
        request_id=held.request_id,
        token_id=held.token_id,
        client_address=held.client_address,
        idempotency_key=held.idempotency_key,
    )
    async with connection.transaction():
        (event,) = await append_and_project(connection, store, served, [delivery])
        await connection.execute(
            "UPDATE quarantine SET released_at = now(), released_position = $2 "
            "WHERE id = $1",
            quarantine_id,
            event.position,
        )
    log.info(
        "quarantine.released",
        quarantine_id=quarantine_id,
        position=event.position,
        order_id=delivery.order_id,
        upc=delivery.upc,
    )
    return Release(quarantine_id, released=True, position=event.position)
