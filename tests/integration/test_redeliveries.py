"""Retries and repeated deliveries: kept, linked to their original, counted."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.auth.credentials import CredentialKind
from ordertrail.eventstore.store import EventStore
from tests.integration.helpers import get_item, post_webhook, stored_events
from tests.support import (
    WEBHOOK_PATH,
    app_settings,
    concurrently,
    delivery,
    make_app,
    until_accepted,
    webhook_body,
)


async def test_same_body_again_is_a_redelivery_of_the_original(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    body = webhook_body(order_id)

    first = (await post_webhook(client, body, live_token)).json()
    second = (await post_webhook(client, body, live_token)).json()

    assert first["redelivery"] is False
    assert second["redelivery"] is True
    assert second["redelivery_of"] == first["position"]
    assert second["version"] == 2
    # The retry is a fact too: stored whole, linked to what it repeats.
    events = await stored_events(pool, order_id)
    assert [e["redelivery_of"] for e in events] == [None, first["position"]]
    assert events[1]["raw_body"] == body
    view = (await get_item(client, reader_key, order_id)).json()
    assert (view["state"], view["version"], view["event_count"]) == ("confirmed", 2, 2)
    assert view["redelivery_count"] == 1
    assert view["anomalies"] == []


async def test_redelivery_does_not_move_the_state(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    ordered = webhook_body(order_id, status="ordered")
    await post_webhook(client, ordered, live_token)
    await post_webhook(client, webhook_body(order_id, status="confirmed"), live_token)

    # A retry of the earlier "ordered" is not an out-of-order report.
    again = await post_webhook(client, ordered, live_token)

    assert again.json()["redelivery"] is True
    view = (await get_item(client, reader_key, order_id)).json()
    assert view["state"] == "confirmed"
    assert view["anomalies"] == []
    assert view["last_status"] == "confirmed"
    assert view["redelivery_count"] == 1


async def test_same_body_after_the_window_is_a_new_event(
    database_url: str, pool: asyncpg.Pool, live_token: str, order_id: str
) -> None:
    app = make_app(app_settings(database_url, redelivery_window=0.3))
    body = webhook_body(order_id, status="new message")

    async with AsyncTestClient(app=app) as own:
        await until_accepted(own, live_token, CredentialKind.WEBHOOK_TOKEN)
        first = (await post_webhook(own, body, live_token)).json()
        await asyncio.sleep(0.4)
        later = (await post_webhook(own, body, live_token)).json()

    assert later["redelivery"] is False
    assert later["redelivery_of"] is None
    assert (first["version"], later["version"]) == (1, 2)
    assert len(await stored_events(pool, order_id)) == 2


async def test_same_idempotency_key_is_a_redelivery_whatever_the_body(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    key = {"Idempotency-Key": f"delivery-{order_id}"}

    first = await post_webhook(client, webhook_body(order_id), live_token, headers=key)
    changed = await post_webhook(
        client, webhook_body(order_id, status="cancelled"), live_token, headers=key
    )

    assert changed.json()["redelivery"] is True
    assert changed.json()["redelivery_of"] == first.json()["position"]
    # Its status is not applied: the key says it is the same delivery.
    assert (await get_item(client, reader_key, order_id)).json()["state"] == "confirmed"


async def test_different_idempotency_keys_make_originals_of_the_same_body(
    client: AsyncTestClient[Litestar], live_token: str, order_id: str
) -> None:
    body = webhook_body(order_id, status="new message")

    first = await post_webhook(
        client, body, live_token, headers={"Idempotency-Key": "a"}
    )
    second = await post_webhook(
        client, body, live_token, headers={"Idempotency-Key": "b"}
    )

    assert (first.json()["redelivery"], second.json()["redelivery"]) == (False, False)
    assert second.json()["version"] == 2


async def test_webhook_id_header_is_an_idempotency_key(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    order_id: str,
) -> None:
    body = webhook_body(order_id, status="new message")

    first = await post_webhook(client, body, live_token, headers={"webhook-id": "w1"})
    repeat = await post_webhook(
        client,
        webhook_body(order_id, status="x"),
        live_token,
        headers={"webhook-id": "w1"},
    )
    other = await post_webhook(client, body, live_token, headers={"webhook-id": "w2"})

    assert repeat.json()["redelivery_of"] == first.json()["position"]
    assert other.json()["redelivery"] is False
    events = await stored_events(pool, order_id)
    assert [e["idempotency_key"] for e in events] == ["w1", "w1", "w2"]


async def test_idempotency_key_is_kept_to_256_characters(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    order_id: str,
) -> None:
    long_key = "k" * 300

    await post_webhook(
        client,
        webhook_body(order_id),
        live_token,
        headers={"Idempotency-Key": long_key},
    )

    (event,) = await stored_events(pool, order_id)
    assert event["idempotency_key"] == long_key[:256]


async def test_identical_concurrent_deliveries_are_one_original_and_one_redelivery(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    order_id: str,
) -> None:
    body = webhook_body(order_id)

    responses = await concurrently(
        client,
        lambda http: [
            http.post(
                WEBHOOK_PATH,
                content=body,
                headers={"locally-webhook-token": live_token},
            )
            for _ in range(2)
        ],
    )

    answers = sorted((r.json() for r in responses), key=lambda a: a["version"])
    assert [r.status_code for r in responses] == [202, 202]
    assert [a["redelivery"] for a in answers] == [False, True]
    assert answers[1]["redelivery_of"] == answers[0]["position"]
    events = await stored_events(pool, order_id)
    assert [e["redelivery_of"] for e in events] == [None, answers[0]["position"]]


async def test_identical_deliveries_sharing_one_commit_are_linked(
    database_url: str, pool: asyncpg.Pool, live_token: str, order_id: str
) -> None:
    # A long commit delay makes the writer gather both into one transaction,
    # where the original's position is not known until the batch is placed.
    app = make_app(app_settings(database_url, commit_delay=0.25))
    body = webhook_body(order_id)

    async with AsyncTestClient(app=app) as own:
        await until_accepted(own, live_token, CredentialKind.WEBHOOK_TOKEN)
        responses = await concurrently(
            own,
            lambda http: [
                http.post(
                    WEBHOOK_PATH,
                    content=body,
                    headers={"locally-webhook-token": live_token},
                )
                for _ in range(3)
            ],
        )

    answers = sorted((r.json() for r in responses), key=lambda a: a["version"])
    events = await stored_events(pool, order_id)
    assert len({e["transaction_id"] for e in events}) == 1, "not one commit"
    assert [a["redelivery_of"] for a in answers] == [
        None,
        answers[0]["position"],
        answers[0]["position"],
    ]
    assert [e["redelivery_of"] for e in events] == [a["redelivery_of"] for a in answers]


async def test_identical_deliveries_in_one_append_link_to_the_first(
    pool: asyncpg.Pool, order_id: str
) -> None:
    store = EventStore()
    now = datetime.now(UTC)
    first = delivery(order_id, received_at=now)
    retry = delivery(order_id, received_at=now + timedelta(milliseconds=3))
    other = delivery(order_id, upc="2", received_at=now)

    async with pool.acquire() as connection, connection.transaction():
        events = await store.append(connection, [first, other, retry])

    assert [e.version for e in events] == [1, 1, 2]
    assert events[0].redelivery_of is None
    assert events[1].redelivery_of is None
    assert events[2].redelivery_of == events[0].position
    stored = await stored_events(pool, order_id)
    assert [e["position"] for e in stored] == [e.position for e in events]
    assert stored[2]["redelivery_of"] == events[0].position


async def test_window_is_measured_from_the_original_receive_time(
    pool: asyncpg.Pool, order_id: str
) -> None:
    store = EventStore(redelivery_window=120.0)
    start = datetime.now(UTC) - timedelta(hours=1)
    body = webhook_body(order_id)

    async with pool.acquire() as connection:
        async with connection.transaction():
            (original,) = await store.append(
                connection, [delivery(order_id, raw_body=body, received_at=start)]
            )
        async with connection.transaction():
            (inside,) = await store.append(
                connection,
                [
                    delivery(
                        order_id,
                        raw_body=body,
                        received_at=start + timedelta(seconds=119),
                    )
                ],
            )
        async with connection.transaction():
            (outside,) = await store.append(
                connection,
                [
                    delivery(
                        order_id,
                        raw_body=body,
                        received_at=start + timedelta(seconds=121),
                    )
                ],
            )

    assert inside.redelivery_of == original.position
    # Past the window the same body is a new original...
    assert outside.redelivery_of is None
    assert outside.version == 3


async def test_idempotency_key_matches_beyond_the_window(
    pool: asyncpg.Pool, order_id: str
) -> None:
    store = EventStore(redelivery_window=120.0)
    long_ago = datetime.now(UTC) - timedelta(days=2)

    async with pool.acquire() as connection:
        async with connection.transaction():
            (original,) = await store.append(
                connection,
                [delivery(order_id, received_at=long_ago, idempotency_key="k-1")],
            )
        async with connection.transaction():
            (repeat,) = await store.append(
                connection,
                [delivery(order_id, status="completed", idempotency_key="k-1")],
            )

    assert repeat.redelivery_of == original.position
