"""Conditional GETs: ETags from stream versions, 304 for an unchanged view.

Pollers send back the ETag they last saw in ``If-None-Match``; when nothing
changed they get a bodiless 304, which skips building and encoding the view.
``Cache-Control: no-cache`` lets caches keep a copy but makes them ask first.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response

__all__ = ["CACHE_CONTROL", "fresh", "not_modified", "validators"]

CACHE_CONTROL = "no-cache"


def validators(etag: str) -> dict[str, str]:
    """Return the headers that let a client revalidate a view."""
    return {"ETag": etag, "Cache-Control": CACHE_CONTROL}


def fresh(request: Request[Any, Any, Any], etag: str) -> bool:
    """Return whether the client's copy (``If-None-Match``) is current."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    if header.strip() == "*":
        return True
    # Weak comparison (RFC 9110 13.1.2): a W/ prefix does not matter here.
    return any(
        candidate.strip().removeprefix("W/") == etag for candidate in header.split(",")
    )


def not_modified(etag: str) -> Response[None]:
    """Return the bodiless answer for a current copy."""
    return Response(None, status_code=304, headers=validators(etag))
