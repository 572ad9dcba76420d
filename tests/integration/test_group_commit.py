"""The group-commit writer: batches in flight at once, and what one carries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest

from ordertrail.db.connection import connect
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import StreamKey
from ordertrail.eventstore.store import EventStore, stream_lock_key
from ordertrail.ingest.writer import GroupCommitWriter, append_and_project
from ordertrail.projections.served import ServedProjection
from tests.support import (
    UPC,
    delivery,
    new_order_id,
    stream_chain_errors,
    webhook_body,
)

STORE = EventStore()


@pytest.fixture
async def writer(pool: asyncpg.Pool) -> AsyncIterator[GroupCommitWriter]:
    """A writer of its own, two batches at most in flight."""
    started = GroupCommitWriter(
        pool, STORE, ServedProjection(STORE, Vocabulary.default()), committers=2
    )
    await started.start()
    try:
        yield started
    finally:
        await started.stop(grace=5)


async def _lock_waiters(pool: asyncpg.Pool, key: int) -> int:
    # A bigint advisory lock shows its high and low halves as classid, objid.
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND NOT granted AND classid::bigint = $1 AND objid::bigint = $2",
            unsigned >> 32,
            unsigned & 0xFFFFFFFF,
        )
    )


async def _until_waiting(pool: asyncpg.Pool, key: int) -> None:
    while not await _lock_waiters(pool, key):  # noqa: ASYNC110 - the server's state
        await asyncio.sleep(0.01)


async def test_a_batch_waiting_on_its_stream_does_not_hold_back_others(
    pool: asyncpg.Pool, database_url: str, writer: GroupCommitWriter
) -> None:
    held, free = new_order_id(), new_order_id()
    key = stream_lock_key(StreamKey("live", held, UPC))
    blocker = await connect(database_url)
    try:
        # Another transaction holds the stream, as an append in flight would.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT pg_advisory_xact_lock($1)", key)
        waiting = asyncio.create_task(writer.append(delivery(held)))
        async with asyncio.timeout(10):
            await _until_waiting(pool, key)

        # The first batch waits for the lock; the second commits meanwhile.
        async with asyncio.timeout(10):
            other = await writer.append(delivery(free))
        assert other.version == 1
        assert not waiting.done()

        await transaction.rollback()
        async with asyncio.timeout(10):
            first = await waiting
    finally:
        await blocker.close()
    assert first.version == 1
    # Committed after the other batch, so it stands later in the log.
    assert first.position > other.position


async def test_many_deliveries_through_two_committers_keep_every_stream_in_order(
    pool: asyncpg.Pool, writer: GroupCommitWriter
) -> None:
    orders = [new_order_id() for _ in range(3)]
    upcs = ["1", "2"]
    # Distinct bodies: the same body again would be a redelivery.
    deliveries = [
        delivery(
            order,
            upc=upc,
            status="new message",
            raw_body=webhook_body(order, upc=upc, status="new message", n=n),
        )
        for n in range(15)
        for order in orders
        for upc in upcs
    ]

    async with asyncio.timeout(30):
        appended = await asyncio.gather(*(writer.append(d) for d in deliveries))

    assert all(a.redelivery_of is None for a in appended)
    async with pool.acquire() as connection:
        for order in orders:
            for upc in upcs:
                events = await STORE.read_stream(
                    connection, StreamKey("live", order, upc)
                )
                assert [e.version for e in events] == list(range(1, 16))
                assert [e.position for e in events] == sorted(
                    e.position for e in events
                )
                assert [msgspec.json.decode(e.raw_body)["n"] for e in events] == list(
                    range(15)
                )
                assert stream_chain_errors(events) == []
                row = await connection.fetchrow(
                    "SELECT version, message_count, position FROM item_view "
                    "WHERE mode = 'live' AND order_id = $1 AND upc = $2",
                    order,
                    upc,
                )
                assert row is not None
                assert (row["version"], row["message_count"]) == (15, 15)
                assert row["position"] == events[-1].position


async def test_an_append_stores_every_field_exactly_as_delivered(
    pool: asyncpg.Pool, database_url: str
) -> None:
    # Rows travel to the server as JSON; nothing may change on the way.
    order_id = new_order_id()
    received_at = datetime(2026, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)
    unusual = "Ca\u00f1\u00f3n \u2028 \U0001f4e6"
    bodies = [
        b'{"upc":"1","order_id":"%s","status":"confirmed"}\n' % order_id.encode(),
        f'{{"upc":"1","order_id":"{order_id}","status":"{unusual}"}}'.encode(),
        b'  {"order_id": "%s", "upc": "1", "status": "x", "extra": [1, 2.50, null]} '
        % order_id.encode(),
    ]
    sent = [
        delivery(
            order_id,
            upc="1",
            status=status,
            raw_body=body,
            received_at=received_at,
            idempotency_key=key,
        )
        for body, status, key in zip(
            bodies,
            ["confirmed", unusual, "x"],
            [None, "cl\u00e9-1", '\\ "quoted" \t'],
            strict=True,
        )
    ]
    connection = await connect(database_url)
    try:
        appended = await append_and_project(
            connection, STORE, ServedProjection(STORE, Vocabulary.default()), sent
        )
    finally:
        await connection.close()

    async with pool.acquire() as reader:
        events = await STORE.read_stream(reader, StreamKey("live", order_id, "1"))
    assert [e.position for e in events] == [a.position for a in appended]
    for event, original, placed in zip(events, sent, appended, strict=True):
        assert event.raw_body == original.raw_body
        assert event.raw_status == original.raw_status
        assert event.received_at == original.received_at
        assert event.idempotency_key == original.idempotency_key
        assert event.request_id == original.request_id
        assert event.client_address == original.client_address
        assert event.token_id == original.token_id
        assert (event.body_sha256, event.hash) == (placed.body_sha256, placed.hash)
        assert event.previous_hash == placed.previous_hash
    assert stream_chain_errors(events) == []
