"""``GET /v1/items``: filters, and keyset pages that stay true while items arrive."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.cursors import encode_cursor
from ordertrail.domain.item import ItemState
from ordertrail.domain.vocabulary import Fulfilment
from tests.integration.api_support import problem
from tests.integration.helpers import post_webhook
from tests.support import bearer, new_order_id, webhook_body

ItemKey = tuple[str, str]
"""(order_id, upc)"""

# A status per item, chosen so that one order holds several states and
# several fulfilment kinds at once.
_STATUS_OF = {
    "0001": "ordered",
    "0002": "confirmed",
    "0003": "ready for pickup",
    "0004": "ready for delivery",
    "0005": "delivered",
    "0006": "cancelled",
    "0007": "ship to store",
    "0008": "same day delivery",
    "0009": "something Locally never documented",
}


async def deliver(
    client: AsyncTestClient[Litestar],
    token: str,
    order_id: str,
    upc: str,
    status: str = "ordered",
) -> None:
    response = await post_webhook(
        client, webhook_body(order_id, upc=upc, status=status), token
    )
    assert response.status_code == 202, response.text


async def list_items(
    client: AsyncTestClient[Litestar], key: str, **params: Any
) -> dict[str, Any]:
    """One page of the listing; fails the test on anything but 200."""
    response = await client.get("/v1/items", params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
    page = response.json()
    assert isinstance(page, dict)
    return page


async def list_all(
    client: AsyncTestClient[Litestar], key: str, **params: Any
) -> list[dict[str, Any]]:
    """Every page of the listing, followed through ``next``."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        extra = {"cursor": cursor} if cursor is not None else {}
        page = await list_items(client, key, **params, **extra)
        items.extend(page["items"])
        cursor = page["next"]
        if cursor is None:
            return items


@pytest.fixture
async def varied_order(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str
) -> list[dict[str, Any]]:
    """An order whose items are in several states; its items as listed."""
    order_id = new_order_id()
    for upc, status in _STATUS_OF.items():
        await deliver(client, live_token, order_id, upc, status)
    items = await list_all(client, reader_key, order_id=order_id)
    assert [item["upc"] for item in items] == sorted(_STATUS_OF)
    by_upc = {item["upc"]: item for item in items}
    # The filters are checked against the listing's own rows below; these
    # pin a few of them so that the checks cannot pass on uniform data.
    assert by_upc["0001"]["state"] == "ordered"
    assert by_upc["0006"]["state"] == "cancelled"
    assert by_upc["0003"]["fulfilment"] == "pickup"
    assert by_upc["0004"]["fulfilment"] == "delivery"
    assert len({item["state"] for item in items}) >= 4
    return items


@pytest.mark.parametrize("state", list(ItemState), ids=lambda s: s.value)
async def test_the_state_filter_keeps_exactly_the_items_in_that_state(
    client: AsyncTestClient[Litestar],
    reader_key: str,
    varied_order: list[dict[str, Any]],
    state: ItemState,
) -> None:
    order_id = varied_order[0]["order_id"]

    page = await list_items(client, reader_key, order_id=order_id, state=state.value)

    expected = [item["upc"] for item in varied_order if item["state"] == state]
    assert [item["upc"] for item in page["items"]] == expected
    assert all(item["state"] == state for item in page["items"])


@pytest.mark.parametrize("spelling", ["fulfilment", "fulfillment"])
async def test_the_fulfilment_filter_in_either_spelling(
    client: AsyncTestClient[Litestar],
    reader_key: str,
    varied_order: list[dict[str, Any]],
    spelling: str,
) -> None:
    order_id = varied_order[0]["order_id"]

    for kind in Fulfilment:
        page = await list_items(
            client, reader_key, order_id=order_id, **{spelling: kind.value}
        )
        expected = [item["upc"] for item in varied_order if item["fulfilment"] == kind]
        assert [item["upc"] for item in page["items"]] == expected, kind


