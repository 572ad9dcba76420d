"""Routes whose handlers write their answer onto the ASGI connection.

A webhook delivery is the request the service takes most of. Around a
handler, the framework resolves its parameters, wraps the result in a
response object and converts that into ASGI messages; under the ingest
benchmark's load that machinery took more of the event loop than the
handler's own reading, checking and logging. A handler that needs nothing
but the request, and returns an ASGI app (an ``Answer``), needs none of it.
Its route names itself *direct* in its ``opt``; the entry middleware, once
it has admitted the request, calls the handler with a request on the
connection and sends its answer. The route stays the framework's for routing
and for the OpenAPI document, and the handler works unchanged when called
the ordinary way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from litestar import Request

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Receive, Scope, Send

__all__ = ["DIRECT", "Answer", "answered_directly", "direct", "send_answer"]

DIRECT = "direct"
"""The key of a route's ``opt`` that makes its handler direct."""

DirectHandler = Callable[[Request[Any, Any, Any]], Awaitable["ASGIApp"]]


def direct() -> dict[str, Any]:
    """Return the route ``opt`` entry that makes its handler direct.

    The handler must take only ``request`` and return an ASGI app, such as an
    ``Answer``.
    """
    return {DIRECT: True}


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete answer: status, final headers and body, sent as they are."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(
        cls,
        status: int,
        body: bytes,
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """Return the answer with ``body`` of ``media_type`` and extra ``headers``."""
        fields = [
            (b"content-type", media_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode("latin-1")),
        ]
        if headers:
            fields.extend(
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in headers.items()
            )
        return cls(status, body, tuple(fields))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the answer (the ASGI app interface)."""
        await send_answer(send, self.status, list(self.headers), self.body)


async def send_answer(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """Send one whole answer: its start, then its body in one message."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def answered_directly(scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer through the route's handler if it is direct; else return False.

    The request must already be admitted. Exceptions the handler raises go
    to the application's handlers, as they would from any route.
    """
    route_handler = scope["route_handler"]
    if not route_handler.opt.get(DIRECT):
        return False
    handler = cast("DirectHandler", route_handler.fn)
    answer = await handler(Request(scope, receive, send))
    await answer(scope, receive, send)
    return True
