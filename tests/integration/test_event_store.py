"""The event store on PostgreSQL: immutability, read order, chains, versions."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.db.connection import Connection, connect
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import Cursor, RecordedEvent, StreamKey
from ordertrail.eventstore.store import EventStore, NewEvent
from ordertrail.ingest.writer import append_and_project
from ordertrail.projections.served import ServedProjection
from tests.integration.helpers import get_item, post_webhook, stored_events
from tests.support import (
    UPC,
    WEBHOOK_PATH,
    concurrently,
    delivery,
    new_order_id,
    stream_chain_errors,
    webhook_body,
)

STORE = EventStore()
SERVED = ServedProjection(STORE, Vocabulary.default())


@pytest.fixture
async def connections(database_url: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Three dedicated connections: two writers and a reader."""
    opened = [await connect(database_url) for _ in range(3)]
    try:
        yield opened
    finally:
        for connection in opened:
            await connection.close()


async def log_end(connection: asyncpg.Connection) -> Cursor:
    """The cursor of the last committed event, where a tailing reader would be."""
    row = await connection.fetchrow(
        "SELECT transaction_id, position FROM events "
        "ORDER BY transaction_id DESC, position DESC LIMIT 1"
    )
    return Cursor(row["transaction_id"], row["position"]) if row else Cursor()


def cursor_of(event: RecordedEvent) -> Cursor:
    return Cursor(event.transaction_id, event.position)


async def append_one(
    connection: Connection,
    order_id: str,
    *,
    upc: str = UPC,
    status: str = "confirmed",
    mode: str = "live",
) -> NewEvent:
    async with connection.transaction():
        (event,) = await STORE.append(
            connection, [delivery(order_id, upc=upc, status=status, mode=mode)]
        )
    return event


# Immutability -------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET raw_status = 'cancelled' WHERE order_id = $1",
        "UPDATE events SET hash = previous_hash WHERE order_id = $1",
        "DELETE FROM events WHERE order_id = $1",
    ],
)
async def test_database_refuses_to_change_or_delete_events(
    pool: asyncpg.Pool, order_id: str, statement: str
) -> None:
    async with pool.acquire() as connection:
        await append_one(connection, order_id)

        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await connection.execute(statement, order_id)

    (event,) = await stored_events(pool, order_id)
    assert event["raw_status"] == "confirmed"


async def test_database_refuses_to_truncate_events(pool: asyncpg.Pool) -> None:
    before = await pool.fetchval("SELECT count(*) FROM events")

    async with pool.acquire() as connection:
        # Inside a transaction that is rolled back whatever happens, so a
        # regression here could not empty the shared test database.
        transaction = connection.transaction()
        await transaction.start()
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE"):
                await connection.execute("TRUNCATE events")
        finally:
            await transaction.rollback()

    assert await pool.fetchval("SELECT count(*) FROM events") == before


# Read order ---------------------------------------------------------------------


async def horizon(connection: asyncpg.Connection) -> int:
    """The snapshot horizon: every transaction below it has ended."""
    value = await connection.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())")
    assert isinstance(value, int)
    return value


async def drain(
    reader: asyncpg.Connection, cursor: Cursor, past: int, *, page: int = 1000
) -> list[RecordedEvent]:
    """Read on from ``cursor`` until the horizon passed transaction ``past``.

    An empty read only means "nothing more below the horizon"; transactions
    elsewhere on the server (other databases share transaction ids) can hold
    the horizon back for a while, so readers wait, as a tailing reader would.
    """
    seen: list[RecordedEvent] = []
    deadline = asyncio.get_running_loop().time() + 30.0
    while True:
        passed = await horizon(reader) > past
        batch = await STORE.read_after(reader, cursor, limit=page)
        if batch:
            assert cursor_of(batch[0]) > cursor
            cursor = cursor_of(batch[-1])
            seen.extend(batch)
        elif passed:
            return seen
        elif asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the horizon never passed transaction {past}")
        else:
            await asyncio.sleep(0.002)


