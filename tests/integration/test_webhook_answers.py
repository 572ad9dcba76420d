"""Every answer ``POST /webhooks/locally`` gives, and what each leaves stored."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.services import Services
from ordertrail.ingest import quarantine
from ordertrail.ingest.controller import TOKEN_HEADER
from ordertrail.lib.secrets import WEBHOOK_TOKEN_PREFIX, new_secret
from tests.integration.helpers import (
    get_item,
    post_webhook,
    quarantined_by_request,
    quarantined_mentioning,
    stored_events,
)
from tests.support import (
    UPC,
    WEBHOOK_PATH,
    concurrently,
    new_order_id,
    webhook_body,
)

BODY_LIMIT = 64 * 1024


def problem(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"].startswith("application/problem+json")
    document = msgspec.json.decode(response.content)
    assert isinstance(document, dict)
    assert document["status"] == response.status_code
    assert document["request_id"] == response.headers["x-request-id"]
    return document


# 202 ---------------------------------------------------------------------------


async def test_accepted_delivery_answers_where_it_landed(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    response = await post_webhook(client, webhook_body(order_id), live_token)

    assert response.status_code == 202
    answer = response.json()
    (event,) = await stored_events(pool, order_id)
    assert answer == {
        "position": event["position"],
        "order_id": order_id,
        "upc": UPC,
        "version": 1,
        "redelivery": False,
        "redelivery_of": None,
    }
    assert event["request_id"] == response.headers["x-request-id"]


async def test_accepted_delivery_reads_back_at_once(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    # The item view is written in the append's transaction: a POS that polls
    # right after the 202 already sees the new state.
    accepted = await post_webhook(client, webhook_body(order_id), live_token)
    item = await get_item(client, reader_key, order_id)

    assert item.status_code == 200
    view = item.json()
    assert view["state"] == "confirmed"
    assert view["version"] == 1
    assert view["position"] == accepted.json()["position"]
    assert view["last_status"] == "confirmed"
    assert view["order_url"] == f"https://www.locally.com/api/v2/cart/{order_id}"


async def test_body_of_exactly_the_limit_is_accepted(
    client: AsyncTestClient[Litestar], live_token: str, order_id: str
) -> None:
    body = webhook_body(order_id, padding="")
    body = webhook_body(order_id, padding="x" * (BODY_LIMIT - len(body)))
    assert len(body) == BODY_LIMIT

    assert (await post_webhook(client, body, live_token)).status_code == 202


# 401 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [None, "", new_secret(WEBHOOK_TOKEN_PREFIX), "confirmed"],
    ids=["missing", "empty", "unknown", "garbage"],
)
async def test_delivery_without_a_valid_token_is_refused_and_not_kept(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    token: str | None,
    order_id: str,
) -> None:
    response = await post_webhook(client, webhook_body(order_id), token)

    assert response.status_code == 401
    assert problem(response)["type"] == "urn:ordertrail:problem:unauthenticated"
    assert await stored_events(pool, order_id) == []
    assert await quarantined_mentioning(pool, order_id) == 0


async def test_api_key_is_not_a_webhook_token(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool, admin_key: str, order_id: str
) -> None:
    response = await post_webhook(client, webhook_body(order_id), admin_key)

    assert response.status_code == 401
    assert await stored_events(pool, order_id) == []


async def test_unauthenticated_unreadable_body_is_not_quarantined(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool, order_id: str
) -> None:
    # Nothing is read or kept for a caller without a token, not even junk.
    response = await post_webhook(client, f"junk {order_id}".encode(), "wrong")

    assert response.status_code == 401
    assert await quarantined_mentioning(pool, order_id) == 0


# 413 ---------------------------------------------------------------------------


async def test_body_over_the_limit_is_refused_and_kept_truncated(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    order_id: str,
) -> None:
    body = webhook_body(order_id, padding="x" * BODY_LIMIT)

    response = await post_webhook(client, body, live_token)

    assert response.status_code == 413
    assert problem(response)["type"] == "urn:ordertrail:problem:body-too-large"
    held = await quarantined_by_request(pool, response.headers["x-request-id"])
    assert held is not None
    assert held["truncated"] is True
    assert held["body_length"] == len(body)
    assert held["raw_body"] == body[:BODY_LIMIT]
    assert held["mode"] == "live"
    assert await stored_events(pool, order_id) == []


# 422 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("not json at all {order_id}", "JSON is malformed"),
        ('{{"upc":"1","status":"confirmed","note":"{order_id}"}}', "`order_id`"),
        ('{{"upc":1,"order_id":"{order_id}","status":"confirmed"}}', "$.upc"),
        ('{{"upc":"1","order_id":"{order_id}","status":["confirmed"]}}', "$.status"),
    ],
    ids=["not-json", "missing-order-id", "number-for-upc", "list-for-status"],
)
async def test_unreadable_body_is_refused_and_kept_whole(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    template: str,
    reason: str,
) -> None:
    order_id = new_order_id()
    body = template.format(order_id=order_id).encode()

    response = await post_webhook(
        client, body, live_token, headers={"idempotency-key": f"k-{order_id}"}
    )

    assert response.status_code == 422
    document = problem(response)
    assert document["type"] == "urn:ordertrail:problem:invalid-payload"
    held = await quarantined_by_request(pool, response.headers["x-request-id"])
    assert held is not None
    assert held["raw_body"] == body
    assert held["body_length"] == len(body)
    assert held["truncated"] is False
    assert reason in held["reason"]
    assert held["content_type"] == "application/json"
    assert held["idempotency_key"] == f"k-{order_id}"
    assert held["released_at"] is None
    assert f"Kept as quarantine {held['id']}." in str(document["detail"])
    assert await stored_events(pool, order_id) == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded",
        "text/plain; charset=utf-8",
        "multipart/form-data; boundary=x",
        "application/json, text/plain",
    ],
)
async def test_unreadable_body_declared_as_another_type_is_415_and_kept(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    content_type: str,
) -> None:
    order_id = new_order_id()
    body = f"order_id={order_id}&status=confirmed".encode()

    response = await post_webhook(
        client, body, live_token, headers={"content-type": content_type}
    )

    assert response.status_code == 415
    document = problem(response)
    assert document["type"] == "urn:ordertrail:problem:unsupported-media-type"
    assert "application/json" in str(document["detail"])
    held = await quarantined_by_request(pool, response.headers["x-request-id"])
    assert held is not None
    assert held["raw_body"] == body
    assert held["content_type"] == content_type
    assert held["released_at"] is None
    assert f"Kept as quarantine {held['id']}." in str(document["detail"])
    assert await stored_events(pool, order_id) == []


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json; charset=utf-8",
        "Application/Problem+JSON",
        "text/json",
    ],
)
async def test_unreadable_body_declared_as_json_or_undeclared_is_422(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    content_type: str | None,
) -> None:
    body = b"{not json"
    request_id = uuid.uuid4().hex
    headers = {"x-request-id": request_id}
    if content_type is not None:
        headers["content-type"] = content_type
    response = await client.post(
        WEBHOOK_PATH, content=body, headers={TOKEN_HEADER: live_token, **headers}
    )

    assert response.status_code == 422
    assert problem(response)["type"] == "urn:ordertrail:problem:invalid-payload"
    held = await quarantined_by_request(pool, request_id)
    assert held is not None
    assert held["raw_body"] == body
    assert held["content_type"] == content_type


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png"]
)
async def test_readable_webhook_is_an_event_whatever_its_declared_type(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    order_id: str,
    content_type: str,
) -> None:
    body = webhook_body(order_id)

    response = await post_webhook(
        client, body, live_token, headers={"content-type": content_type}
    )

    assert response.status_code == 202
    (event,) = await stored_events(pool, order_id)
    assert event["raw_body"] == body


async def test_release_turns_a_readable_quarantined_body_into_an_event(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    services: Services,
    reader_key: str,
    order_id: str,
) -> None:
    # A body an older release could not read, held three days ago.
    received_at = datetime.now(UTC).replace(microsecond=123456) - timedelta(days=3)
    body = webhook_body(order_id, status="ready for pickup")
    quarantine_id = await quarantine.hold(
        pool,
        received_at=received_at,
        mode="live",
        request_id="held-request",
        client_address="203.0.113.9",
        token_id="tok_held",
        content_type="application/json",
        idempotency_key=None,
        raw_body=body,
        body_length=len(body),
        truncated=False,
        reason="an older reason",
    )

    async with pool.acquire() as connection:
        released = await quarantine.release(
            connection, services.store, services.served, quarantine_id
        )
        held = await quarantine.show(connection, quarantine_id)

    assert released.released is True
    (event,) = await stored_events(pool, order_id)
    assert released.position == event["position"]
    assert event["received_at"] == received_at
    assert event["raw_body"] == body
    assert (event["request_id"], event["token_id"]) == ("held-request", "tok_held")
    assert event["client_address"] == "203.0.113.9"
    assert held is not None
    assert held.released_at is not None
    assert held.released_position == event["position"]
    view = (await get_item(client, reader_key, order_id)).json()
    assert view["state"] == "confirmed"
    assert view["fulfilment"] == "pickup"
    assert view["first_event_at"] == received_at.isoformat().replace("+00:00", "Z")


async def test_release_keeps_what_still_cannot_be_read(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    services: Services,
    live_token: str,
    order_id: str,
) -> None:
    body = f'{{"upc":"1","order":"{order_id}","status":"confirmed"}}'.encode()
    response = await post_webhook(client, body, live_token)
    held = await quarantined_by_request(pool, response.headers["x-request-id"])
    assert held is not None

    async with pool.acquire() as connection:
        released = await quarantine.release(
            connection, services.store, services.served, held["id"]
        )
        still = await quarantine.show(connection, held["id"])

    assert released.released is False
    assert released.reason is not None
    assert "order_id" in released.reason
    assert still is not None
    assert still.released_at is None


async def test_release_refuses_truncated_and_released_deliveries(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    services: Services,
    live_token: str,
    order_id: str,
) -> None:
    big = await post_webhook(
        client, webhook_body(order_id, padding="x" * BODY_LIMIT), live_token
    )
    truncated = await quarantined_by_request(pool, big.headers["x-request-id"])
    assert truncated is not None
    body = webhook_body(order_id, upc="2")
    readable = await quarantine.hold(
        pool,
        received_at=datetime.now(UTC),
        mode="live",
        request_id="r",
        client_address=None,
        token_id="tok_held",
        content_type=None,
        idempotency_key=None,
        raw_body=body,
        body_length=len(body),
        truncated=False,
        reason="r",
    )

    async with pool.acquire() as connection:
        store, served = services.store, services.served
        refused = await quarantine.release(connection, store, served, truncated["id"])
        first = await quarantine.release(connection, store, served, readable)
        second = await quarantine.release(connection, store, served, readable)
        missing = await quarantine.release(connection, store, served, 2**62)

    assert (refused.released, refused.reason) == (
        False,
        "only the first part of this body was kept",
    )
    assert first.released is True
    assert (second.released, second.position, second.reason) == (
        False,
        first.position,
        "already released",
    )
    assert missing.released is False
    assert len(await stored_events(pool, order_id)) == 1


# 503 ---------------------------------------------------------------------------


@pytest.fixture
async def commit_refused_for(pool: asyncpg.Pool) -> AsyncIterator[str]:
    """An order id whose events the database refuses at COMMIT, not before.

    A deferred constraint trigger runs at COMMIT, after the append and the
    projection update succeeded: the last moment a write can fail.
    """
    doomed = new_order_id()
    assert re.fullmatch(r"[A-Z0-9]+", doomed)
    await pool.execute(
        """
        CREATE FUNCTION tests_refuse_commit() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.order_id = TG_ARGV[0] THEN
                RAISE EXCEPTION 'commit refused for order %', NEW.order_id;
            END IF;
            RETURN NULL;
        END;
        $$
        """
    )
    await pool.execute(
        f"""
        CREATE CONSTRAINT TRIGGER tests_refuse_commit
            AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION tests_refuse_commit('{doomed}')
        """
    )
    try:
        yield doomed
    finally:
        await pool.execute("DROP TRIGGER IF EXISTS tests_refuse_commit ON events")
        await pool.execute("DROP FUNCTION IF EXISTS tests_refuse_commit()")


async def test_failed_commit_answers_503_and_keeps_nothing(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    reader_key: str,
    commit_refused_for: str,
) -> None:
    order_id = commit_refused_for

    response = await post_webhook(client, webhook_body(order_id), live_token)

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert problem(response)["type"] == "urn:ordertrail:problem:unavailable"
    assert await stored_events(pool, order_id) == []
    assert (await get_item(client, reader_key, order_id)).status_code == 404


async def test_retry_after_a_failed_commit_is_the_first_event(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    commit_refused_for: str,
) -> None:
    order_id = commit_refused_for
    body = webhook_body(order_id)
    assert (await post_webhook(client, body, live_token)).status_code == 503

    await pool.execute("DROP TRIGGER tests_refuse_commit ON events")
    retried = await post_webhook(client, body, live_token)

    assert retried.status_code == 202
    assert retried.json()["version"] == 1
    assert retried.json()["redelivery"] is False
    assert len(await stored_events(pool, order_id)) == 1


async def test_failed_commit_does_not_sink_the_rest_of_its_batch(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    commit_refused_for: str,
) -> None:
    healthy = [new_order_id() for _ in range(5)]
    orders = [commit_refused_for, *healthy]

    responses = await concurrently(
        client,
        lambda http: [
            http.post(
                WEBHOOK_PATH,
                content=webhook_body(order),
                headers={"locally-webhook-token": live_token},
            )
            for order in orders
        ],
    )

    assert [r.status_code for r in responses] == [503] + [202] * len(healthy)
    assert await stored_events(pool, commit_refused_for) == []
    for order in healthy:
        assert len(await stored_events(pool, order)) == 1
