"""Conditional GETs: ETags from stream versions, 304 for an unchanged view.

Pollers send back the ETag they last saw in ``If-None-Match``; when nothing
changed they get a bodiless 304, which skips building and encoding the view.
``Cache-Control: no-cache`` lets caches keep a copy but makes them ask first.

An item poll is the API's hottest request, and most of them find nothing
changed. A route can therefore name a *revalidator* in its ``opt``: the entry
middleware, having admitted the request, asks it for the current tag with one
narrow query and answers 304 itself when the client's copy is current, before
the framework parses parameters or builds a response. Anything else (a
changed view, an unknown item, unusual parameters) goes on to the handler,
which answers in full.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from litestar import Request, Response
from litestar.response.base import ASGIResponse

if TYPE_CHECKING:
    from litestar.background_tasks import BackgroundTask, BackgroundTasks
    from litestar.datastructures import Cookie
    from litestar.types import Send, TypeEncodersMap

    from ordertrail.api.services import Services

__all__ = [
    "CACHE_CONTROL",
    "REVALIDATOR",
    "EncodedView",
    "Revalidator",
    "fresh",
    "matches",
    "mode_of",
    "not_modified",
    "revalidating",
    "send_not_modified",
    "validators",
]

CACHE_CONTROL = "no-cache"

REVALIDATOR = "revalidator"
"""The key of a route's ``opt`` that names its revalidator."""

Revalidator = Callable[["Services", Mapping[str, Any], str], Awaitable[str | None]]
"""Returns a resource's current ETag (None if it does not exist), given the
services, the route's path parameters and the requested mode."""

_MODE_QUERIES = {b"": "live", b"mode=live": "live", b"mode=test": "test"}


def revalidating(revalidator: Revalidator) -> dict[str, Any]:
    """Return the ``opt`` entry that lets the door answer 304 for a route."""
    return {REVALIDATOR: revalidator}


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


async def send_not_modified(send: Send, etag: str) -> None:
    """Answer 304 for ``etag`` straight onto the ASGI connection."""
    await send(
        {
            "type": "http.response.start",
            "status": 304,
            "headers": _validator_headers(etag),
        }
    )
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Prepared(ASGIResponse):
    # Status, headers and body are final: nothing is normalised or defaulted.
    def __init__(
        self,
        status_code: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        is_head_response: bool,
    ) -> None:
        self.status_code = status_code
        self.body = b"" if is_head_response else body
        self.is_head_response = is_head_response
        self.background = None
        self._encoded_cookies = ()
        self._raw_headers = headers

    def encode_headers(self) -> list[tuple[bytes, bytes]]:
        return self._raw_headers


class EncodedView(Response[bytes]):
    """A 200 view whose JSON body is already encoded, with its validators.

    The general response path normalises headers into a mutable mapping and
    re-encodes them for every answer; a view read by the hundred per second
    has exactly three fixed headers, built here once as bytes.
    """

    __slots__ = ("_body", "_raw_headers")

    def __init__(self, body: bytes, etag: str) -> None:
        super().__init__(body, media_type="application/json", headers=validators(etag))
        self._body = body
        self._raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("latin-1")),
            *_validator_headers(etag),
        ]

    def to_asgi_response(
        self,
        app: Any,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: str | None = None,
        status_code: int | None = None,
        type_encoders: TypeEncodersMap | None = None,
    ) -> ASGIResponse:
        """Return the prepared answer, unless the route adds to it."""
        extra_cookies = list(cookies or ())
        if headers or extra_cookies or background is not None:
            return super().to_asgi_response(
                app,
                request,
                background=background,
                cookies=extra_cookies,
                headers=headers,
                is_head_response=is_head_response,
                media_type=media_type,
                status_code=status_code,
                type_encoders=type_encoders,
            )
        return _Prepared(
            200, self._raw_headers, self._body, is_head_response=is_head_response
        )
