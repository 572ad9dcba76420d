"""What auditors read: past states (``as_of``) and the NDJSON export.

Past states answer on the live order and item routes when ``as_of`` is
given (see ``OrdersController``); they are folded from the log on every
request, never read from the item view. The export streams the whole log,
or a range of it, as ``audit/export.py`` describes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
import structlog
from litestar import Request, Response, get
from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import Stream

from ordertrail.api.conditional import fresh, not_modified, validators
from ordertrail.api.documentation import API_KEY, problems
from ordertrail.api.parameters import LARGEST_POSITION
from ordertrail.api.problems import PROBLEM_MEDIA_TYPE, Problem, ProblemError
from ordertrail.api.security import access
from ordertrail.api.services import Services
from ordertrail.audit.export import export_lines
from ordertrail.audit.history import (
    AsOf,
    HistoryInconsistent,
    InvalidAsOf,
    PastState,
    parse_as_of,
    past_events,
    past_state,
)
from ordertrail.audit.settle import LogNotSettled, settled_position
from ordertrail.auth.credentials import Role
from ordertrail.projections.items import ItemView
from ordertrail.projections.orders import OrderView, roll_up

__all__ = [
    "AsOfParameter",
    "PastItemView",
    "PastOrderView",
    "export_events",
    "past_item",
    "past_order",
]

AsOfParameter = Annotated[
    str | None,
    Parameter(
        description=(
            "Answer as of a past point, folded from the event log: a global "
            "position (events at or below it) or an RFC 3339 timestamp with an "
            "offset (events received at or before it)."
        ),
    ),
]

log = structlog.get_logger("ordertrail.audit")

_SETTLE_WITHIN = 5.0
"""Seconds an export waits for appends in flight before answering 503."""


class PastItemView(ItemView, frozen=True, kw_only=True):
    """An item as it stood at a past point of the log."""

    as_of: str
    """The ``as_of`` value, as given."""
    as_of_position: int
    """The position of the last event the answer includes."""


class PastOrderView(OrderView, frozen=True, kw_only=True):
    """An order as it stood at a past point of the log."""

    as_of: str
    """The ``as_of`` value, as given."""
    as_of_position: int
    """The position of the last event the answer includes."""


def _as_of(text: str) -> AsOf:
    try:
        return parse_as_of(text)
    except InvalidAsOf as error:
        raise ProblemError(
            400,
            "invalid-parameter",
            "A request parameter is not valid",
            f"as_of: {error}",
            parameter="as_of",
        ) from None


async def _past(
    services: Services,
    mode: str,
    order_id: str,
    as_of: AsOf,
    upc: str | None = None,
) -> PastState | None:
    async with services.reads.acquire() as connection:
        events = await past_events(connection, mode, order_id, as_of, upc=upc)
    try:
        return past_state(services.projection, events)
    except HistoryInconsistent as error:
        # Not the client's doing, and no answer would be true: say so plainly.
        raise ProblemError(
            500, "history-inconsistent", "The event log is not intact", str(error)
        ) from None


def _etag(services: Services, state: PastState) -> str:
    # The answer is a function of the events folded and of the projection
    # code and vocabulary; the fingerprint names the first exactly.
    return f'"{services.projection.tag}.as-of.{state.fingerprint}"'


async def past_order(
    request: Request[Any, Any, Any], order_id: str, mode: str, as_of_text: str
) -> Response[PastOrderView] | Response[None]:
    """Answer the order route for ``as_of``."""
    services: Services = request.app.state.services
    as_of = _as_of(as_of_text)
    state = await _past(services, mode, order_id, as_of)
    if state is None:
        raise ProblemError(
            404,
            "order-not-found",
            "No such order",
            f"no {mode} events for order {order_id!r} as of {as_of.text}",
        )
    etag = _etag(services, state)
    if fresh(request, etag):
        return not_modified(etag)
    view = roll_up(state.items)
    past = PastOrderView(
        **msgspec.structs.asdict(view), as_of=as_of.text, as_of_position=state.position
    )
    return Response(past, headers=validators(etag))


async def past_item(
    request: Request[Any, Any, Any],
    order_id: str,
    upc: str,
    mode: str,
    as_of_text: str,
) -> Response[PastItemView] | Response[None]:
    """Answer the item route for ``as_of``."""
    services: Services = request.app.state.services
    as_of = _as_of(as_of_text)
    state = await _past(services, mode, order_id, as_of, upc)
    if state is None:
        raise ProblemError(
            404,
            "item-not-found",
            "No such item",
            f"no {mode} events for UPC {upc!r} in order {order_id!r} as of "
            f"{as_of.text}",
        )
    etag = _etag(services, state)
    if fresh(request, etag):
        return not_modified(etag)
    (view,) = state.items
    past = PastItemView(
        **msgspec.structs.asdict(view), as_of=as_of.text, as_of_position=state.position
    )
    return Response(past, headers=validators(etag))


async def _export_body(
    pool: asyncpg.Pool, mode: str | None, from_position: int, to_position: int
) -> AsyncIterator[bytes]:
    # The connection is taken here, not in the handler, so that it goes back
    # to the pool when the stream ends or the client goes away.
    async with pool.acquire() as connection:
        async for chunk in export_lines(
            connection, mode=mode, from_position=from_position, to_position=to_position
        ):
            yield chunk


async def _until_reads_show_settled(services: Services, settled: int) -> None:
    # The export is read on the replica, if there is one: it must have
    # replayed the settled range first, or the file would stop short of it.
    if services.replica is None:
        return
    if not await services.replica.caught_up(within=_SETTLE_WITHIN):
        raise ProblemError(
            503,
            "replica-behind",
            "The read replica has not replayed the end of the range yet",
            f"the replica did not replay up to position {settled} within "
            f"{_SETTLE_WITHIN:g} s",
            headers={"Retry-After": "1"},
        )


@get(
    "/v1/export",
    summary="Every event, as NDJSON, with the heads to verify it offline",
    description=(
        "One JSON object per line: a header, every event in position order with "
        "all its columns (raw_body in base64, hashes in hex), and a summary with "
        "the count and the head of every stream. A file without the summary was "
        "cut short. Verify it with `ordertrail audit verify-export FILE`."
    ),
    tags=["audit"],
    opt=access(Role.AUDITOR),
    security=API_KEY,
    media_type="application/x-ndjson",
    response_headers=[
        ResponseHeader(
            name="Content-Disposition",
            description="Suggests a file name for the export.",
            documentation_only=True,
        )
    ],
    responses={
        **problems(400, 401, 403, 429),
        503: ResponseSpec(
            Problem,
            description=(
                "Appends in flight did not finish, or the read replica did not "
                "replay them, in time; retry."
            ),
            media_type=PROBLEM_MEDIA_TYPE,
            generate_examples=False,
        ),
    },
)
async def export_events(
    request: Request[Any, Any, Any],
    mode: Annotated[
        Literal["live", "test"] | None,
        Parameter(description="Export only this mode's events; both if omitted."),
    ] = None,
    from_position: Annotated[
        int,
        Parameter(
            ge=1, le=LARGEST_POSITION, description="The first position to export."
        ),
    ] = 1,
    to_position: Annotated[
        int | None,
        Parameter(
            ge=1,
            le=LARGEST_POSITION,
            description="The last position to export; at most, and by default, "
            "the settled position (below which the log can no longer change).",
        ),
    ] = None,
) -> Stream:
    """Stream the events of a position range, oldest first."""
    services: Services = request.app.state.services
    # Only the primary knows which transactions still hold positions.
    async with services.pool.acquire() as connection:
        try:
            settled = await settled_position(connection, within=_SETTLE_WITHIN)
        except LogNotSettled as error:
            raise ProblemError(
                503,
                "log-not-settled",
                "The log is still being written at the end of the range",
                str(error),
                headers={"Retry-After": "1"},
            ) from None
    await _until_reads_show_settled(services, settled)
    upper = settled if to_position is None else min(to_position, settled)
    log.info(
        "audit.export_requested",
        key_id=request.scope["state"].get("api_key_id"),
        mode=mode,
        from_position=from_position,
        to_position=upper,
    )
    name = f"ordertrail-{mode or 'all'}-{from_position}-{upper}.ndjson"
    return Stream(
        _export_body(services.reads, mode, from_position, upper),
        media_type="application/x-ndjson",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )
