"""Rate limits: failed authentications per address, requests per API key."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.auth.credentials import CredentialKind, Role
from ordertrail.lib.secrets import WEBHOOK_TOKEN_PREFIX, new_secret
from tests.integration.helpers import (
    post_webhook,
    quarantined_mentioning,
    stored_events,
)
from tests.support import (
    IssueKey,
    app_settings,
    bearer,
    make_app,
    until_accepted,
    webhook_body,
)

BURST = 3
FORWARDED = "x-forwarded-for"


@pytest.fixture(scope="module")
async def limited(database_url: str) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """An app whose limits are small, with client addresses set per request."""
    settings = app_settings(
        database_url,
        key_rate=0.01,
        key_burst=BURST,
        failure_rate=0.01,
        failure_burst=BURST,
        trusted_client_header=FORWARDED,
    )
    async with AsyncTestClient(app=make_app(settings)) as client:
        yield client


def address() -> dict[str, str]:
    """A client address of this test's own, so buckets do not carry over."""
    # The trusted proxy appends what it saw: the last entry is the address.
    return {FORWARDED: f"10.0.0.1, 198.51.100.{uuid.uuid4().int % 250}"}


async def test_guessing_webhook_tokens_is_slowed_down(
    limited: AsyncTestClient[Litestar], pool: asyncpg.Pool, order_id: str
) -> None:
    sender = address()
    codes = []
    for _ in range(BURST + 2):
        guess = new_secret(WEBHOOK_TOKEN_PREFIX)
        response = await post_webhook(
            limited, webhook_body(order_id), guess, headers=sender
        )
        codes.append(response.status_code)

    assert codes == [401] * BURST + [429, 429]
    assert response.headers["retry-after"].isdigit()
    assert response.json()["type"] == "urn:ordertrail:problem:rate-limited"
    assert await stored_events(pool, order_id) == []
    assert await quarantined_mentioning(pool, order_id) == 0


async def test_other_addresses_are_not_held_back_by_one_guesser(
    limited: AsyncTestClient[Litestar], live_token: str, order_id: str
) -> None:
    await until_accepted(limited, live_token, CredentialKind.WEBHOOK_TOKEN)
    guesser = address()
    for _ in range(BURST + 1):
        await post_webhook(
            limited, webhook_body(order_id), "otw_guess", headers=guesser
        )

    wrong = await post_webhook(
        limited, webhook_body(order_id), "otw_guess", headers=address()
    )
    right = await post_webhook(
        limited, webhook_body(order_id), live_token, headers=address()
    )

    assert (wrong.status_code, right.status_code) == (401, 202)


async def test_authenticated_delivery_is_never_held_back_by_failures(
    limited: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    order_id: str,
) -> None:
    # The limits promise that Locally's own deliveries, which authenticate,
    # are never held back. A 429 to a delivery with the right token is one
    # more retry used up; after three, Locally never sends it again.
    await until_accepted(limited, live_token, CredentialKind.WEBHOOK_TOKEN)
    shared = address()
    for _ in range(BURST + 1):
        await post_webhook(limited, webhook_body(order_id), "otw_stale", headers=shared)

    response = await post_webhook(
        limited, webhook_body(order_id), live_token, headers=shared
    )

    assert response.status_code == 202
    assert len(await stored_events(pool, order_id)) == 1


async def test_an_api_key_over_its_rate_is_told_when_to_retry(
    limited: AsyncTestClient[Litestar],
    issue_key: IssueKey,
    live_token: str,
    order_id: str,
) -> None:
    await until_accepted(limited, live_token, CredentialKind.WEBHOOK_TOKEN)
    await post_webhook(limited, webhook_body(order_id), live_token, headers=address())
    busy = (await issue_key(Role.READER)).secret
    other = (await issue_key(Role.READER)).secret
    for key in (busy, other):
        await until_accepted(limited, key, CredentialKind.API_KEY)
    url = f"/v1/orders/{order_id}"

    codes = [
        (await limited.get(url, headers={**bearer(busy), **address()})).status_code
        for _ in range(BURST + 1)
    ]
    elsewhere = await limited.get(url, headers={**bearer(other), **address()})

    assert codes == [200] * BURST + [429]
    assert elsewhere.status_code == 200
