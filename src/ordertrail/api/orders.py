"""The read API for orders, items and their event histories."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, cast

import msgspec
from litestar import Controller, Request, Response, get
from litestar.datastructures import ResponseHeader
from litestar.enums import MediaType
from litestar.params import FromPath, Parameter

from ordertrail.api.audit import AsOfParameter, PastItemView, PastOrderView
from ordertrail.api.audit import past_item as past_item_response
from ordertrail.api.audit import past_order as past_order_response
from ordertrail.api.conditional import Door, fresh, not_modified, validators
from ordertrail.api.documentation import API_KEY, problems
from ordertrail.api.parameters import LARGEST_POSITION, ModeParameter
from ordertrail.api.problems import ProblemError
from ordertrail.api.security import access
from ordertrail.api.services import Services
from ordertrail.auth.credentials import Role
from ordertrail.eventstore.records import RecordedEvent, StreamKey
from ordertrail.projections.items import ItemView
from ordertrail.projections.orders import OrderView, roll_up

__all__ = ["EventHistory", "HistoryEvent", "OrdersController"]


class HistoryEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event, exactly as recorded, with its current meaning."""

    position: int
    upc: str
    version: int
    mode: str
    received_at: datetime
    event_type: str
    schema_version: int
    raw_status: str
    transition: str | None
    """What the current vocabulary makes of ``raw_status``; null if unrecognized."""
    redelivery: bool
    redelivery_of: int | None
    raw_body: str | None
    """The body as text, when it is valid UTF-8."""
    raw_body_base64: str
    """The body's exact bytes."""
    request_id: str
    client_address: str | None
    token_id: str
    idempotency_key: str | None
    previous_hash: str
    hash: str


class EventHistory(msgspec.Struct, frozen=True, kw_only=True):
    """A page of an order's history, in position order."""

    mode: str
    order_id: str
    events: list[HistoryEvent]
    next_after: int | None
    """Pass as ``after`` to get the next page; null on the last page."""


_ITEM_COLUMNS = ", ".join(ItemView.__struct_fields__)
_VALIDATOR_HEADERS = [
    ResponseHeader(
        name="ETag",
        description="Changes whenever the view does; send it in If-None-Match.",
        documentation_only=True,
    ),
    ResponseHeader(
        name="Cache-Control",
        description="no-cache: revalidate before reusing a copy.",
        documentation_only=True,
    ),
]


_ITEM_ROW = (
    f"SELECT {_ITEM_COLUMNS}, change_xid FROM item_view "
    "WHERE order_id = $1 AND mode = $2 AND upc = $3"
)
_encode_view = msgspec.json.Encoder().encode


def _item_tag(change_xid: int, version: int) -> str:
    # Every change to the row stamps it with its transaction's id.
    return f'"i{change_xid}.{version}"'


def _encode_item(row: Any) -> bytes:
    # The row's columns are the view's fields, in order: encode them as they
    # come instead of building the view object first. The bytes are an
    # ItemView document.
    return _encode_view(dict(zip(ItemView.__struct_fields__, row, strict=False)))


async def current_item_tag(
    services: Services, path: Mapping[str, Any], mode: str
) -> str | None:
    """Return an item's ETag from the two columns it is made of."""
    stamp = await services.stamps.stamp(StreamKey(mode, path["order_id"], path["upc"]))
    return None if stamp is None else _item_tag(*stamp)


async def current_item_view(
    services: Services, path: Mapping[str, Any], mode: str
) -> tuple[str, bytes] | None:
    """Return an item's ETag and its encoded view."""
    async with services.reads.acquire() as connection:
        row = await connection.fetchrow(_ITEM_ROW, path["order_id"], mode, path["upc"])
    if row is None:
        return None
    return _item_tag(row["change_xid"], row["version"]), _encode_item(row)


_ITEM_DOOR = Door(tag=current_item_tag, view=current_item_view)


def _item(row: Any) -> ItemView:
    return msgspec.convert(dict(row.items()), ItemView)


