"""``ordertrail serve --checkpoint-every`` records signed checkpoints."""

from __future__ import annotations

import asyncio
import secrets
import time

import asyncpg
import httpx
import pytest

from ordertrail.auth.credentials import CredentialKind, create_credential
from tests.integration.projection_support import (
    free_port,
    kill_group,
    own_database,
    start_command,
)
from tests.support import WEBHOOK_PATH, new_order_id, webhook_body

pytestmark = pytest.mark.slow


async def test_serve_records_a_checkpoint_after_deliveries(server_url: str) -> None:
    async with own_database(server_url) as own:
        async with own.pool.acquire() as connection:
            token = await create_credential(
                connection, CredentialKind.WEBHOOK_TOKEN, mode="live"
            )
        port = free_port()
        process = await start_command(
            own.url,
            "serve",
            "--checkpoint-every",
            "1s",
            ORDERTRAIL_PORT=str(port),
            ORDERTRAIL_AUDIT_KEY=secrets.token_urlsafe(32),
        )
        try:
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base) as http:
                await _until_ready(http)
                answer = await http.post(
                    WEBHOOK_PATH,
                    content=webhook_body(new_order_id()),
                    headers={"locally-webhook-token": token.secret},
                )
            recorded = await _checkpoints_within(own.pool, 15.0)
        finally:
            kill_group(process.pid)
            await process.wait()

    assert answer.status_code == 202
    assert recorded >= 1


async def _until_ready(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if (await http.get("/health/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail("the service did not become ready")


async def _checkpoints_within(pool: asyncpg.Pool, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        count = int(await pool.fetchval("SELECT count(*) FROM audit_checkpoints"))
        if count:
            break
        await asyncio.sleep(0.2)
    return count
