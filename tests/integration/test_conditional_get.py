"""ETags, ``Cache-Control: no-cache`` and 304 on the item and order views."""

from __future__ import annotations

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.integration.helpers import post_webhook
from tests.support import UPC, bearer, new_order_id, webhook_body

OTHER_UPC = "000000000002"


async def deliver(
    client: AsyncTestClient[Litestar],
    token: str,
    order_id: str,
    upc: str = UPC,
    status: str = "confirmed",
) -> None:
    response = await post_webhook(
        client, webhook_body(order_id, upc=upc, status=status), token
    )
    assert response.status_code == 202, response.text


def item_path(order_id: str, upc: str = UPC) -> str:
    return f"/v1/orders/{order_id}/items/{upc}"


def order_path(order_id: str) -> str:
    return f"/v1/orders/{order_id}"


async def get(
    client: AsyncTestClient[Litestar],
    key: str,
    path: str,
    if_none_match: str | None = None,
    **params: str,
) -> httpx.Response:
    headers = bearer(key)
    if if_none_match is not None:
        headers["If-None-Match"] = if_none_match
    return await client.get(path, headers=headers, params=params)


def etag_of(response: httpx.Response) -> str:
    """The response's entity tag, checked to be a strong, quoted one."""
    etag = response.headers["etag"]
    assert etag.startswith('"'), etag
    assert etag.endswith('"'), etag
    assert len(etag) > 2
    return etag


def assert_not_modified(response: httpx.Response, etag: str) -> None:
    assert response.status_code == 304, response.text
    assert response.content == b""
    # RFC 9110 15.4.5: a 304 carries the validators a 200 would have carried.
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == "no-cache"


@pytest.fixture(params=["item", "order"])
def view(request: pytest.FixtureRequest) -> str:
    """Which view: one item, or the order with its items."""
    assert isinstance(request.param, str)
    return request.param


def path_of(view: str, order_id: str) -> str:
    return item_path(order_id) if view == "item" else order_path(order_id)


async def test_a_view_carries_its_etag_and_no_cache(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
    view: str,
) -> None:
    await deliver(client, live_token, order_id)

    response = await get(client, reader_key, path_of(view, order_id))

    assert response.status_code == 200
    etag_of(response)
    assert response.headers["cache-control"] == "no-cache"


async def test_the_current_etag_gets_an_empty_304(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
    view: str,
) -> None:
    await deliver(client, live_token, order_id)
    path = path_of(view, order_id)
    etag = etag_of(await get(client, reader_key, path))

    again = await get(client, reader_key, path, etag)

    assert_not_modified(again, etag)


async def test_a_new_webhook_makes_the_old_etag_stale(
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
    view: str,
) -> None:
    await deliver(client, live_token, order_id, status="ordered")
    path = path_of(view, order_id)
    old = etag_of(await get(client, reader_key, path))

    await deliver(client, live_token, order_id, status="confirmed")
    fresh = await get(client, reader_key, path, old)

    assert fresh.status_code == 200
    new = etag_of(fresh)
    assert new != old
    assert_not_modified(await get(client, reader_key, path, new), new)


