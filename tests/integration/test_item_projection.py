"""The item view kept in the append's transaction, and its catch-up."""

from __future__ import annotations

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.services import Services
from ordertrail.eventstore.records import StreamKey
from tests.integration.helpers import get_item, post_webhook
from tests.support import UPC, webhook_body


async def view_row(pool: asyncpg.Pool, order_id: str) -> dict[str, object] | None:
    row = await pool.fetchrow(
        "SELECT version, event_count, state, message_count FROM item_view "
        "WHERE order_id = $1",
        order_id,
    )
    return dict(row.items()) if row is not None else None


async def test_lost_view_row_is_rebuilt_from_the_log_on_the_next_event(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    # Read models are disposable: a row that lags its stream catches up from
    # the events, never from what the row said.
    for status in ("ordered", "confirmed", "new message"):
        await post_webhook(client, webhook_body(order_id, status=status), live_token)
    await pool.execute("DELETE FROM item_view_v1 WHERE order_id = $1", order_id)

    await post_webhook(client, webhook_body(order_id, status="picked up"), live_token)

    view = (await get_item(client, reader_key, order_id)).json()
    assert (view["version"], view["event_count"]) == (4, 4)
    assert view["state"] == "completed"
    assert view["message_count"] == 1
    assert view["fulfilment"] == "pickup"


async def test_applying_events_again_changes_nothing(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    services: Services,
    live_token: str,
    order_id: str,
) -> None:
    for status in ("ordered", "new message"):
        await post_webhook(client, webhook_body(order_id, status=status), live_token)
    before = await view_row(pool, order_id)

    async with pool.acquire() as connection:
        events = await services.store.read_stream(
            connection, StreamKey("live", order_id, UPC)
        )
        async with connection.transaction():
            await services.projection.apply(connection, events)
            await services.projection.apply(connection, events[1:])

    assert await view_row(pool, order_id) == before
    assert before == {
        "version": 2,
        "event_count": 2,
        "state": "ordered",
        "message_count": 1,
    }
