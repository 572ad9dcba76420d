"""Reading what the service stored, for assertions."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import UPC, WEBHOOK_PATH, bearer

TOKEN_HEADER = "locally-webhook-token"


async def post_webhook(
    client: AsyncTestClient[Litestar],
    body: bytes,
    token: str | None,
    *,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a delivery the way Locally does, with a request id to find it by."""
    sent = {"content-type": "application/json", "x-request-id": uuid.uuid4().hex}
    if token is not None:
        sent[TOKEN_HEADER] = token
    sent.update(headers or {})
    return await client.post(WEBHOOK_PATH, content=body, headers=sent)


async def get_item(
    client: AsyncTestClient[Litestar],
    key: str,
    order_id: str,
    upc: str = UPC,
    *,
    mode: str | None = None,
) -> httpx.Response:
    """GET one item of an order through the read API."""
    params = {"mode": mode} if mode else None
    return await client.get(
        f"/v1/orders/{order_id}/items/{upc}", headers=bearer(key), params=params
    )


async def stored_events(pool: asyncpg.Pool, order_id: str) -> list[dict[str, Any]]:
    """Every event of an order, in either mode, in position order."""
    rows = await pool.fetch(
        "SELECT * FROM events WHERE order_id = $1 ORDER BY position", order_id
    )
    return [dict(row.items()) for row in rows]


async def quarantined_by_request(
    pool: asyncpg.Pool, request_id: str
) -> dict[str, Any] | None:
    """The quarantine row of one request, if it was kept there."""
    row = await pool.fetchrow(
        "SELECT * FROM quarantine WHERE request_id = $1", request_id
    )
    return dict(row.items()) if row is not None else None


async def quarantined_mentioning(pool: asyncpg.Pool, text: str) -> int:
    """How many quarantined bodies contain ``text``."""
    count = await pool.fetchval(
        "SELECT count(*) FROM quarantine WHERE position($1::bytea IN raw_body) > 0",
        text.encode(),
    )
    assert isinstance(count, int)
    return count
