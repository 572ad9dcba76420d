"""Conditional GETs: ETags from stream versions, 304 for an unchanged view.

Pollers send back the ETag they last saw in ``If-None-Match``; when nothing
changed they get a bodiless 304, which skips building and encoding the view.
``Cache-Control: no-cache`` lets caches keep a copy but makes them ask first.

An item poll is the API's hottest request. A route can therefore name a
*door* in its ``opt``: two narrow reads with which the entry middleware,
having admitted the request, answers a plain read (no parameter but the
mode) itself, before the framework parses parameters or builds a response.
With ``If-None-Match`` it first reads the current tag alone and answers 304
when the client's copy is current; otherwise it reads the view, already
encoded, and sends it with its validators. Anything else (a past state,
unusual parameters, an unknown item) goes on to the handler, which answers
in full.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar import Request, Response

from ordertrail.api.direct import send_answer

if TYPE_CHECKING:
    from litestar.types import Scope, Send

    from ordertrail.api.services import Services

__all__ = [
    "CACHE_CONTROL",
    "DOOR",
    "Door",
    "answered_at_door",
    "fresh",
    "matches",
    "mode_of",
    "not_modified",
    "validators",
]

CACHE_CONTROL = "no-cache"

DOOR = "door"
"""The key of a route's ``opt`` that names its door."""


@dataclass(frozen=True, slots=True)
class Door:
    """The reads that let the entry middleware answer a route's plain GETs.

    Each takes the services, the route's path parameters and the requested
    mode, and returns None when the resource does not exist.
    """

    tag: Callable[[Services, Mapping[str, Any], str], Awaitable[str | None]]
    """Returns the resource's current ETag."""
    view: Callable[
        [Services, Mapping[str, Any], str], Awaitable[tuple[str, bytes] | None]
    ]
    """Returns the resource's ETag and its view, encoded as JSON."""

    def opt(self) -> dict[str, Any]:
        """Return the route ``opt`` entry that opens this door."""
        return {DOOR: self}


_MODE_QUERIES = {b"": "live", b"mode=live": "live", b"mode=test": "test"}


def mode_of(query_string: bytes) -> str | None:
    """Return the mode a plain item query asks for; None for anything else.

    The door only answers the common shapes exactly; any other query (a past
    state, an invalid mode, extra parameters) is the handler's to judge.
    """
    return _MODE_QUERIES.get(query_string)


def validators(etag: str) -> dict[str, str]:
    """Return the headers that let a client revalidate a view."""
    return {"ETag": etag, "Cache-Control": CACHE_CONTROL}


def matches(if_none_match: str | None, etag: str) -> bool:
    """Return whether an ``If-None-Match`` value names ``etag`` (or is ``*``)."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    # Weak comparison (RFC 9110 13.1.2): a W/ prefix does not matter here.
    return any(
        candidate.strip().removeprefix("W/") == etag
        for candidate in if_none_match.split(",")
    )


def fresh(request: Request[Any, Any, Any], etag: str) -> bool:
    """Return whether the client's copy (``If-None-Match``) is current."""
    # Read from the raw headers: most requests carry no If-None-Match, and a
    # header mapping would be built for nothing. Repeated fields form one
    # list (RFC 9110 5.3).
    values = [
        value.decode("latin-1")
        for name, value in request.scope["headers"]
        if name == b"if-none-match"
    ]
    return matches(", ".join(values), etag) if values else False


def not_modified(etag: str) -> Response[None]:
    """Return the bodiless answer for a current copy."""
    return Response(None, status_code=304, headers=validators(etag))


def _validator_headers(etag: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"etag", etag.encode("latin-1")),
        (b"cache-control", CACHE_CONTROL.encode("latin-1")),
    ]


async def answered_at_door(
    scope: Scope, door: Door, if_none_match: str | None, send: Send
) -> bool:
    """Answer a plain GET through ``door``; return False to leave it to the route.

    The request must already be admitted. The answer goes straight onto the
    ASGI connection with exactly its final headers: the general response
    path would normalise them into a mapping and encode them again.
    """
    mode = mode_of(scope["query_string"])
    if mode is None:
        return False
    services = scope["app"].state.services
    path = scope["path_params"]
    if if_none_match is not None:
        etag = await door.tag(services, path, mode)
        if etag is None:
            return False
        if matches(if_none_match, etag):
            await send_answer(send, 304, _validator_headers(etag), b"")
            return True
    found = await door.view(services, path, mode)
    if found is None:
        return False
    etag, body = found
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("latin-1")),
        *_validator_headers(etag),
    ]
    await send_answer(send, 200, headers, body)
    return True
