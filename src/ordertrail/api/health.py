"""Liveness and readiness probes; they need no key."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec

from ordertrail.api.services import Services
from ordertrail.db.replica import ReadReplica

__all__ = ["Health", "live", "ready"]

_PROBE_TIMEOUT = 2.0
"""Seconds a probe waits for a database before calling it unreachable."""


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    """A probe's answer."""

    status: str
    """``ready``; ``degraded`` when the read replica cannot answer reads."""
    database: str | None = None
    migrations: str | None = None
    replica: str | None = None
    """With a read replica: ``ok``, ``unreachable`` or ``not-a-standby``."""
    replica_lag_bytes: int | None = None
    """WAL the primary wrote that the replica has not replayed yet."""
    read_your_writes: bool | None = None
    """Whether a webhook's 202 waits until synchronous standbys applied it."""


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
    """Answer 200 when the database answers and its schema is current.

    A read replica that is down or lagging is reported, not refused: the
    primary alone takes webhooks, and Locally gives up on an endpoint that
    refuses them for a minute.
    """
    services: Services = request.app.state.services
    try:
        current = await asyncio.wait_for(
            services.migrations_current(), timeout=_PROBE_TIMEOUT
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return Response(Health("unavailable", database="unreachable"), status_code=503)
    if not current:
        return Response(
            Health("unavailable", database="ok", migrations="pending"), status_code=503
        )
    if services.replica is None:
        return Response(Health("ready", database="ok", migrations="current"))
    return Response(await _with_replica(services.replica))


async def _with_replica(replica: ReadReplica) -> Health:
    try:
        status = await asyncio.wait_for(replica.status(), timeout=_PROBE_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return Health(
            "degraded", database="ok", migrations="current", replica="unreachable"
        )
    return Health(
        "ready" if status.standby else "degraded",
        database="ok",
        migrations="current",
        replica="ok" if status.standby else "not-a-standby",
        replica_lag_bytes=status.lag_bytes,
        read_your_writes=status.read_your_writes,
    )
