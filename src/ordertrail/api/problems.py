"""Errors as RFC 9457 problem details, with a stable type per error."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    ValidationException,
)

from ordertrail.api.direct import Answer

__all__ = [
    "Problem",
    "ProblemError",
    "exception_handlers",
    "problem_answer",
    "problem_response",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"

log = structlog.get_logger("ordertrail.api")


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An error answer (RFC 9457 problem details)."""

    type: str
    """A stable URI naming the kind of error: ``urn:ordertrail:problem:<name>``."""
    title: str
    status: int
    detail: str | None = None
    parameter: str | None = None
    """The query or path parameter at fault, when there is one."""
    request_id: str | None = None


class ProblemError(Exception):
    """Raised by handlers to answer with a problem."""

    def __init__(
        self,
        status: int,
        name: str,
        title: str,
        detail: str | None = None,
        *,
        parameter: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.name = name
        self.title = title
        self.detail = detail
        self.parameter = parameter
        self.headers = headers or {}


def problem_response(
    status: int,
    name: str,
    title: str,
    detail: str | None = None,
    *,
    parameter: str | None = None,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
) -> Response[bytes]:
    """Return a problem-details response."""
    return Response(
        _problem_body(
            status, name, title, detail, parameter=parameter, request_id=request_id
        ),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def problem_answer(
    status: int,
    name: str,
    title: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
) -> Answer:
    """Return a problem-details answer for a direct handler."""
    body = _problem_body(
        status, name, title, detail, parameter=None, request_id=request_id
    )
    return Answer.of(status, body, PROBLEM_MEDIA_TYPE, headers)


def _problem_body(
    status: int,
    name: str,
    title: str,
    detail: str | None,
    *,
    parameter: str | None,
    request_id: str | None,
) -> bytes:
    problem = Problem(
        type=f"urn:ordertrail:problem:{name}",
        title=title,
        status=status,
        detail=detail,
        parameter=parameter,
        request_id=request_id,
    )
    return msgspec.json.encode(problem)


def _request_id(request: Request[Any, Any, Any]) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def _on_problem(
    request: Request[Any, Any, Any], error: ProblemError
) -> Response[bytes]:
    return problem_response(
        error.status,
        error.name,
        error.title,
        error.detail,
        parameter=error.parameter,
        headers=error.headers,
        request_id=_request_id(request),
    )


def _on_validation(
    request: Request[Any, Any, Any], error: ValidationException
) -> Response[bytes]:
    parameter = None
    detail = error.detail
    extra = error.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        parameter = _public_name(request, str(extra[0].get("key", "")))
        message = extra[0].get("message")
        if parameter and message:
            detail = f"{parameter}: {message}"
    return problem_response(
        400,
        "invalid-parameter",
        "A request parameter is not valid",
        detail,
        parameter=parameter or None,
        request_id=_request_id(request),
    )


def _public_name(request: Request[Any, Any, Any], argument: str) -> str:
    # A handler argument may read a query parameter of another name; the
    # client only knows the query's.
    try:
        field = request.route_handler.parsed_fn_signature.parameters[argument]
    except (AttributeError, KeyError):
        return argument
    definition = field.kwarg_definition
    # QueryParameter keeps the public name in ``name``; the older Parameter
    # form in ``query``.
    for attribute in ("name", "query"):
        alias = getattr(definition, attribute, None)
        if isinstance(alias, str) and alias:
            return alias
    return argument


def _on_unauthorized(
    request: Request[Any, Any, Any], error: NotAuthorizedException
) -> Response[bytes]:
    return problem_response(
        401,
        "unauthorized",
        "A valid API key is required",
        error.detail,
        headers={"WWW-Authenticate": 'Bearer realm="ordertrail"'},
        request_id=_request_id(request),
    )


def _on_unusable_value(
    request: Request[Any, Any, Any], error: asyncpg.DataError
) -> Response[bytes]:
    # The read endpoints pass the request's values to the database as query
    # arguments, so a data exception is a value the client sent that no
    # stored text or number can equal: a NUL character, a string that is not
    # UTF-8, a date beyond the calendar's range. That is a bad request, not a
    # failure of the service.
    log.info(
        "request.unusable_value",
        request_id=_request_id(request),
        error=type(error).__name__,
    )
    return problem_response(
        400,
        "invalid-parameter",
        "A request parameter is not valid",
        "a value in the request cannot be compared with stored data: it holds "
        "a NUL character or text that is not UTF-8, or is out of range",
        request_id=_request_id(request),
    )


def _on_http(request: Request[Any, Any, Any], error: HTTPException) -> Response[bytes]:
    name = {
        403: "forbidden",
        404: "not-found",
        405: "method-not-allowed",
        413: "body-too-large",
    }.get(error.status_code, "http-error")
    return problem_response(
        error.status_code,
        name,
        error.detail or "HTTP error",
        request_id=_request_id(request),
    )


# What a handler meets when the database is out of reach: the server down,
# restarting or refusing connections, or a pooled connection it closed (which
# asyncpg reports as an InternalClientError when the server ended the session
# a moment before, while it sat idle). Reads and credential look-ups do not
# catch these one by one.
_DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    ConnectionError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
)


def _on_unavailable(
    request: Request[Any, Any, Any], error: Exception
) -> Response[bytes]:
    # Said as a webhook says it: 503 and Retry-After, so a client waits and
    # tries again while the service reconnects by itself, instead of a 500
    # that reads as a fault in the request or the code.
    log.warning(
        "request.database_unavailable",
        request_id=_request_id(request),
        error=type(error).__name__,
        detail=str(error),
    )
    return problem_response(
        503,
        "unavailable",
        "The database cannot be reached; retry",
        headers={"Retry-After": "1"},
        request_id=_request_id(request),
    )


exception_handlers: dict[Any, Any] = {
    ProblemError: _on_problem,
    ValidationException: _on_validation,
    NotAuthorizedException: _on_unauthorized,
    HTTPException: _on_http,
    asyncpg.DataError: _on_unusable_value,
    **dict.fromkeys(_DATABASE_UNAVAILABLE, _on_unavailable),
}
