"""Past states through the read API: ``as_of`` a position or a time."""

from __future__ import annotations

from datetime import timedelta, timezone
from typing import Any

import asyncpg
import msgspec
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.eventstore.hashing import format_received_at
from tests.integration.helpers import post_webhook
from tests.support import bearer, webhook_body

UPC_A = "601842495575"
UPC_B = "601842495582"


async def deliver(
    client: AsyncTestClient[Litestar], token: str, order_id: str, upc: str, status: str
) -> int:
    """Post one delivery; return its position."""
    answer = await post_webhook(
        client, webhook_body(order_id, upc=upc, status=status), token
    )
    assert answer.status_code == 202, answer.text
    return int(answer.json()["position"])


async def history(
    client: AsyncTestClient[Litestar], token: str, order_id: str
) -> list[int]:
    """A two-item order: A ordered, B ordered, A confirmed, B refunded."""
    return [
        await deliver(client, token, order_id, UPC_A, "ordered"),
        await deliver(client, token, order_id, UPC_B, "ordered"),
        await deliver(client, token, order_id, UPC_A, "confirmed"),
        await deliver(client, token, order_id, UPC_B, "refunded"),
    ]


async def get_order(
    client: AsyncTestClient[Litestar], key: str, order_id: str, **params: str
) -> Any:
    return await client.get(
        f"/v1/orders/{order_id}", headers=bearer(key), params=params or None
    )


def states(order: dict[str, Any]) -> dict[str, str]:
    return {item["upc"]: item["state"] for item in order["items"]}


