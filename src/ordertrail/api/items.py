"""Polling endpoints: the change feed and the filtered item listing."""

from __future__ import annotations

import time
from typing import Any, cast

import msgspec
from litestar import Request, Response, get
from litestar.enums import MediaType

from ordertrail.api.cursors import decode_cursor, encode_cursor
from ordertrail.api.documentation import API_KEY, problems
from ordertrail.api.parameters import (
    FulfilmentFilter,
    Limit,
    ModeParameter,
    OrderFilter,
    PageCursor,
    StateFilter,
    UpdatedAfter,
    Wait,
    in_utc,
)
from ordertrail.api.security import access
from ordertrail.api.services import Services
from ordertrail.auth.credentials import Role
from ordertrail.db.connection import Connection
from ordertrail.projections.feed import FeedPlace
from ordertrail.projections.items import ItemView

__all__ = ["ChangePage", "ItemPage", "changes", "items"]

_FIELDS = ItemView.__struct_fields__
_COLUMNS = ", ".join(_FIELDS)
_encode_page = msgspec.json.Encoder().encode


class ChangePage(msgspec.Struct, frozen=True, kw_only=True):
    """Items that changed after a cursor, each once, with its latest state."""

    mode: str
    changes: list[ItemView]
    """In the order the changes committed."""
    next: str
    """Pass as ``after`` for the changes that follow these."""
    more: bool
    """Whether more changes are ready now (the page was full)."""


class ItemPage(msgspec.Struct, frozen=True, kw_only=True):
    """A page of items matching the filters, ordered by order and UPC."""

    mode: str
    items: list[ItemView]
    next: str | None
    """Pass as ``cursor`` for the next page; null on the last one."""


def _view(row: Any) -> ItemView:
    return msgspec.convert(dict(row.items()), ItemView)


@get(
    "/v1/changes",
    tags=["polling"],
    summary="Items changed after a cursor (long polling with wait)",
    opt=access(Role.READER),
    security=API_KEY,
    responses=problems(400, 401, 403, 429, 503),
)
async def changes(
    request: Request[Any, Any, Any],
    *,
    mode: ModeParameter = "live",
    after: PageCursor = None,
    limit: Limit = 100,
    wait: Wait = 0.0,
) -> Response[ChangePage]:
    """Return the items that changed after ``after``, in commit order.

    A client that keeps passing ``next`` back sees every change, each item
    once per page with its latest state, even when concurrent commits finish
    out of order: rows are read below the snapshot horizon, in the order of
    the transactions that changed them.
    """
    services: Services = request.app.state.services
    place: FeedPlace = (
        decode_cursor(after, "changes", (int, int), parameter="after")
        if after is not None
        else (0, 0)
    )
    deadline = time.monotonic() + wait
    while True:
        # The head as known before the query: if the page is empty, wait for
        # the feed to pass both the cursor and this head. A row at the head
        # that is changed again drops below the horizon for a while, and
        # waiting only for the cursor would then return at once, again and
        # again.
        known = services.feed.head(mode)
        async with services.reads.acquire() as connection:
            rows = await _changed_after(connection, mode, place, limit)
        remaining = deadline - time.monotonic()
        if rows or remaining <= 0:
            break
        # No connection is held while waiting: a waiting poller is a parked
        # coroutine, woken only when the feed moves past its cursor.
        if not await services.feed.wait_past(mode, max(place, known), remaining):
            break
    last = place if not rows else (rows[-1]["change_xid"], rows[-1]["position"])
    # A page is encoded straight from its rows, whose leading columns are the
    # view's fields in order: building a hundred view objects first would
    # cost more than the query. The bytes are a ChangePage document.
    body = _encode_page(
        {
            "mode": mode,
            "changes": [dict(zip(_FIELDS, row, strict=False)) for row in rows],
            "next": encode_cursor("changes", *last),
            "more": len(rows) == limit,
        }
    )
    return cast("Response[ChangePage]", Response(body, media_type=MediaType.JSON))


async def _changed_after(
    connection: Connection, mode: str, place: FeedPlace, limit: int
) -> list[Any]:
    return await connection.fetch(
        f"""
        SELECT {_COLUMNS}, change_xid FROM item_view
        WHERE mode = $1
          AND (change_xid, position) > ($2::text::xid8, $3)
          AND change_xid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY change_xid, position
        LIMIT $4
        """,
        mode,
        str(place[0]),
        place[1],
        limit,
    )


@get(
    "/v1/items",
    tags=["polling"],
    summary="Items matching filters, with keyset pagination",
    opt=access(Role.READER),
    security=API_KEY,
    responses=problems(400, 401, 403, 429, 503),
)
async def items(
    request: Request[Any, Any, Any],
    *,
    mode: ModeParameter = "live",
    lifecycle_state: StateFilter = None,
    fulfilment: FulfilmentFilter = None,
    fulfillment: FulfilmentFilter = None,
    updated_after: UpdatedAfter = None,
    order_id: OrderFilter = None,
    limit: Limit = 100,
    cursor: PageCursor = None,
) -> ItemPage:
    """Return one page of matching items; pages stay stable under inserts."""
    services: Services = request.app.state.services
    start: tuple[str, str] = (
        decode_cursor(cursor, "items", (str, str), parameter="cursor")
        if cursor is not None
        else ("", "")
    )
    kind = fulfilment or fulfillment
    filters: dict[str, object] = {
        "state": lifecycle_state.value if lifecycle_state else None,
        "fulfilment": kind.value if kind is not None else None,
        "updated_at": (
            in_utc(updated_after, "updated_after") if updated_after else None
        ),
        "order_id": order_id,
    }
    async with services.reads.acquire() as connection:
        rows = await _matching(connection, mode, start, filters, limit + 1)
    page = rows[:limit]
    return ItemPage(
        mode=mode,
        items=[_view(row) for row in page],
        next=(
            encode_cursor("items", page[-1]["order_id"], page[-1]["upc"])
            if len(rows) > limit
            else None
        ),
    )


async def _matching(
    connection: Connection,
    mode: str,
    start: tuple[str, str],
    filters: dict[str, object],
    limit: int,
) -> list[Any]:
    # Only the filters given go into the SQL, so each combination gets a
    # plan that uses the right index instead of one generic plan for all.
    given = {column: value for column, value in filters.items() if value is not None}
    conditions = [
        f"{column} {'>' if column == 'updated_at' else '='} ${index}"
        for index, column in enumerate(given, start=5)
    ]
    where = " AND ".join(["mode = $1", "(order_id, upc) > ($2, $3)", *conditions])
    return await connection.fetch(
        f"SELECT {_COLUMNS} FROM item_view WHERE {where} "
        "ORDER BY order_id, upc LIMIT $4",
        mode,
        *start,
        limit,
        *given.values(),
    )
