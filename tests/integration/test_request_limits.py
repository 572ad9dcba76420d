"""Rate limits: per API key, and per address for failed authentication.

Every test runs an app of its own with small limits, so that the buckets it
drains are its own and nothing else in the run is slowed or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.auth.credentials import CredentialKind, Role
from ordertrail.lib.secrets import API_KEY_PREFIX, WEBHOOK_TOKEN_PREFIX, new_secret
from tests.integration.api_support import issue, problem, running_app
from tests.integration.helpers import TOKEN_HEADER, stored_events
from tests.support import WEBHOOK_PATH, bearer, new_order_id, webhook_body

FORWARDED = "X-Forwarded-For"


@dataclass(frozen=True)
class Limited:
    """An app with small limits, a key of each role, and a live token."""

    client: AsyncTestClient[Litestar]
    keys: dict[Role, str]
    token: str
    order_id: str


@contextlib.asynccontextmanager
async def limited(
    database_url: str, pool: asyncpg.Pool, **limits: Any
) -> AsyncIterator[Limited]:
    async with running_app(database_url, **limits) as client:
        keys = {
            role: (await issue(client, pool, CredentialKind.API_KEY, role=role)).secret
            for role in Role
        }
        token = await issue(client, pool, CredentialKind.WEBHOOK_TOKEN, mode="live")
        order_id = new_order_id()
        # Webhooks spend nothing of a key's budget; this one makes an order
        # for the key tests to read.
        created = await client.post(
            WEBHOOK_PATH,
            content=webhook_body(order_id),
            headers={TOKEN_HEADER: token.secret},
        )
        assert created.status_code == 202
        yield Limited(client, keys, token.secret, order_id)


def retry_after(response: httpx.Response) -> int:
    """Check a 429 problem and return its Retry-After, in whole seconds."""
    document = problem(response, 429)
    assert document["type"] == "urn:ordertrail:problem:rate-limited"
    value = response.headers["retry-after"]
    assert value.isdigit(), value
    seconds = int(value)
    assert seconds >= 1
    return seconds


async def read(
    service: Limited, key: str | None, path: str = "/v1/items", **headers: str
) -> httpx.Response:
    sent = {**(bearer(key) if key is not None else {}), **headers}
    return await service.client.get(path, headers=sent)


async def wrong_key(service: Limited, **headers: str) -> httpx.Response:
    return await read(service, new_secret(API_KEY_PREFIX), **headers)


async def deliver(
    service: Limited, token: str, order_id: str, **headers: str
) -> httpx.Response:
    return await service.client.post(
        WEBHOOK_PATH,
        content=webhook_body(order_id),
        headers={TOKEN_HEADER: token, **headers},
    )


# Per key -----------------------------------------------------------------------


async def test_a_key_over_its_burst_is_told_when_to_retry_and_then_served(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, key_rate=2, key_burst=3) as service:
        key = service.keys[Role.READER]

        within_burst = [(await read(service, key)).status_code for _ in range(3)]
        over = await read(service, key)
        other_key = await read(service, service.keys[Role.AUDITOR])
        wait = retry_after(over)
        await asyncio.sleep(wait)
        recovered = await read(service, key)

    assert within_burst == [200, 200, 200]
    # The bucket is the key's own: another key is served meanwhile.
    assert other_key.status_code == 200
    assert recovered.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/items",
        "/v1/changes",
        "/v1/orders/{order_id}",
        "/v1/orders/{order_id}/events",
        "/v1/admin/quarantine",
    ],
)
async def test_each_request_spends_one_request_of_the_burst(
    database_url: str, pool: asyncpg.Pool, path: str
) -> None:
    # The burst is a number of requests, whichever endpoint they read and
    # however many checks the endpoint makes of the key.
    async with limited(database_url, pool, key_rate=0.01, key_burst=4) as service:
        key = service.keys[Role.ADMIN]
        url = path.format(order_id=service.order_id)

        statuses = [(await read(service, key, url)).status_code for _ in range(5)]

    assert statuses == [200, 200, 200, 200, 429]


async def test_a_rate_of_zero_turns_the_key_limit_off(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, key_rate=0, key_burst=1) as service:
        key = service.keys[Role.READER]

        statuses = {(await read(service, key)).status_code for _ in range(30)}

    assert statuses == {200}


# Per address, on failed authentication ----------------------------------------

_FAILURES = {"key_rate": 0, "failure_rate": 0.5, "failure_burst": 3}


@pytest.mark.slow
async def test_wrong_keys_from_one_address_are_refused_then_it_recovers(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, **_FAILURES) as service:
        reader = service.keys[Role.READER]

        failures = [(await wrong_key(service)).status_code for _ in range(3)]
        flooding = await wrong_key(service)
        # Only failures are held back: a valid key or token from the same
        # address is served, so Locally's deliveries never wait behind a
        # guesser who shares its address.
        valid_key = await read(service, reader)
        order_id = new_order_id()
        valid_token = await deliver(service, service.token, order_id)
        await asyncio.sleep(retry_after(flooding))
        after_wait = await wrong_key(service)

    assert failures == [401, 401, 401]
    assert valid_key.status_code == 200
    assert valid_token.status_code == 202
    assert len(await stored_events(pool, order_id)) == 1
    assert after_wait.status_code == 401


async def test_wrong_webhook_tokens_from_one_address_are_refused(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, **_FAILURES) as service:
        order_id = new_order_id()
        made_up = new_secret(WEBHOOK_TOKEN_PREFIX)

        failures = [
            (await deliver(service, made_up, order_id)).status_code for _ in range(3)
        ]
        flooding = await deliver(service, made_up, order_id)
        valid_token = await deliver(service, service.token, order_id)
        valid_key = await read(service, service.keys[Role.ADMIN])

    assert failures == [401, 401, 401]
    retry_after(flooding)
    assert valid_token.status_code == 202
    assert valid_key.status_code == 200
    assert len(await stored_events(pool, order_id)) == 1


async def test_key_and_token_failures_share_the_address_budget(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, **_FAILURES) as service:
        order_id = new_order_id()
        made_up = new_secret(WEBHOOK_TOKEN_PREFIX)

        first = [(await wrong_key(service)).status_code for _ in range(2)]
        third = await deliver(service, made_up, order_id)
        fourth = await deliver(service, made_up, order_id)

    assert first == [401, 401]
    assert third.status_code == 401
    retry_after(fourth)


async def test_a_missing_key_counts_as_a_failure(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, **_FAILURES) as service:
        statuses = [(await read(service, None)).status_code for _ in range(4)]

    assert statuses == [401, 401, 401, 429]


async def test_successful_requests_spend_nothing_of_the_address_budget(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, **_FAILURES) as service:
        served = [
            (await read(service, service.keys[Role.READER])).status_code
            for _ in range(10)
        ]
        failures = [(await wrong_key(service)).status_code for _ in range(3)]

    assert set(served) == {200}
    assert failures == [401, 401, 401]


async def test_a_failure_rate_of_zero_turns_the_address_limit_off(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, failure_rate=0, failure_burst=1) as service:
        statuses = {(await wrong_key(service)).status_code for _ in range(10)}

    assert statuses == {401}


# Which address -----------------------------------------------------------------


async def test_the_trusted_header_tells_addresses_apart(
    database_url: str, pool: asyncpg.Pool
) -> None:
    settings = {**_FAILURES, "trusted_client_header": FORWARDED}
    async with limited(database_url, pool, **settings) as service:
        reader = service.keys[Role.READER]
        guesser = {FORWARDED: "198.51.100.1"}
        neighbour = {FORWARDED: "198.51.100.2"}

        failures = [(await wrong_key(service, **guesser)).status_code for _ in range(3)]
        guesser_refused = await wrong_key(service, **guesser)
        guesser_valid = await read(service, reader, **guesser)
        neighbour_wrong = await wrong_key(service, **neighbour)
        neighbour_valid = await read(service, reader, **neighbour)
        # Without the header the request is the proxy's own address, which
        # has failed nothing yet.
        unlabelled = await read(service, reader)

    assert failures == [401, 401, 401]
    retry_after(guesser_refused)
    assert guesser_valid.status_code == 200
    assert neighbour_wrong.status_code == 401
    assert neighbour_valid.status_code == 200
    assert unlabelled.status_code == 200


async def test_a_forwarded_header_that_is_not_trusted_is_ignored(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with limited(database_url, pool, **_FAILURES) as service:
        # Anyone can send the header; unless configured, it names nothing.
        statuses = [
            (await wrong_key(service, **{FORWARDED: f"192.0.2.{n}"})).status_code
            for n in range(4)
        ]
        valid = await read(
            service, service.keys[Role.READER], **{FORWARDED: "192.0.2.200"}
        )

    assert statuses == [401, 401, 401, 429]
    # The valid key is served all the same: only failures are limited.
    assert valid.status_code == 200


async def test_a_client_cannot_pick_its_address_through_a_trusted_proxy(
    database_url: str, pool: asyncpg.Pool
) -> None:
    # A proxy appends the address it saw to whatever X-Forwarded-For the
    # client sent, so only the last entry is the proxy's word; the ones
    # before it are the client's own claims.
    settings = {**_FAILURES, "trusted_client_header": FORWARDED}
    async with limited(database_url, pool, **settings) as service:
        statuses = [
            (
                await wrong_key(service, **{FORWARDED: f"10.0.0.{n}, 203.0.113.9"})
            ).status_code
            for n in range(4)
        ]

    assert statuses == [401, 401, 401, 429]


@pytest.mark.parametrize(
    "claimed", ["198.51.100.7\x00", "198.51.100.7\x1b[31m", "\x7f"]
)
async def test_a_forwarded_address_that_is_no_address_names_the_peer(
    database_url: str, pool: asyncpg.Pool, claimed: str
) -> None:
    # The delivery is authenticated: it is stored, with the peer's address
    # rather than characters no address has.
    settings = {**_FAILURES, "trusted_client_header": FORWARDED}
    async with limited(database_url, pool, **settings) as service:
        order_id = new_order_id()
        response = await deliver(
            service, service.token, order_id, **{FORWARDED: claimed}
        )

    assert response.status_code == 202, response.text
    [event] = await stored_events(pool, order_id)
    assert event["client_address"] == "testclient"
