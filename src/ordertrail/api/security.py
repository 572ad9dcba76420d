"""API keys on the read API (``Authorization: Bearer <key>``), roles, limits."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.types import Scope

from ordertrail.api.problems import ProblemError
from ordertrail.api.services import Services
from ordertrail.auth.credentials import CredentialKind, Role
from ordertrail.lib.limits import retry_after

__all__ = ["ROLE", "access", "admit", "client_address", "refuse_failing"]


def _bearer(header: str | None) -> str | None:
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
            address = forwarded.rsplit(",", 1)[-1].strip()[:64]
            # An address is printable ASCII; anything else is not one, and
            # would not even store (a NUL), so the peer is named instead.
            if address.isascii() and address.isprintable():
                return address
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


ROLE = "role"
"""The key of a route's ``opt`` that names the role its callers need."""


def access(role: Role) -> dict[str, Any]:
    """Return the ``opt`` of a route (or controller) that needs ``role``.

    Routes declare what they need; ``admit`` enforces it for every request
    in the application's entry middleware, which reads the headers once.
    (Guards would do the same at about a tenth of a cheap read's cost more:
    the framework copies the route handler for each guard call.)
    """
    return {ROLE: role}


async def admit(scope: Scope, authorization: str | None, needed: Role) -> None:
    """Let the request through if its API key's role includes ``needed``."""
    services: Services = scope["app"].state.services
    key = await services.credentials.verify(
        _bearer(authorization), CredentialKind.API_KEY
    )
    if key is None or key.role is None:
        connection: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope)
        refuse_failing(
            services,
            client_address(connection, services.settings.trusted_client_header),
        )
        raise NotAuthorizedException("missing, unknown, expired or revoked API key")
    wait = services.key_limits.take(key.id)
    if wait is not None:
        raise _rate_limited(wait, "this API key is over its request rate")
    scope["state"]["api_key_id"] = key.id
    if not key.role.allows(needed):
        raise PermissionDeniedException(f"this needs the {needed.value} role")