async def test_reader_does_not_pass_an_event_whose_transaction_commits_late(
    connections: list[asyncpg.Connection],
) -> None:
    writer_a, writer_b, reader = connections
    order_a, order_b = new_order_id(), new_order_id()
    start = await log_end(reader)

    late = writer_a.transaction()
    await late.start()
    (event_a,) = await STORE.append(writer_a, [delivery(order_a)])
    xid_a = await writer_a.fetchval("SELECT pg_current_xact_id()")
    async with writer_b.transaction():
        (event_b,) = await STORE.append(writer_b, [delivery(order_b)])
        xid_b = await writer_b.fetchval("SELECT pg_current_xact_id()")

    # The hazard is real: B took a later position and is committed and
    # visible, while A, earlier in position order, has not committed yet.
    assert event_a.position < event_b.position
    assert (
        await reader.fetchval(
            "SELECT count(*) FROM events WHERE position = $1", event_b.position
        )
        == 1
    )
    while_open = await STORE.read_after(reader, start)
    assert all(cursor_of(e) < Cursor(xid_a, event_a.position) for e in while_open)
    assert event_b.position not in {e.position for e in while_open}

    await late.commit()
    cursor = cursor_of(while_open[-1]) if while_open else start
    after = await drain(reader, cursor, past=max(xid_a, xid_b))

    ours = [e.position for e in after if e.order_id in {order_a, order_b}]
    assert ours == [event_a.position, event_b.position]


async def test_reader_sees_an_earlier_transaction_first(
    connections: list[asyncpg.Connection],
) -> None:
    # B takes its transaction id first and commits first; A appends later
    # and commits last. Each is read exactly once, in transaction order.
    writer_a, writer_b, reader = connections
    order_a, order_b = new_order_id(), new_order_id()
    start = await log_end(reader)

    early = writer_b.transaction()
    await early.start()
    (event_b,) = await STORE.append(writer_b, [delivery(order_b)])
    xid_b = await writer_b.fetchval("SELECT pg_current_xact_id()")
    late = writer_a.transaction()
    await late.start()
    (event_a,) = await STORE.append(writer_a, [delivery(order_a)])
    xid_a = await writer_a.fetchval("SELECT pg_current_xact_id()")
    await early.commit()
    first = await drain(reader, start, past=xid_b)
    await late.commit()
    cursor = cursor_of(first[-1]) if first else start
    second = await drain(reader, cursor, past=xid_a)

    assert xid_b < xid_a
    assert [e.position for e in first if e.order_id == order_b] == [event_b.position]
    assert [e.order_id for e in first if e.order_id == order_a] == []
    assert [e.position for e in second if e.order_id == order_a] == [event_a.position]
    assert [e.order_id for e in second if e.order_id == order_b] == []


async def interleaving_writers(
    database_url: str, *, seed: int, writers: int, transactions: int
) -> None:
    rng = random.Random(seed)
    # Few streams, so writers queue on each other's stream locks.
    streams = [(new_order_id(), f"u{n}") for n in range(4)]
    ours = {order for order, _ in streams}
    appended: list[NewEvent] = []
    last_xid = 0
    done = asyncio.Event()
    reader = await connect(database_url)
    writer_connections = [await connect(database_url) for _ in range(writers)]

    async def write(connection: asyncpg.Connection, plan: random.Random) -> None:
        nonlocal last_xid
        for _ in range(transactions):
            picks = [plan.choice(streams) for _ in range(plan.randint(1, 3))]
            async with connection.transaction():
                await asyncio.sleep(plan.random() * 0.004)
                events = await STORE.append(
                    connection,
                    [
                        delivery(order, upc=upc, status=f"message {plan.random()}")
                        for order, upc in picks
                    ],
                )
                xid = await connection.fetchval("SELECT pg_current_xact_id()")
                # Hold the transaction open so commits land out of position order.
                await asyncio.sleep(plan.random() * 0.01)
            last_xid = max(last_xid, xid)
            appended.extend(events)

    async def tail(start: Cursor, page: int) -> list[RecordedEvent]:
        seen: list[RecordedEvent] = []
        cursor = start
        while not done.is_set():
            batch = await STORE.read_after(reader, cursor, limit=page)
            if batch:
                assert cursor_of(batch[0]) > cursor
                cursor = cursor_of(batch[-1])
                seen.extend(batch)
            else:
                await asyncio.sleep(0.001)
        return seen + await drain(reader, cursor, past=last_xid, page=page)

    try:
        start = await log_end(reader)
        tailing = asyncio.create_task(tail(start, rng.randint(1, 7)))
        await asyncio.gather(
            *(
                write(connection, random.Random(rng.random()))
                for connection in writer_connections
            )
        )
        done.set()
        seen = [e for e in await tailing if e.order_id in ours]
    finally:
        for connection in [reader, *writer_connections]:
            await connection.close()

    positions = [e.position for e in seen]
    assert len(positions) == len(set(positions)), "an event was read twice"
    assert sorted(positions) == sorted(e.position for e in appended), (
        "an event was skipped"
    )
    versions: dict[StreamKey, list[int]] = defaultdict(list)
    for event in seen:
        versions[event.stream].append(event.version)
    for stream_versions in versions.values():
        assert stream_versions == list(range(1, len(stream_versions) + 1))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_tailing_reader_sees_every_event_once_under_interleaving_writers(
    database_url: str, seed: int
) -> None:
    await interleaving_writers(database_url, seed=seed, writers=5, transactions=6)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
