"""Webhook tokens: rotation, revocation, expiry and the two modes."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.auth.credentials import (
    CredentialCache,
    CredentialKind,
    create_credential,
    revoke_credential,
)
from ordertrail.lib.secrets import WEBHOOK_TOKEN_PREFIX, new_secret
from tests.integration.helpers import get_item, post_webhook, stored_events
from tests.support import (
    WEBHOOK_PATH,
    IssueToken,
    app_settings,
    concurrently,
    make_app,
    new_order_id,
    webhook_body,
)


async def until_refused(
    client: AsyncTestClient[Litestar], token: str, order_id: str, within: float
) -> float:
    """Deliver with ``token`` until it is refused; return how long that took."""
    started = time.monotonic()
    attempt = 0
    while time.monotonic() - started < within:
        attempt += 1
        body = webhook_body(order_id, status=f"message {attempt}")
        if (await post_webhook(client, body, token)).status_code == 401:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"token still accepted {within} s later")


async def test_two_live_tokens_are_accepted_at_once_during_a_rotation(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    issue_token: IssueToken,
    order_id: str,
) -> None:
    old = await issue_token("live")
    new = await issue_token("live")

    responses = await concurrently(
        client,
        lambda http: [
            http.post(
                WEBHOOK_PATH,
                content=webhook_body(order_id, upc=f"u{index}"),
                headers={"locally-webhook-token": token.secret},
            )
            for index, token in enumerate([old, new, old, new])
        ],
    )

    assert [r.status_code for r in responses] == [202] * 4
    events = await stored_events(pool, order_id)
    assert sorted(e["token_id"] for e in events) == sorted(
        [old.credential.id, new.credential.id] * 2
    )


async def test_revoked_token_is_refused_without_a_restart(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    issue_token: IssueToken,
    order_id: str,
) -> None:
    old = await issue_token("live")
    new = await issue_token("live")
    assert (
        await post_webhook(client, webhook_body(order_id), old.secret)
    ).status_code == 202

    async with pool.acquire() as connection:
        revoked = await revoke_credential(
            connection, CredentialKind.WEBHOOK_TOKEN, old.credential.id
        )

    assert revoked is not None
    assert revoked.revoked_at is not None
    # The change is announced; the service does not wait for its 30 s refresh.
    assert await until_refused(client, old.secret, new_order_id(), within=5.0) < 5.0
    after = await post_webhook(
        client, webhook_body(order_id, status="completed"), new.secret
    )
    assert after.status_code == 202


async def test_revoking_an_unknown_token_finds_nothing(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as connection:
        assert (
            await revoke_credential(
                connection, CredentialKind.WEBHOOK_TOKEN, "tok_nothing"
            )
            is None
        )


async def test_expired_token_is_refused_and_nothing_is_kept(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    issue_token: IssueToken,
    order_id: str,
) -> None:
    expired = await issue_token("live", expires_in=timedelta(seconds=-1))

    response = await post_webhook(client, b"not even json", expired.secret)
    again = await post_webhook(client, webhook_body(order_id), expired.secret)

    assert (response.status_code, again.status_code) == (401, 401)
    assert await stored_events(pool, order_id) == []


async def test_token_is_refused_once_it_expires(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    issue_token: IssueToken,
    order_id: str,
) -> None:
    expiring = await issue_token("live", expires_in=timedelta(seconds=1.5))
    before = await post_webhook(client, webhook_body(order_id), expiring.secret)
    expires_at = expiring.credential.expires_at
    assert expires_at is not None

    # No change is announced when a token expires; the service checks the time.
    await asyncio.sleep((expires_at - datetime.now(UTC)).total_seconds() + 0.05)
    after = await post_webhook(
        client, webhook_body(order_id, status="x"), expiring.secret
    )

    assert (before.status_code, after.status_code) == (202, 401)
    assert len(await stored_events(pool, order_id)) == 1


async def test_test_mode_deliveries_are_invisible_to_live_reads(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    test_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    accepted = await post_webhook(client, webhook_body(order_id), test_token)

    assert accepted.status_code == 202
    assert (await get_item(client, reader_key, order_id)).status_code == 404
    live_order = await client.get(
        f"/v1/orders/{order_id}", headers={"Authorization": f"Bearer {reader_key}"}
    )
    assert live_order.status_code == 404
    test_item = await get_item(client, reader_key, order_id, mode="test")
    assert test_item.status_code == 200
    assert test_item.json()["mode"] == "test"
    assert test_item.json()["state"] == "confirmed"
    (event,) = await stored_events(pool, order_id)
    assert event["mode"] == "test"


async def test_live_and_test_streams_of_the_same_item_are_separate(
    client: AsyncTestClient[Litestar],
    live_token: str,
    test_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    body = webhook_body(order_id)

    live = await post_webhook(client, body, live_token)
    test = await post_webhook(client, body, test_token)

    # The same body in the other mode is not a redelivery: another stream.
    assert (live.json()["version"], test.json()["version"]) == (1, 1)
    assert test.json()["redelivery"] is False
    assert (await get_item(client, reader_key, order_id)).json()["mode"] == "live"


async def test_token_created_a_moment_after_a_reload_is_accepted_at_once(
    pool: asyncpg.Pool,
) -> None:
    # The cache promises that a token created a moment ago works at once,
    # even before the change notification (which travels on another
    # connection and can lose the race against the token's first use).
    cache = CredentialCache(pool)
    await cache.reload()
    async with pool.acquire() as connection:
        issued = await create_credential(
            connection, CredentialKind.WEBHOOK_TOKEN, mode="live", label="tests"
        )

    found = await cache.verify(issued.secret, CredentialKind.WEBHOOK_TOKEN)

    assert found is not None
    assert found.id == issued.credential.id


class CountingPool:
    """Counts what a credential cache asks of the database."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.acquired = 0

    def acquire(self) -> Any:
        self.acquired += 1
        return self.pool.acquire()


async def test_a_flood_of_wrong_tokens_costs_the_database_little(
    pool: asyncpg.Pool,
) -> None:
    counting = CountingPool(pool)
    cache = CredentialCache(counting, miss_rate=5.0)  # type: ignore[arg-type]
    await cache.reload()
    loaded = counting.acquired

    for _ in range(200):
        wrong = new_secret(WEBHOOK_TOKEN_PREFIX)
        assert await cache.verify(wrong, CredentialKind.WEBHOOK_TOKEN) is None

    # Unknown secrets are looked up at most at the miss rate: a burst of
    # five, then about five a second, however many arrive.
    assert counting.acquired - loaded <= 5 + 5 * 1.0


async def test_token_from_the_environment_is_accepted(
    database_url: str, pool: asyncpg.Pool, order_id: str
) -> None:
    secret = new_secret(WEBHOOK_TOKEN_PREFIX)
    app = make_app(app_settings(database_url, webhook_token_test=secret))

    async with AsyncTestClient(app=app) as own:
        accepted = await post_webhook(own, webhook_body(order_id), secret)
        as_live = await post_webhook(own, webhook_body(new_order_id()), "otw_other")

    assert accepted.status_code == 202
    assert as_live.status_code == 401
    (event,) = await stored_events(pool, order_id)
    assert (event["mode"], event["token_id"]) == ("test", "env_test")
