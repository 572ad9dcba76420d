"""API keys on the read API (``Authorization: Bearer <key>``), roles, limits."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from ordertrail.api.problems import ProblemError
from ordertrail.api.services import Services
from ordertrail.auth.credentials import CredentialKind, Role
from ordertrail.lib.limits import retry_after

__all__ = ["client_address", "refuse_failing", "requires"]


def _bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def client_address(
    connection: ASGIConnection[Any, Any, Any, Any], trusted_header: str | None
) -> str:
    """Return the client's address, from a trusted proxy header if configured.

    Only a header named in the settings is believed: anyone can send one. Of
    a list (``X-Forwarded-For: a, b``) the last entry is taken, the one the
    trusted proxy appended; the entries before it are the client's to write.
    """
    if trusted_header:
        forwarded = connection.headers.get(trusted_header)
        if forwarded:
            return forwarded.rsplit(",", 1)[-1].strip()[:64]
    return connection.client.host if connection.client else "unknown"


def refuse_failing(services: Services, address: str) -> None:
    """Count a failed authentication; answer 429 once an address has too many.

    A valid credential is never held back by its address's failures.
    """
    wait = services.failure_limits.take(address)
    if wait is not None:
        raise _rate_limited(wait, "too many failed authentications from this address")


def _rate_limited(wait: float, detail: str) -> ProblemError:
    return ProblemError(
        429,
        "rate-limited",
        "Too many requests",
        detail,
        headers={"Retry-After": retry_after(wait)},
    )


def requires(role: Role) -> Guard:
    """Return a guard that admits API keys whose role includes ``role``."""

    async def guard(
        connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler
    ) -> None:
        services: Services = connection.app.state.services
        state = connection.scope["state"]
        admitted = state.get("api_key_role")
        if isinstance(admitted, Role):
            # An outer guard (the controller's) already checked the key and
            # spent its rate; only the role is left to check.
            _require(admitted, role)
            return
        key = await services.credentials.verify(
            _bearer(connection), CredentialKind.API_KEY
        )
        if key is None or key.role is None:
            address = client_address(
                connection, services.settings.trusted_client_header
            )
            refuse_failing(services, address)
            raise NotAuthorizedException("missing, unknown, expired or revoked API key")
        wait = services.key_limits.take(key.id)
        if wait is not None:
            raise _rate_limited(wait, "this API key is over its request rate")
        state["api_key_id"] = key.id
        state["api_key_role"] = key.role
        _require(key.role, role)

    guard.__name__ = f"requires_{role.value}"
    return guard


def _require(held: Role, needed: Role) -> None:
    if not held.allows(needed):
        raise PermissionDeniedException(f"this needs the {needed.value} role")