async def test_a_redelivery_changes_the_etag_too(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    # A redelivery is counted on the item, so the view's bytes change.
    await deliver(client, live_token, order_id)
    old = etag_of(await get(client, reader_key, item_path(order_id)))

    await deliver(client, live_token, order_id)
    fresh = await get(client, reader_key, item_path(order_id), old)

    assert fresh.status_code == 200
    assert fresh.json()["redelivery_count"] == 1
    assert etag_of(fresh) != old


async def test_a_webhook_for_another_item_changes_the_order_but_not_the_item(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    await deliver(client, live_token, order_id)
    item_etag = etag_of(await get(client, reader_key, item_path(order_id)))
    order_etag = etag_of(await get(client, reader_key, order_path(order_id)))

    await deliver(client, live_token, order_id, upc=OTHER_UPC)

    item = await get(client, reader_key, item_path(order_id), item_etag)
    order = await get(client, reader_key, order_path(order_id), order_etag)
    assert_not_modified(item, item_etag)
    assert order.status_code == 200
    assert etag_of(order) != order_etag
    assert len(order.json()["items"]) == 2


@pytest.mark.parametrize(
    "shape",
    ["weak", "listed-last", "listed-first", "weak-in-list", "no-spaces", "star"],
)
async def test_if_none_match_forms_that_match(
    *,
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
    view: str,
    shape: str,
) -> None:
    await deliver(client, live_token, order_id)
    path = path_of(view, order_id)
    etag = etag_of(await get(client, reader_key, path))
    header = {
        # If-None-Match compares weakly (RFC 9110 13.1.2).
        "weak": f"W/{etag}",
        "listed-last": f'"stale-1", "stale-2", {etag}',
        "listed-first": f'{etag}, "stale"',
        "weak-in-list": f'"stale", W/{etag}',
        "no-spaces": f'"stale",{etag}',
        "star": "*",
    }[shape]

    response = await get(client, reader_key, path, header)

    assert_not_modified(response, etag)


@pytest.mark.parametrize("header", ['"stale"', 'W/"stale", "older"', '""'])
async def test_if_none_match_with_only_other_tags_gets_the_view(
    *,
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
    view: str,
    header: str,
) -> None:
    await deliver(client, live_token, order_id)
    path = path_of(view, order_id)

    response = await get(client, reader_key, path, header)

    assert response.status_code == 200
    assert response.json()["order_id"] == order_id
    etag_of(response)


async def test_an_etag_without_its_quotes_does_not_match(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    # Entity tags are quoted strings; the bare text is another value.
    await deliver(client, live_token, order_id)
    etag = etag_of(await get(client, reader_key, item_path(order_id)))

    response = await get(client, reader_key, item_path(order_id), etag.strip('"'))

    assert response.status_code == 200


async def test_star_on_a_missing_view_is_still_404(
    client: AsyncTestClient[Litestar], reader_key: str, view: str
) -> None:
    # "*" matches a current representation; where there is none, no 304.
    response = await get(client, reader_key, path_of(view, new_order_id()), "*")

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_the_modes_of_one_item_have_their_own_etags(
    client: AsyncTestClient[Litestar],
    live_token: str,
    test_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    await deliver(client, live_token, order_id)
    await deliver(client, test_token, order_id, status="ordered")
    live = await get(client, reader_key, item_path(order_id))
    test = await get(client, reader_key, item_path(order_id), mode="test")

    test_again = await get(
        client, reader_key, item_path(order_id), etag_of(test), mode="test"
    )

    assert (live.json()["state"], test.json()["state"]) == ("confirmed", "ordered")
    assert_not_modified(test_again, etag_of(test))


# Unchanged items are answered at the door, before the handler; the answers
# there must be the handler's answers, for every request the door takes.


async def test_a_304_at_the_door_names_its_request(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    await deliver(client, live_token, order_id)
    etag = etag_of(await get(client, reader_key, item_path(order_id)))
    headers = {**bearer(reader_key), "If-None-Match": etag, "X-Request-Id": "pos-7"}

    response = await client.get(item_path(order_id), headers=headers)

    assert_not_modified(response, etag)
    assert response.headers["x-request-id"] == "pos-7"


async def test_a_current_tag_does_not_pass_a_missing_key(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    await deliver(client, live_token, order_id)
    etag = etag_of(await get(client, reader_key, item_path(order_id)))

    response = await client.get(item_path(order_id), headers={"If-None-Match": etag})

    assert response.status_code == 401


async def test_a_view_at_the_door_is_the_handlers_view(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    # A plain read is answered at the door; an extra parameter sends the same
    # read to the handler. Both must give the same answer, byte for byte.
    await deliver(client, live_token, order_id, status="ordered")
    await deliver(client, live_token, order_id, status="confirmed")
    headers = {**bearer(reader_key), "X-Request-Id": "pos-8"}

    door = await client.get(item_path(order_id), headers=headers)
    handler = await client.get(
        item_path(order_id), headers=headers, params={"mode": "live", "unknown": "1"}
    )

    assert door.status_code == handler.status_code == 200
    assert door.content == handler.content
    assert door.json()["state"] == "confirmed"
    for name in ("etag", "cache-control", "content-type", "content-length"):
        assert door.headers[name] == handler.headers[name], name
    assert door.headers["x-request-id"] == "pos-8"


async def test_a_stale_tag_at_the_door_gets_the_current_view(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    await deliver(client, live_token, order_id, status="ordered")
    stale = etag_of(await get(client, reader_key, item_path(order_id)))
    await deliver(client, live_token, order_id, status="confirmed")

    response = await get(client, reader_key, item_path(order_id), stale)

    assert response.status_code == 200
    assert response.json()["state"] == "confirmed"
    assert etag_of(response) != stale


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"mode": "live", "unknown": "1"}, 304),
        ({"mode": "LIVE"}, 400),
        ({"mode": "test"}, 404),
    ],
)
async def test_queries_the_door_leaves_to_the_handler(
    *,
    client: AsyncTestClient[Litestar],
    live_token: str,
    reader_key: str,
    order_id: str,
    params: dict[str, str],
    status: int,
) -> None:
    await deliver(client, live_token, order_id)
    etag = etag_of(await get(client, reader_key, item_path(order_id)))

    response = await get(client, reader_key, item_path(order_id), etag, **params)

    assert response.status_code == status, response.text


async def test_a_past_state_is_revalidated_against_its_own_tag(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    # The current tag says nothing about a past state: no 304 from it.
    await deliver(client, live_token, order_id, status="ordered")
    await deliver(client, live_token, order_id, status="confirmed")
    current = etag_of(await get(client, reader_key, item_path(order_id)))

    past = await get(
        client, reader_key, item_path(order_id), current, as_of="2000-01-01T00:00:00Z"
    )

    assert past.status_code != 304
