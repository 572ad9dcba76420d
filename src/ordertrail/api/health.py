"""Liveness and readiness probes; they need no key."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec

from ordertrail.api.services import Services

__all__ = ["Health", "live", "ready"]


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    """A probe's answer."""

    status: str
    database: str | None = None
    migrations: str | None = None


@get("/health/live", tags=["health"], summary="The process is up")
async def live() -> Health:
    """Answer as long as the process serves HTTP."""
    return Health("live")


@get(
    "/health/ready",
    tags=["health"],
    summary="The service can take webhooks",
    responses={
        503: ResponseSpec(
            Health,
            description="Database unreachable or schema behind",
            generate_examples=False,
        )
    },
)
async def ready(request: Request[Any, Any, Any]) -> Response[Health]:
    """Answer 200 when the database answers and its schema is current."""
    services: Services = request.app.state.services
    try:
        current = await asyncio.wait_for(services.migrations_current(), timeout=2.0)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return Response(Health("unavailable", database="unreachable"), status_code=503)
    if not current:
        return Response(
            Health("unavailable", database="ok", migrations="pending"), status_code=503
        )
    return Response(Health("ready", database="ok", migrations="current"))