class OrdersController(Controller):
    """Orders and their items as the projections see them."""

    path = "/v1/orders"
    tags = ["orders"]  # noqa: RUF012 - litestar reads a plain list
    opt = access(Role.READER)

    @get(
        "/{order_id:str}",
        summary="An order with all its items",
        response_headers=_VALIDATOR_HEADERS,
        security=API_KEY,
        responses=problems(304, 400, 401, 403, 404, 429, 503),
    )
    async def order(
        self,
        request: Request[Any, Any, Any],
        order_id: FromPath[str],
        mode: ModeParameter = "live",
        as_of: AsOfParameter = None,
    ) -> Response[OrderView] | Response[PastOrderView] | Response[None]:
        """Return the order's items and the roll-up of their states.

        With ``as_of``, the order as it stood then, with ``as_of`` and
        ``as_of_position`` added.
        """
        if as_of is not None:
            return await past_order_response(request, order_id, mode, as_of)
        services: Services = request.app.state.services
        async with services.reads.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {_ITEM_COLUMNS}, change_xid FROM item_view "
                "WHERE order_id = $1 AND mode = $2",
                order_id,
                mode,
            )
        if not rows:
            raise ProblemError(
                404,
                "order-not-found",
                "No such order",
                f"no {mode} events for order {order_id!r}",
            )
        # Every change to an item row (an event, or a rebuild that reads it
        # differently) stamps the row with its transaction, so the newest
        # stamp and the item count identify the order's state.
        latest = max(row["change_xid"] for row in rows)
        etag = f'"o{latest}.{len(rows)}"'
        if fresh(request, etag):
            return not_modified(etag)
        view = roll_up([_item(row) for row in rows])
        return Response(view, headers=validators(etag))

    @get(
        "/{order_id:str}/items/{upc:str}",
        summary="One item of an order",
        response_headers=_VALIDATOR_HEADERS,
        security=API_KEY,
        responses=problems(304, 400, 401, 403, 404, 429, 503),
        opt=_ITEM_DOOR.opt(),
    )
    async def item(
        self,
        request: Request[Any, Any, Any],
        order_id: FromPath[str],
        upc: FromPath[str],
        mode: ModeParameter = "live",
        as_of: AsOfParameter = None,
    ) -> Response[ItemView] | Response[PastItemView] | Response[None]:
        """Return one item's projected state.

        With ``as_of``, the item as it stood then, with ``as_of`` and
        ``as_of_position`` added.
        """
        if as_of is not None:
            return await past_item_response(request, order_id, upc, mode, as_of)
        services: Services = request.app.state.services
        async with services.reads.acquire() as connection:
            row = await connection.fetchrow(_ITEM_ROW, order_id, mode, upc)
        if row is None:
            raise ProblemError(
                404,
                "item-not-found",
                "No such item",
                f"no {mode} events for UPC {upc!r} in order {order_id!r}",
            )
        # Plain reads were answered at the door (_ITEM_DOOR); this one came
        # with a query the door leaves alone. The bytes are an ItemView
        # document; the annotation is what the API description shows.
        etag = _item_tag(row["change_xid"], row["version"])
        if fresh(request, etag):
            return not_modified(etag)
        return cast(
            "Response[ItemView]",
            Response(
                _encode_item(row), media_type=MediaType.JSON, headers=validators(etag)
            ),
        )

    @get(
        "/{order_id:str}/events",
        summary="An order's full event history",
        opt=access(Role.AUDITOR),
        security=API_KEY,
        responses=problems(400, 401, 403, 404, 429, 503),
    )
    async def events(
        self,
        request: Request[Any, Any, Any],
        order_id: FromPath[str],
        mode: ModeParameter = "live",
        after: Annotated[
            int,
            Parameter(
                ge=0,
                le=LARGEST_POSITION,
                description="Return events after this position.",
            ),
        ] = 0,
        limit: Annotated[int, Parameter(ge=1, le=1000, description="Page size.")] = 100,
    ) -> EventHistory:
        """Return the raw events of every item of the order, oldest first."""
        services: Services = request.app.state.services
        async with services.reads.acquire() as connection:
            events = await services.store.read_order(
                connection, mode, order_id, after_position=after, limit=limit + 1
            )
        if not events and after == 0:
            raise ProblemError(
                404,
                "order-not-found",
                "No such order",
                f"no {mode} events for order {order_id!r}",
            )
        page = events[:limit]
        vocabulary = services.vocabulary
        return EventHistory(
            mode=mode,
            order_id=order_id,
            events=[
                _history_event(event, vocabulary.meaning(event.raw_status))
                for event in page
            ],
            next_after=page[-1].position if len(events) > limit else None,
        )


def _history_event(event: RecordedEvent, meaning: Any) -> HistoryEvent:
    try:
        text: str | None = event.raw_body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return HistoryEvent(
        position=event.position,
        upc=event.upc,
        version=event.version,
        mode=event.mode,
        received_at=event.received_at,
        event_type=event.event_type,
        schema_version=event.schema_version,
        raw_status=event.raw_status,
        transition=meaning.transition.value if meaning is not None else None,
        redelivery=event.redelivery_of is not None,
        redelivery_of=event.redelivery_of,
        raw_body=text,
        raw_body_base64=base64.b64encode(event.raw_body).decode("ascii"),
        request_id=event.request_id,
        client_address=event.client_address,
        token_id=event.token_id,
        idempotency_key=event.idempotency_key,
        previous_hash=event.previous_hash.hex(),
        hash=event.hash.hex(),
    )
