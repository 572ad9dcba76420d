"""The read API: orders, items, event histories, keys and roles, health."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from datetime import timedelta

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.auth.credentials import CredentialKind, Role, revoke_credential
from ordertrail.lib.secrets import API_KEY_PREFIX, new_secret
from tests.integration.helpers import get_item, post_webhook, stored_events
from tests.support import (
    UPC,
    IssueKey,
    app_settings,
    bearer,
    make_app,
    webhook_body,
    with_database,
)


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/problem+json")
    document = msgspec.json.decode(response.content)
    assert document["status"] == response.status_code
    return str(document["type"])


async def deliver(
    client: AsyncTestClient[Litestar],
    token: str,
    order_id: str,
    *statuses: str,
    upc: str = UPC,
) -> list[dict[str, object]]:
    answers = []
    for status in statuses:
        response = await post_webhook(
            client, webhook_body(order_id, upc=upc, status=status), token
        )
        assert response.status_code == 202
        answers.append(response.json())
    return answers


# Orders and items ---------------------------------------------------------------


async def test_unknown_order_and_item_are_404_problems(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    order = await client.get(f"/v1/orders/{order_id}", headers=bearer(reader_key))
    item = await get_item(client, reader_key, order_id)
    await deliver(client, live_token, order_id, "confirmed")
    other_item = await get_item(client, reader_key, order_id, "000000000000")

    assert order.status_code == 404
    assert problem_type(order) == "urn:ordertrail:problem:order-not-found"
    assert item.status_code == 404
    assert problem_type(item) == "urn:ordertrail:problem:item-not-found"
    assert other_item.status_code == 404
    assert problem_type(other_item) == "urn:ordertrail:problem:item-not-found"


async def test_order_rolls_up_its_items(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    await deliver(client, live_token, order_id, "ordered", "confirmed", upc="1")
    await deliver(client, live_token, order_id, "ordered", upc="2")
    answers = await deliver(client, live_token, order_id, "cancelled", upc="3")

    response = await client.get(f"/v1/orders/{order_id}", headers=bearer(reader_key))

    assert response.status_code == 200
    order = response.json()
    assert order["order_id"] == order_id
    assert order["mode"] == "live"
    assert order["state"] == "ordered"
    assert order["item_count"] == 3
    assert order["item_states"] == {"cancelled": 1, "confirmed": 1, "ordered": 1}
    assert order["position"] == answers[-1]["position"]
    assert [item["upc"] for item in order["items"]] == ["1", "2", "3"]


async def test_unknown_status_is_stored_and_shown_on_the_item(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    await deliver(client, live_token, order_id, "Teleported To Store")

    view = (await get_item(client, reader_key, order_id)).json()

    assert view["state"] == "new"
    assert view["last_status"] == "Teleported To Store"
    assert view["unrecognized_statuses"] == {"Teleported To Store": 1}
    assert view["last_transition"] is None
    (event,) = await stored_events(pool, order_id)
    assert event["raw_status"] == "Teleported To Store"


async def test_out_of_order_report_is_flagged_and_state_stays(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    answers = await deliver(client, live_token, order_id, "confirmed", "ordered")

    view = (await get_item(client, reader_key, order_id)).json()

    assert view["state"] == "confirmed"
    assert view["anomalies"] == [
        {
            "kind": "out_of_order",
            "position": answers[1]["position"],
            "version": 2,
            "raw_status": "ordered",
            "transition": "ordered",
            "state": "confirmed",
        }
    ]
    assert view["event_count"] == 2


async def test_unknown_fields_are_kept_byte_for_byte(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    auditor_key: str,
    order_id: str,
) -> None:
    # Odd spacing, key order, escapes and fields ordertrail does not read.
    body = (
        b'{ "status" :"confirmed",\n\t'
        b'"store": {"id": 4021, "name": "Caf\\u00e9 Bikes"},'
        b' "order_id":"' + order_id.encode() + b'", "upc":"' + UPC.encode() + b'",'
        b' "flags":[true,null,1.50e2], "note":"\xc3\xa9t\xc3\xa9"  }'
    )

    assert (await post_webhook(client, body, live_token)).status_code == 202

    (event,) = await stored_events(pool, order_id)
    assert event["raw_body"] == body
    history = await client.get(
        f"/v1/orders/{order_id}/events", headers=bearer(auditor_key)
    )
    (shown,) = history.json()["events"]
    assert base64.b64decode(shown["raw_body_base64"]) == body
    assert shown["raw_body"] == body.decode("utf-8")


# Event history ------------------------------------------------------------------


async def test_event_history_shows_each_event_as_recorded(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    auditor_key: str,
    order_id: str,
) -> None:
    await deliver(client, live_token, order_id, "ordered", "Teleported")
    await deliver(client, live_token, order_id, "Teleported")

    response = await client.get(
        f"/v1/orders/{order_id}/events", headers=bearer(auditor_key)
    )

    assert response.status_code == 200
    history = response.json()
    stored = await stored_events(pool, order_id)
    assert history["next_after"] is None
    assert [e["position"] for e in history["events"]] == [e["position"] for e in stored]
    first, unknown, retry = history["events"]
    assert (first["transition"], unknown["transition"]) == ("ordered", None)
    assert retry["redelivery"] is True
    assert retry["redelivery_of"] == unknown["position"]
    assert first["hash"] == stored[0]["hash"].hex()
    assert unknown["previous_hash"] == first["hash"]
    assert first["previous_hash"] == "00" * 32


async def test_event_history_pages_by_position(
    client: AsyncTestClient[Litestar],
    live_token: str,
    auditor_key: str,
    order_id: str,
) -> None:
    answers = await deliver(
        client, live_token, order_id, "ordered", "confirmed", "completed"
    )
    url = f"/v1/orders/{order_id}/events"

    first = (
        await client.get(url, headers=bearer(auditor_key), params={"limit": 2})
    ).json()
    rest = await client.get(
        url,
        headers=bearer(auditor_key),
        params={"limit": 2, "after": first["next_after"]},
    )

    assert [e["position"] for e in first["events"]] == [
        a["position"] for a in answers[:2]
    ]
    assert first["next_after"] == answers[1]["position"]
    assert [e["position"] for e in rest.json()["events"]] == [answers[2]["position"]]
    assert rest.json()["next_after"] is None


async def test_event_history_of_an_unknown_order_is_404(
    client: AsyncTestClient[Litestar], auditor_key: str, order_id: str
) -> None:
    response = await client.get(
        f"/v1/orders/{order_id}/events", headers=bearer(auditor_key)
    )

    assert response.status_code == 404
    assert problem_type(response) == "urn:ordertrail:problem:order-not-found"


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"after": -1}, "after"),
        ({"mode": "staging"}, "mode"),
    ],
)
async def test_bad_query_parameters_are_400_problems(
    client: AsyncTestClient[Litestar],
    auditor_key: str,
    order_id: str,
    params: dict[str, str | int],
    parameter: str,
) -> None:
    response = await client.get(
        f"/v1/orders/{order_id}/events", headers=bearer(auditor_key), params=params
    )

    assert response.status_code == 400
    assert problem_type(response) == "urn:ordertrail:problem:invalid-parameter"
    assert response.json()["parameter"] == parameter


# Keys and roles -----------------------------------------------------------------


# What each role may read: items and orders, and the full event history.
ROLE_ANSWERS = {
    Role.READER: (200, 200, 403),
    Role.AUDITOR: (200, 200, 200),
    Role.ADMIN: (200, 200, 200),
}


@pytest.mark.parametrize("role", list(ROLE_ANSWERS))
async def test_roles_open_what_they_include(
    client: AsyncTestClient[Litestar],
    issue_key: IssueKey,
    live_token: str,
    order_id: str,
    role: Role,
) -> None:
    await deliver(client, live_token, order_id, "confirmed")
    key = (await issue_key(role)).secret

    item = await get_item(client, key, order_id)
    order = await client.get(f"/v1/orders/{order_id}", headers=bearer(key))
    history = await client.get(f"/v1/orders/{order_id}/events", headers=bearer(key))

    answers = (item.status_code, order.status_code, history.status_code)
    assert answers == ROLE_ANSWERS[role]
    if history.status_code == 403:
        assert problem_type(history) == "urn:ordertrail:problem:forbidden"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {new_secret(API_KEY_PREFIX)}"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["none", "empty", "no-key", "unknown-key", "basic"],
)
@pytest.mark.parametrize("path", ["", "/events", f"/items/{UPC}"])
async def test_reads_without_a_valid_key_are_401(
    client: AsyncTestClient[Litestar], order_id: str, headers: dict[str, str], path: str
) -> None:
    response = await client.get(f"/v1/orders/{order_id}{path}", headers=headers)

    assert response.status_code == 401
    assert problem_type(response) == "urn:ordertrail:problem:unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_webhook_token_is_not_an_api_key(
    client: AsyncTestClient[Litestar], live_token: str, order_id: str
) -> None:
    await deliver(client, live_token, order_id, "confirmed")

    response = await get_item(client, live_token, order_id)

    assert response.status_code == 401


async def test_expired_and_revoked_keys_are_refused(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    issue_key: IssueKey,
    live_token: str,
    order_id: str,
) -> None:
    await deliver(client, live_token, order_id, "confirmed")
    expired = await issue_key(Role.ADMIN, expires_in=timedelta(seconds=-1))
    revoked = await issue_key(Role.ADMIN)
    assert (await get_item(client, revoked.secret, order_id)).status_code == 200

    async with pool.acquire() as connection:
        await revoke_credential(
            connection, CredentialKind.API_KEY, revoked.credential.id
        )
    deadline = time.monotonic() + 5
    while (await get_item(client, revoked.secret, order_id)).status_code == 200:
        assert time.monotonic() < deadline, "revoked key still accepted"
        await asyncio.sleep(0.02)

    assert (await get_item(client, expired.secret, order_id)).status_code == 401
    assert (await get_item(client, revoked.secret, order_id)).status_code == 401


# Health -------------------------------------------------------------------------


async def test_liveness_needs_nothing(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/health/live")

    assert response.status_code == 200
    assert response.json() == {"status": "live"}


async def test_ready_when_database_answers_and_schema_is_current(
    client: AsyncTestClient[Litestar],
) -> None:
    response = await client.get("/health/ready")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "database": "ok",
        "migrations": "current",
    }


async def test_not_ready_when_a_migration_is_pending(server_url: str) -> None:
    async with with_database(server_url) as url:
        app = make_app(app_settings(url))
        async with AsyncTestClient(app=app) as own:
            connection = await asyncpg.connect(url)
            try:
                await connection.execute(
                    "DELETE FROM schema_migrations WHERE version = "
                    "(SELECT max(version) FROM schema_migrations)"
                )
            finally:
                await connection.close()
            response = await own.get("/health/ready")

    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "database": "ok",
        "migrations": "pending",
    }


async def test_every_answer_carries_a_request_id(
    client: AsyncTestClient[Litestar],
) -> None:
    chosen = await client.get("/health/live", headers={"X-Request-Id": "pos-42.a:b"})
    refused = await client.get("/health/live", headers={"X-Request-Id": "bad id!"})
    unnamed = await client.get("/health/live")

    # A caller's well-formed id is kept so it can follow its request through.
    assert chosen.headers["x-request-id"] == "pos-42.a:b"
    given = {refused.headers["x-request-id"], unnamed.headers["x-request-id"]}
    assert "bad id!" not in given
    assert len(given) == 2
    assert all(re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", value) for value in given)
