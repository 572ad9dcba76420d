"""Direct routes: the entry middleware calls the handler and sends its answer.

A small application stands in for the service. Its route-level hooks run
only on the framework's path, which tells the two paths apart.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.testing import AsyncTestClient
from litestar.types import ASGIApp, Receive, Scope, Send

from ordertrail.api.direct import Answer, answered_directly, direct
from ordertrail.api.problems import ProblemError, exception_handlers

HOOKED = "x-hooked"


async def _mark(response: Response[Any]) -> Response[Any]:
    response.headers[HOOKED] = "yes"
    return response


async def _intercept(_request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(b"intercepted by the framework", status_code=200)


async def _reverse(request: Request[Any, Any, Any]) -> ASGIApp:
    body = await request.body()
    return Answer.of(202, body[::-1], "text/plain", {"X-Seen": str(len(body))})


# The hook would answer first if the framework ran this route.
answer_directly = post(
    "/direct", opt=direct(), status_code=202, before_request=_intercept
)(_reverse)
answer_ordinarily = post("/ordinary", status_code=202)(_reverse)
hooked = post("/hooked", status_code=202, before_request=_intercept)(_reverse)


@get("/failing", opt=direct())
async def fail(request: Request[Any, Any, Any]) -> ASGIApp:
    raise ProblemError(409, "conflict", "Not now", "try later")


@get("/plain", after_request=_mark)
async def plain() -> dict[str, str]:
    return {"answered": "by the framework"}


def _entry(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and await answered_directly(scope, receive, send):
            return
        await app(scope, receive, send)

    return middleware


def _app() -> Litestar:
    return Litestar(
        route_handlers=[answer_directly, answer_ordinarily, hooked, fail, plain],
        middleware=[_entry],
        exception_handlers=exception_handlers,
        openapi_config=None,
        logging_config=None,
    )


async def test_a_direct_route_sends_the_handlers_answer_as_it_is() -> None:
    async with AsyncTestClient(_app()) as client:
        response = await client.post("/direct", content=b"abc")

    assert response.status_code == 202
    assert response.content == b"cba"
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["content-length"] == "3"
    assert response.headers["x-seen"] == "3"


async def test_the_same_handler_answers_alike_on_the_frameworks_path() -> None:
    async with AsyncTestClient(_app()) as client:
        direct_answer = await client.post("/direct", content=b"abc")
        ordinary = await client.post("/ordinary", content=b"abc")

    assert (ordinary.status_code, ordinary.content) == (202, b"cba")
    assert ordinary.headers["x-seen"] == direct_answer.headers["x-seen"]


async def test_the_hook_a_direct_route_skips_answers_on_the_frameworks_path() -> None:
    async with AsyncTestClient(_app()) as client:
        response = await client.post("/hooked", content=b"abc")

    assert response.content == b"intercepted by the framework"


async def test_a_direct_handlers_error_reaches_the_applications_handlers() -> None:
    async with AsyncTestClient(_app()) as client:
        response = await client.get("/failing")

    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:ordertrail:problem:conflict"


async def test_other_routes_go_through_the_framework() -> None:
    async with AsyncTestClient(_app()) as client:
        response = await client.get("/plain")

    assert response.json() == {"answered": "by the framework"}
    assert response.headers[HOOKED] == "yes"
