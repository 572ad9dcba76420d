"""Query parameters shared by the read endpoints."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from litestar.params import Parameter, QueryParameter

from ordertrail.api.problems import ProblemError
from ordertrail.domain.item import ItemState
from ordertrail.domain.vocabulary import Fulfilment

__all__ = [
    "LARGEST_POSITION",
    "FulfilmentFilter",
    "Limit",
    "ModeParameter",
    "OrderFilter",
    "PageCursor",
    "StateFilter",
    "UpdatedAfter",
    "Wait",
    "in_utc",
]

LONGEST_WAIT = 30.0
LARGEST_POSITION = 2**63 - 1
"""Positions are PostgreSQL bigints; a larger number can name no event."""

ModeParameter = Annotated[
    Literal["live", "test"],
    Parameter(description="Which connectivity's data to read: live or test."),
]
Limit = Annotated[int, Parameter(ge=1, le=1000, description="Page size, 1 to 1000.")]
PageCursor = Annotated[
    str | None,
    Parameter(description="The `next` of an earlier page; omit to start at the top."),
]
Wait = Annotated[
    float,
    Parameter(
        ge=0,
        le=LONGEST_WAIT,
        description="Seconds to hold the request when nothing changed yet, up to 30.",
    ),
]
# "state" is a name litestar reserves for the application state, so the
# handler argument has another name and the query parameter keeps this one.
StateFilter = Annotated[
    ItemState | None, QueryParameter(name="state", description="Lifecycle state.")
]
FulfilmentFilter = Annotated[
    Fulfilment | None, Parameter(description="How the item reaches the shopper.")
]
UpdatedAfter = Annotated[
    datetime | None,
    Parameter(description="Only items whose view changed after this RFC 3339 time."),
]
OrderFilter = Annotated[str | None, Parameter(description="Only this order's items.")]


def in_utc(moment: datetime, parameter: str) -> datetime:
    """Return ``moment`` in UTC, or answer 400 naming ``parameter``.

    A valid local time with an offset can fall outside the years 1 to 9999
    once moved to UTC, where times are compared and stored.
    """
    try:
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment
    except OverflowError:
        raise ProblemError(
            400,
            "invalid-parameter",
            "A request parameter is not valid",
            f"{parameter}: {moment.isoformat()} falls outside the years 1 to 9999 "
            "in UTC",
            parameter=parameter,
        ) from None
