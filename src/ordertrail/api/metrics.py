"""``GET /metrics``: Prometheus metrics, for an admin key.

Counters and histograms are kept as the service runs; projection lag and
rebuild progress are read from the catalogue at scrape time, so they cover
rebuilds run by other processes too.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ordertrail.api.documentation import API_KEY, problems
from ordertrail.api.security import access
from ordertrail.api.services import Services
from ordertrail.auth.credentials import Role
from ordertrail.lib.metrics import (
    PROJECTION_APPLIED,
    PROJECTION_LAG_EVENTS,
    PROJECTION_LAG_SECONDS,
    PROJECTION_TARGET,
    REGISTRY,
)
from ordertrail.projections.status import statuses

__all__ = ["metrics"]


@get(
    "/metrics",
    tags=["admin"],
    summary="Prometheus metrics",
    opt=access(Role.ADMIN),
    security=API_KEY,
    responses=problems(401, 403, 429, 503),
    media_type=CONTENT_TYPE_LATEST,
)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Return this process's metrics in the Prometheus text format."""
    services: Services = request.app.state.services
    async with services.pool.acquire() as connection:
        found = await statuses(connection)
    gauges = (
        PROJECTION_LAG_EVENTS,
        PROJECTION_LAG_SECONDS,
        PROJECTION_APPLIED,
        PROJECTION_TARGET,
    )
    for gauge in gauges:
        # States change; a version's old state must not linger as a series.
        gauge.clear()
    for entry in found:
        labels = (entry.name, str(entry.version), entry.state)
        PROJECTION_LAG_EVENTS.labels(*labels).set(entry.lag_events)
        PROJECTION_LAG_SECONDS.labels(*labels).set(entry.lag_seconds)
        PROJECTION_APPLIED.labels(*labels).set(entry.events_applied)
        PROJECTION_TARGET.labels(*labels).set(entry.head_position)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
