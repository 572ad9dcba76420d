"""LISTEN/NOTIFY: a Listener and a PositionSignal wake when the log grows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from ordertrail.auth.credentials import CREDENTIALS_CHANNEL
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.notifications import Listener, PositionSignal
from ordertrail.eventstore.store import EVENTS_CHANNEL, EventStore
from ordertrail.ingest.writer import append_and_project
from ordertrail.projections.served import ServedProjection
from tests.support import delivery

STORE = EventStore()
SERVED = ServedProjection(STORE, Vocabulary.default())


@pytest.fixture
async def appended(database_url: str) -> AsyncIterator[PositionSignal]:
    """A PositionSignal fed by a connected Listener on the events channel."""
    signal = PositionSignal()
    listener = Listener(database_url)
    listener.subscribe(EVENTS_CHANNEL, signal.notice)
    await listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 5)
        yield signal
    finally:
        await listener.stop()


async def test_append_wakes_a_waiting_reader_with_its_position(
    appended: PositionSignal, pool: asyncpg.Pool, order_id: str
) -> None:
    waiting = asyncio.create_task(appended.wait(5.0))
    await asyncio.sleep(0)

    async with pool.acquire() as connection:
        events = await append_and_project(
            connection,
            STORE,
            SERVED,
            [delivery(order_id), delivery(order_id, upc="2", status="ordered")],
        )

    assert await waiting is True
    # The payload is the highest position the commit appended.
    assert appended.latest == max(event.position for event in events)


async def test_no_append_no_wake(appended: PositionSignal) -> None:
    assert await appended.wait(0.2) is False


async def test_rolled_back_append_wakes_nobody(
    appended: PositionSignal, pool: asyncpg.Pool, order_id: str
) -> None:
    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        await STORE.append(connection, [delivery(order_id)])
        await connection.execute("SELECT pg_notify($1, '999999999')", EVENTS_CHANNEL)
        await transaction.rollback()

    assert await appended.wait(0.2) is False
    assert appended.latest < 999999999


async def test_listener_announces_a_gap_on_connect(database_url: str) -> None:
    # After (re)connecting, notifications may have been missed: every
    # subscriber is told so, with None, and re-checks.
    received: list[str | None] = []
    listener = Listener(database_url)
    listener.subscribe(EVENTS_CHANNEL, received.append)
    await listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 5)
    finally:
        await listener.stop()

    assert received[:1] == [None]


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_listener_reconnects_after_its_connection_is_killed(
    database_url: str, pool: asyncpg.Pool
) -> None:
    received: list[str | None] = []
    listener = Listener(database_url, retry_delay=0.05)
    listener.subscribe(CREDENTIALS_CHANNEL, received.append)
    others = {row["pid"] for row in await pool.fetch(_BACKENDS)}
    await listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 5)
        ours = [
            row["pid"]
            for row in await pool.fetch(_BACKENDS)
            if row["pid"] not in others and row["query"].startswith("LISTEN")
        ]
        assert len(ours) == 1
        await pool.execute("SELECT pg_terminate_backend($1)", ours[0])

        await until(lambda: received.count(None) >= 2, "never reconnected")
        await asyncio.wait_for(listener.connected.wait(), 5)
        await pool.execute("SELECT pg_notify($1, 'INSERT')", CREDENTIALS_CHANNEL)
        await until(lambda: "INSERT" in received, "no notification after reconnecting")
    finally:
        await listener.stop()

    assert received.count(None) >= 2


_BACKENDS = (
    "SELECT pid, query FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
