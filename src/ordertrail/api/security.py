"""API keys on the read API: ``Authorization: Bearer <key>`` and roles."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from ordertrail.api.services import Services
from ordertrail.auth.credentials import CredentialKind, Role

__all__ = ["requires"]


def _bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def requires(role: Role) -> Guard:
    """Return a guard that admits API keys whose role includes ``role``."""

    async def guard(
        connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
    ) -> None:
        services: Services = connection.app.state.services
        key = await services.credentials.verify(
            _bearer(connection), CredentialKind.API_KEY
        )
        if key is None or key.role is None:
            raise NotAuthorizedException("missing, unknown, expired or revoked API key")
        if not key.role.allows(role):
            raise PermissionDeniedException(f"this needs the {role.value} role")
        connection.scope["state"]["api_key_id"] = key.id

    guard.__name__ = f"requires_{role.value}"
    return guard
