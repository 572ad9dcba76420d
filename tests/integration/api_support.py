"""Shared by the read API tests: apps of their own, credentials, problem answers.

Tests that send failed authentications, or hundreds of requests with one key,
run against an app of their own so that the per-address failure budget and
the per-key rate of the session's app stay untouched for every other test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.services import Services
from ordertrail.auth.credentials import (
    CredentialKind,
    Issued,
    Role,
    create_credential,
    revoke_credential,
)
from tests.support import app_settings, make_app, until_accepted

__all__ = [
    "PROBLEM_TYPE",
    "issue",
    "problem",
    "revoke",
    "running_app",
]

PROBLEM_TYPE = "urn:ordertrail:problem:"


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check that ``response`` is a problem document of ``status``; return it."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    document = msgspec.json.decode(response.content)
    assert isinstance(document, dict)
    assert document["status"] == status
    assert document["type"].startswith(PROBLEM_TYPE)
    return document


@contextlib.asynccontextmanager
async def running_app(
    database_url: str, **overrides: Any
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """Start an app of its own on the test database, with ``overrides``."""
    app = make_app(app_settings(database_url, **overrides))
    async with AsyncTestClient(app=app) as client:
        yield client


def _services(client: AsyncTestClient[Litestar]) -> Services:
    services = client.app.state.services
    assert isinstance(services, Services)
    return services


async def _until_refused(
    client: AsyncTestClient[Litestar], secret: str, kind: CredentialKind
) -> None:
    # The check runs on the app's own loop, through its portal, and is not a
    # request: waiting this way spends nothing of the address's failure budget.
    services = _services(client)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if (
            client.blocking_portal.call(services.credentials.verify, secret, kind)
            is None
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the running app still accepts a revoked {kind.value}")


async def issue(
    client: AsyncTestClient[Litestar],
    pool: asyncpg.Pool,
    kind: CredentialKind,
    *,
    role: Role | None = None,
    mode: str | None = None,
    expires_in: timedelta | None = None,
) -> Issued:
    """Create a credential; unless already expired, wait until ``client`` takes it."""
    async with pool.acquire() as connection:
        issued = await create_credential(
            connection,
            kind,
            role=role,
            mode=mode,
            label="read api tests",
            expires_in=expires_in,
        )
    if expires_in is None or expires_in > timedelta(0):
        await until_accepted(client, issued.secret, kind)
    return issued


async def revoke(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool, issued: Issued
) -> None:
    """Revoke a credential and wait until the running app refuses it."""
    kind = issued.credential.kind
    async with pool.acquire() as connection:
        revoked = await revoke_credential(connection, kind, issued.credential.id)
    assert revoked is not None
    assert revoked.revoked_at is not None
    await _until_refused(client, issued.secret, kind)
