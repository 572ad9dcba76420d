"""Cross-origin reads: closed by default, open to the configured origins only."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.auth.credentials import CredentialKind, Role
from tests.integration.api_support import issue, running_app
from tests.support import bearer

TILL = "https://till.example"
POS = "https://pos.example"
STRANGER = "https://stranger.example"


def preflight(origin: str) -> dict[str, str]:
    """The headers of a browser's preflight for a keyed, conditional GET."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, if-none-match",
    }


def allowed_origin(response: httpx.Response) -> str | None:
    return response.headers.get("access-control-allow-origin")


@pytest.mark.parametrize("path", ["/v1/items", "/health/live"])
async def test_no_origin_is_allowed_by_default(
    client: AsyncTestClient[Litestar], reader_key: str, path: str
) -> None:
    simple = await client.get(path, headers={"Origin": POS, **bearer(reader_key)})
    asked = await client.options(path, headers=preflight(POS))

    assert simple.status_code == 200
    assert allowed_origin(simple) is None
    assert allowed_origin(asked) is None
    assert "access-control-allow-credentials" not in asked.headers


async def test_configured_origins_may_read_and_others_may_not(
    database_url: str, pool: asyncpg.Pool
) -> None:
    async with running_app(database_url, cors_origins=f"{TILL}, {POS}") as client:
        reader = await issue(client, pool, CredentialKind.API_KEY, role=Role.READER)
        key = reader.secret

        allowed = await client.get("/v1/items", headers={"Origin": POS, **bearer(key)})
        also_allowed = await client.get(
            "/v1/items", headers={"Origin": TILL, **bearer(key)}
        )
        stranger = await client.get(
            "/v1/items", headers={"Origin": STRANGER, **bearer(key)}
        )

    assert allowed.status_code == 200
    assert allowed_origin(allowed) == POS
    assert allowed_origin(also_allowed) == TILL
    # Pollers revalidate with the ETag and back off on Retry-After; a browser
    # only lets a page read the headers that are exposed.
    exposed = {
        name.strip().lower()
        for name in allowed.headers["access-control-expose-headers"].split(",")
    }
    assert {"etag", "retry-after", "x-request-id"} <= exposed
    # The answer itself is the same: it is the browser that withholds it.
    assert stranger.status_code == 200
    assert allowed_origin(stranger) is None


async def test_a_preflight_is_answered_for_configured_origins_only(
    database_url: str,
) -> None:
    async with running_app(database_url, cors_origins=POS) as client:
        allowed = await client.options("/v1/items", headers=preflight(POS))
        stranger = await client.options("/v1/items", headers=preflight(STRANGER))

    assert allowed.status_code in {200, 204}
    assert allowed_origin(allowed) == POS
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers
    assert "if-none-match" in allowed_headers
    assert "GET" in allowed.headers["access-control-allow-methods"]
    assert allowed_origin(stranger) is None


async def test_a_browser_may_not_post_webhooks_across_origins(
    database_url: str,
) -> None:
    # Only reads are opened to browsers; the webhook is Locally's alone.
    async with running_app(database_url, cors_origins=POS) as client:
        asked = await client.options(
            "/webhooks/locally",
            headers={
                "Origin": POS,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "locally-webhook-token",
            },
        )

    methods = asked.headers.get("access-control-allow-methods", "")
    assert "POST" not in methods