async def test_an_order_as_of_a_position_is_its_state_then(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    positions = await history(client, live_token, order_id)

    second = await get_order(client, reader_key, order_id, as_of=str(positions[1]))
    third = await get_order(client, reader_key, order_id, as_of=str(positions[2]))

    assert second.status_code == 200
    assert states(second.json()) == {UPC_A: "ordered", UPC_B: "ordered"}
    assert second.json()["as_of"] == str(positions[1])
    assert second.json()["as_of_position"] == positions[1]
    assert states(third.json()) == {UPC_A: "confirmed", UPC_B: "ordered"}
    assert third.json()["as_of_position"] == positions[2]


async def test_as_of_between_events_answers_as_of_the_last_one_before(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    first = await deliver(client, live_token, order_id, UPC_A, "ordered")
    other = await deliver(client, live_token, f"{order_id}X", UPC_A, "ordered")
    await deliver(client, live_token, order_id, UPC_A, "confirmed")

    answer = await get_order(client, reader_key, order_id, as_of=str(other))

    assert states(answer.json()) == {UPC_A: "ordered"}
    assert answer.json()["as_of_position"] == first


async def test_the_latest_past_state_is_the_live_view_plus_where_it_stands(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    positions = await history(client, live_token, order_id)

    live = (await get_order(client, reader_key, order_id)).json()
    past = await get_order(client, reader_key, order_id, as_of=str(positions[-1]))
    past_document = past.json()

    # One fold for both: the past answer at the head is the live one exactly.
    assert past_document.pop("as_of") == str(positions[-1])
    assert past_document.pop("as_of_position") == positions[-1]
    assert past_document == live


async def test_the_live_answer_keeps_its_shape(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    await history(client, live_token, order_id)

    live = (await get_order(client, reader_key, order_id)).json()

    assert "as_of" not in live
    assert "as_of_position" not in live
    assert set(live["items"][0]) == {
        "mode",
        "order_id",
        "upc",
        "state",
        "fulfilment",
        "refund",
        "message_count",
        "redelivery_count",
        "event_count",
        "order_url",
        "last_status",
        "last_transition",
        "first_event_at",
        "last_event_at",
        "version",
        "position",
        "unrecognized_statuses",
        "anomalies",
    }


async def test_an_order_as_of_a_time_holds_what_was_received_by_then(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
    pool: asyncpg.Pool,
) -> None:
    positions = await history(client, live_token, order_id)
    received = await pool.fetchval(
        "SELECT received_at FROM events WHERE order_id = $1 AND position = $2",
        order_id,
        positions[2],
    )

    at = await get_order(
        client, reader_key, order_id, as_of=format_received_at(received)
    )
    offset = received.astimezone(timezone(timedelta(hours=-5))).isoformat()
    same = await get_order(client, reader_key, order_id, as_of=offset)

    assert states(at.json()) == {UPC_A: "confirmed", UPC_B: "ordered"}
    assert at.json()["as_of_position"] == positions[2]
    assert same.json()["as_of_position"] == positions[2]


async def test_an_item_as_of_a_position(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    positions = await history(client, live_token, order_id)

    answer = await client.get(
        f"/v1/orders/{order_id}/items/{UPC_B}",
        headers=bearer(reader_key),
        params={"as_of": str(positions[2])},
    )

    item = answer.json()
    assert answer.status_code == 200
    assert (item["upc"], item["state"], item["version"]) == (UPC_B, "ordered", 1)
    assert item["as_of_position"] == positions[1]


async def test_nothing_then_is_not_found(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    positions = await history(client, live_token, order_id)

    order = await get_order(client, reader_key, order_id, as_of="0")
    before = await get_order(client, reader_key, order_id, as_of="2000-01-01T00:00:00Z")
    item = await client.get(
        f"/v1/orders/{order_id}/items/{UPC_B}",
        headers=bearer(reader_key),
        params={"as_of": str(positions[0])},
    )

    for answer in (order, before, item):
        assert answer.status_code == 404
        assert answer.headers["content-type"].startswith("application/problem+json")
    assert "as of 0" in order.json()["detail"]


async def test_an_unreadable_as_of_is_a_bad_request_naming_it(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    await history(client, live_token, order_id)

    for value in ("yesterday", "2025-03-01", "-3", "2025-03-01T12:00:00"):
        answer = await get_order(client, reader_key, order_id, as_of=value)
        problem = msgspec.json.decode(answer.content)

        assert answer.status_code == 400, value
        assert problem["parameter"] == "as_of"
        assert problem["type"] == "urn:ordertrail:problem:invalid-parameter"


async def test_a_past_answer_has_an_etag_that_later_events_do_not_change(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    positions = await history(client, live_token, order_id)
    past = str(positions[1])

    first = await get_order(client, reader_key, order_id, as_of=past)
    await deliver(client, live_token, order_id, UPC_A, "completed")
    again = await get_order(client, reader_key, order_id, as_of=past)
    revalidated = await client.get(
        f"/v1/orders/{order_id}",
        headers={**bearer(reader_key), "If-None-Match": first.headers["etag"]},
        params={"as_of": past},
    )
    later = await get_order(client, reader_key, order_id, as_of=str(positions[3]))

    assert first.headers["etag"] == again.headers["etag"]
    assert again.json() == first.json()
    assert revalidated.status_code == 304
    assert later.headers["etag"] != first.headers["etag"]


async def test_an_item_answer_revalidates_too(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    positions = await history(client, live_token, order_id)
    path = f"/v1/orders/{order_id}/items/{UPC_A}"
    params = {"as_of": str(positions[2])}

    first = await client.get(path, headers=bearer(reader_key), params=params)
    second = await client.get(
        path,
        headers={**bearer(reader_key), "If-None-Match": first.headers["etag"]},
        params=params,
    )

    assert first.status_code == 200
    assert second.status_code == 304
    assert second.headers["etag"] == first.headers["etag"]


async def test_test_mode_pasts_are_apart_from_live_ones(
    client: AsyncTestClient[Litestar],
    live_token: str,
    test_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    live = await deliver(client, live_token, order_id, UPC_A, "ordered")
    test = await deliver(client, test_token, order_id, UPC_A, "refunded")

    as_test = await get_order(
        client, reader_key, order_id, as_of=str(test), mode="test"
    )
    as_live = await get_order(client, reader_key, order_id, as_of=str(test))

    assert states(as_test.json()) == {UPC_A: "refunded"}
    assert states(as_live.json()) == {UPC_A: "ordered"}
    assert as_live.json()["as_of_position"] == live