async def test_tailing_reader_under_many_interleaving_writers(
    database_url: str, seed: int
) -> None:
    await interleaving_writers(database_url, seed=seed, writers=12, transactions=40)


# Streams ------------------------------------------------------------------------


async def test_appended_streams_carry_valid_hash_chains(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    order_id: str,
) -> None:
    statuses = ["ordered", "confirmed", "confirmed", "Teleported", "completed"]
    for upc in (UPC, "2"):
        for status in statuses:
            body = webhook_body(order_id, upc=upc, status=status)
            assert (await post_webhook(client, body, live_token)).status_code == 202

    async with pool.acquire() as connection:
        for upc in (UPC, "2"):
            stream = StreamKey("live", order_id, upc)
            events = await STORE.read_stream(connection, stream)
            assert len(events) == len(statuses)
            assert stream_chain_errors(events) == []


async def test_altered_content_breaks_the_chain(
    pool: asyncpg.Pool, order_id: str
) -> None:
    async with pool.acquire() as connection:
        for status in ("ordered", "confirmed", "completed"):
            await append_one(connection, order_id, status=status)
        events = await STORE.read_stream(connection, StreamKey("live", order_id, UPC))

    # What a verifier of an altered export would find.
    altered = list(events)
    altered[1] = RecordedEvent(
        **{
            **{f: getattr(events[1], f) for f in RecordedEvent.__struct_fields__},
            "raw_status": "cancelled",
        }
    )

    assert stream_chain_errors(events) == []
    assert stream_chain_errors(altered) == [
        "version 2: hash does not match its content"
    ]
    assert stream_chain_errors([events[0], events[2]]) != []


async def test_concurrent_deliveries_to_one_item_get_versions_without_gaps(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    count = 40

    responses = await concurrently(
        client,
        lambda http: [
            http.post(
                WEBHOOK_PATH,
                content=webhook_body(order_id, status=f"message {n}"),
                headers={"locally-webhook-token": live_token},
            )
            for n in range(count)
        ],
    )

    assert Counter(r.status_code for r in responses) == {202: count}
    answered = sorted(r.json()["version"] for r in responses)
    assert answered == list(range(1, count + 1))
    async with pool.acquire() as connection:
        events = await STORE.read_stream(connection, StreamKey("live", order_id, UPC))
    assert [e.version for e in events] == list(range(1, count + 1))
    # Within a stream, positions rise with versions.
    assert [e.position for e in events] == sorted(e.position for e in events)
    assert stream_chain_errors(events) == []
    view = (await get_item(client, reader_key, order_id)).json()
    assert (view["version"], view["event_count"]) == (count, count)
    assert view["position"] == events[-1].position


async def test_concurrent_appends_from_separate_connections_keep_versions(
    database_url: str, pool: asyncpg.Pool, order_id: str
) -> None:
    # Without the group-commit writer: separate transactions on one stream.
    writers = [await connect(database_url) for _ in range(6)]
    try:
        await asyncio.gather(
            *(
                append_and_project(
                    connection,
                    STORE,
                    SERVED,
                    [
                        delivery(
                            order_id,
                            status="new message",
                            raw_body=webhook_body(order_id, status="new message", n=n),
                        )
                    ],
                )
                for n, connection in enumerate(writers)
            )
        )
    finally:
        for connection in writers:
            await connection.close()

    events = await stored_events(pool, order_id)
    assert [e["version"] for e in events] == [1, 2, 3, 4, 5, 6]
    view = await pool.fetchrow(
        "SELECT version, message_count FROM item_view WHERE order_id = $1", order_id
    )
    assert view is not None
    assert (view["version"], view["message_count"]) == (6, 6)


async def test_order_is_read_back_across_its_items_in_position_order(
    pool: asyncpg.Pool, order_id: str
) -> None:
    async with pool.acquire() as connection:
        appended = [
            await append_one(connection, order_id, upc=upc, status=status)
            for upc, status in [("1", "ordered"), ("2", "ordered"), ("1", "confirmed")]
        ]
        await append_one(connection, order_id, upc="1", mode="test")
        live = await STORE.read_order(connection, "live", order_id)
        page = await STORE.read_order(
            connection, "live", order_id, after_position=appended[0].position, limit=1
        )

    assert [e.position for e in live] == [e.position for e in appended]
    assert [(e.upc, e.version) for e in live] == [("1", 1), ("2", 1), ("1", 2)]
    assert [e.position for e in page] == [appended[1].position]
