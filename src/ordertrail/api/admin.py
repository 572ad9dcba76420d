"""Operator endpoints under ``/v1/admin``; they need the admin role."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.params import Parameter

from ordertrail.api.documentation import API_KEY, problems
from ordertrail.api.parameters import Limit
from ordertrail.api.security import access
from ordertrail.api.services import Services
from ordertrail.auth.credentials import Role
from ordertrail.ingest.quarantine import Quarantined, list_held
from ordertrail.projections.status import ProjectionStatus, statuses

__all__ = ["AdminController", "ProjectionsPage", "QuarantinePage"]


class QuarantinePage(msgspec.Struct, frozen=True, kw_only=True):
    """Quarantined deliveries, oldest first; ``raw_body`` is base64."""

    deliveries: list[Quarantined]


class ProjectionsPage(msgspec.Struct, frozen=True, kw_only=True):
    """Every projection version with its state and lag."""

    projections: list[ProjectionStatus]


class AdminController(Controller):
    """What operators look at; never open to readers or auditors."""

    path = "/v1/admin"
    tags = ["admin"]  # noqa: RUF012 - litestar reads a plain list
    opt = access(Role.ADMIN)

    @get(
        "/quarantine",
        summary="Authenticated deliveries that were not readable",
        security=API_KEY,
        responses=problems(400, 401, 403, 429, 503),
    )
    async def quarantine(
        self,
        request: Request[Any, Any, Any],
        *,
        include_released: Annotated[
            bool, Parameter(description="Also list deliveries released into the log.")
        ] = False,
        limit: Limit = 100,
    ) -> QuarantinePage:
        """List quarantined deliveries; release them with the command line."""
        services: Services = request.app.state.services
        async with services.pool.acquire() as connection:
            held = await list_held(
                connection, include_released=include_released, limit=limit
            )
        return QuarantinePage(deliveries=held)

    @get(
        "/projections",
        summary="Projection versions: state, checkpoint, head, lag, last error",
        security=API_KEY,
        responses=problems(401, 403, 429, 503),
    )
    async def projections(self, request: Request[Any, Any, Any]) -> ProjectionsPage:
        """Show what ``ordertrail projections status`` shows."""
        services: Services = request.app.state.services
        async with services.pool.acquire() as connection:
            found = await statuses(connection)
        return ProjectionsPage(projections=found)