async def test_filters_combine(
    client: AsyncTestClient[Litestar],
    reader_key: str,
    varied_order: list[dict[str, Any]],
) -> None:
    order_id = varied_order[0]["order_id"]
    pickup = next(item for item in varied_order if item["fulfilment"] == "pickup")

    both = await list_items(
        client,
        reader_key,
        order_id=order_id,
        state=pickup["state"],
        fulfilment="pickup",
    )
    neither = await list_items(
        client, reader_key, order_id=order_id, state="refunded", fulfilment="pickup"
    )

    assert [item["upc"] for item in both["items"]] == [pickup["upc"]]
    assert neither["items"] == []


async def _database_now(pool: asyncpg.Pool) -> datetime:
    # The view's updated_at is stamped by the database; compare with its
    # clock, not this process's.
    now = await pool.fetchval("SELECT clock_timestamp()")
    assert isinstance(now, datetime)
    return now


async def test_updated_after_keeps_items_changed_since(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    live_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    for upc in ("old", "touched"):
        await deliver(client, live_token, order_id, upc)
    since = await _database_now(pool)
    await deliver(client, live_token, order_id, "touched", "confirmed")
    await deliver(client, live_token, order_id, "new")

    changed = await list_items(
        client, reader_key, order_id=order_id, updated_after=since.isoformat()
    )
    in_utc = await list_items(
        client,
        reader_key,
        order_id=order_id,
        updated_after=since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    )
    future = await list_items(
        client,
        reader_key,
        order_id=order_id,
        updated_after=(since + timedelta(hours=1)).isoformat(),
    )

    assert [item["upc"] for item in changed["items"]] == ["new", "touched"]
    assert in_utc["items"] == changed["items"]
    assert future["items"] == []


async def test_modes_are_listed_apart(
    client: AsyncTestClient[Litestar],
    live_token: str,
    test_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    await deliver(client, live_token, order_id, "in-live")
    await deliver(client, test_token, order_id, "in-test")

    live = await list_items(client, reader_key, order_id=order_id)
    test = await list_items(client, reader_key, order_id=order_id, mode="test")

    assert [(i["upc"], i["mode"]) for i in live["items"]] == [("in-live", "live")]
    assert [(i["upc"], i["mode"]) for i in test["items"]] == [("in-test", "test")]
    assert (live["mode"], test["mode"]) == ("live", "test")


async def test_the_last_page_has_no_next(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    for upc in ("a", "b", "c"):
        await deliver(client, live_token, order_id, upc)

    exact = await list_items(client, reader_key, order_id=order_id, limit=3)
    first = await list_items(client, reader_key, order_id=order_id, limit=2)
    second = await list_items(
        client, reader_key, order_id=order_id, limit=2, cursor=first["next"]
    )

    assert ([i["upc"] for i in exact["items"]], exact["next"]) == (
        ["a", "b", "c"],
        None,
    )
    assert [i["upc"] for i in first["items"]] == ["a", "b"]
    assert isinstance(first["next"], str)
    assert ([i["upc"] for i in second["items"]], second["next"]) == (["c"], None)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_pages_list_every_item_once_while_items_arrive_between_them(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, seed: int
) -> None:
    chooser = random.Random(seed)
    order_id = new_order_id()
    # Even numbers exist from the start; odd ones arrive between pages, some
    # before the cursor and some after it.
    initial = [f"{number:04d}" for number in range(0, 60, 2)]
    for upc in initial:
        await deliver(client, live_token, order_id, upc)
    free = {f"{number:04d}" for number in range(1, 80, 2)}
    arrived_ahead: list[str] = []
    arrived_behind: list[str] = []

    listed: list[str] = []
    cursor = None
    while True:
        extra = {"cursor": cursor} if cursor is not None else {}
        page = await list_items(client, reader_key, order_id=order_id, limit=7, **extra)
        listed.extend(item["upc"] for item in page["items"])
        cursor = page["next"]
        if cursor is None:
            break
        last = listed[-1]
        for upc in chooser.sample(sorted(free), 3):
            free.discard(upc)
            await deliver(client, live_token, order_id, upc)
            (arrived_ahead if upc > last else arrived_behind).append(upc)
        # Items already listed change too; a change must not list them again.
        await deliver(client, live_token, order_id, chooser.choice(listed), "message")

    assert len(listed) == len(set(listed)), "an item was listed twice"
    assert listed == sorted(listed)
    assert set(initial) <= set(listed), "an item that existed was skipped"
    assert set(arrived_ahead) <= set(listed), "an item ahead of the cursor was lost"
    assert set(listed) <= set(initial) | set(arrived_ahead) | set(arrived_behind)
    assert arrived_ahead, "the run never inserted ahead of the cursor"
    assert arrived_behind, "the run never inserted behind the cursor"


async def test_pages_across_orders_list_each_item_once(
    client: AsyncTestClient[Litestar], test_token: str, reader_key: str
) -> None:
    # Without an order filter the key runs over (order_id, upc): a page may
    # end inside one order and the next must start after it, not at its top.
    chooser = random.Random(11)
    status = "same day delivery"
    initial: set[ItemKey] = set()
    for _ in range(4):
        order_id = new_order_id()
        for upc in ("1", "2", "3"):
            await deliver(client, test_token, order_id, upc, status)
            initial.add((order_id, upc))

    listed: list[ItemKey] = []
    cursor = None
    arrived: set[ItemKey] = set()
    while True:
        extra = {"cursor": cursor} if cursor is not None else {}
        page = await list_items(
            client,
            reader_key,
            mode="test",
            fulfilment="same_day_delivery",
            limit=2,
            **extra,
        )
        listed.extend((item["order_id"], item["upc"]) for item in page["items"])
        cursor = page["next"]
        if cursor is None:
            break
        if len(arrived) < 10:
            newcomer = (new_order_id(), str(chooser.randint(1, 9)))
            await deliver(client, test_token, *newcomer, status)
            arrived.add(newcomer)

    assert len(listed) == len(set(listed)), "an item was listed twice"
    assert initial <= set(listed), "an item that existed was skipped"


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"state": "lost"}, "state"),
        ({"state": "CONFIRMED"}, "state"),
        ({"fulfilment": "drone"}, "fulfilment"),
        ({"fulfillment": "drone"}, "fulfillment"),
        ({"updated_after": "yesterday"}, "updated_after"),
        ({"mode": "sandbox"}, "mode"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"cursor": encode_cursor("items", "T1")}, "cursor"),
        ({"cursor": encode_cursor("items", 1, 2)}, "cursor"),
        ({"cursor": encode_cursor("changes", 1, 2)}, "cursor"),
    ],
    ids=[
        "state",
        "state-case",
        "fulfilment",
        "fulfillment",
        "updated-after",
        "mode",
        "limit-0",
        "limit-1001",
        "cursor-garbage",
        "cursor-short",
        "cursor-numbers",
        "cursor-of-changes",
    ],
)
async def test_a_bad_parameter_is_a_problem_naming_it(
    client: AsyncTestClient[Litestar],
    reader_key: str,
    params: dict[str, Any],
    parameter: str,
) -> None:
    response = await client.get("/v1/items", params=params, headers=bearer(reader_key))

    document = problem(response, 400)
    assert document["parameter"] == parameter
    assert document.get("detail")


async def test_a_cursor_handed_out_by_the_change_feed_is_refused(
    client: AsyncTestClient[Litestar], reader_key: str
) -> None:
    feed = await client.get(
        "/v1/changes", params={"limit": 1}, headers=bearer(reader_key)
    )
    cursor = feed.json()["next"]

    response = await client.get(
        "/v1/items", params={"cursor": cursor}, headers=bearer(reader_key)
    )

    document = problem(response, 400)
    assert document["parameter"] == "cursor"
    assert document["type"] == "urn:ordertrail:problem:invalid-cursor"
