"""Helpers shared by the tests: payloads, deliveries, databases, the app."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.app import create_app
from ordertrail.api.services import Services
from ordertrail.auth.credentials import CredentialKind, Issued
from ordertrail.eventstore.hashing import GENESIS, canonical, chain_hash
from ordertrail.eventstore.records import Delivery, RecordedEvent
from ordertrail.lib.settings import Settings

WEBHOOK_PATH = "/webhooks/locally"
UPC = "601842495575"
"""The UPC of Locally's own example payload."""


def new_order_id() -> str:
    """Return an order id no other test uses, shaped like Locally's."""
    return f"T{uuid.uuid4().hex[:12].upper()}"


def webhook_body(
    order_id: str, *, upc: str = UPC, status: str = "confirmed", **extra: Any
) -> bytes:
    """Return a webhook body as Locally documents it."""
    payload = {
        "upc": upc,
        "order_id": order_id,
        "status": status,
        "order_url": f"https://www.locally.com/api/v2/cart/{order_id}",
        **extra,
    }
    return msgspec.json.encode(payload)


def bearer(api_key: str) -> dict[str, str]:
    """Return the Authorization header for an API key."""
    return {"Authorization": f"Bearer {api_key}"}


def delivery(
    order_id: str,
    *,
    upc: str = UPC,
    status: str = "confirmed",
    mode: str = "live",
    raw_body: bytes | None = None,
    received_at: datetime | None = None,
    idempotency_key: str | None = None,
) -> Delivery:
    """Return a delivery as the ingest controller would build it."""
    return Delivery(
        mode=mode,
        order_id=order_id,
        upc=upc,
        raw_status=status,
        raw_body=raw_body
        if raw_body is not None
        else webhook_body(order_id, upc=upc, status=status),
        received_at=received_at if received_at is not None else datetime.now(UTC),
        request_id=uuid.uuid4().hex,
        token_id="tok_tests",
        client_address="127.0.0.1",
        idempotency_key=idempotency_key,
    )


def stream_chain_errors(events: Sequence[RecordedEvent]) -> list[str]:
    """Recompute one stream's hash chain from GENESIS; return what disagrees."""
    errors = []
    previous = GENESIS
    for expected_version, event in enumerate(events, start=1):
        if event.version != expected_version:
            errors.append(f"version {event.version} where {expected_version} belongs")
        if event.previous_hash != previous:
            errors.append(f"version {event.version}: previous_hash breaks the chain")
        recomputed = chain_hash(
            previous,
            canonical(
                mode=event.mode,
                order_id=event.order_id,
                upc=event.upc,
                version=event.version,
                event_type=event.event_type,
                raw_status=event.raw_status,
                raw_body=event.raw_body,
                received_at=event.received_at,
            ),
        )
        if event.hash != recomputed:
            errors.append(f"version {event.version}: hash does not match its content")
        previous = event.hash
    return errors


async def concurrently(
    client: AsyncTestClient[Any],
    send: Callable[[httpx.AsyncClient], Sequence[Awaitable[httpx.Response]]],
) -> list[httpx.Response]:
    """Send requests at the same time, inside the running app's event loop.

    ``AsyncTestClient`` hands each request to the app's loop and blocks until
    it is answered, so requests sent through it never overlap. Requests made
    here go through the same ASGI app, on its own loop, all in flight at once.
    """

    async def in_app_loop() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver.local"
        ) as http:
            return list(await asyncio.gather(*send(http)))

    return client.blocking_portal.call(in_app_loop)


def fresh_database_name() -> str:
    """Return a database name no other run uses."""
    return f"ordertrail_test_{uuid.uuid4().hex[:12]}"


def _with_path(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(dsn: str, name: str) -> str:
    """Create database ``name`` on the server of ``dsn``; return its DSN."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return _with_path(dsn, name)


async def drop_database(dsn: str, name: str) -> None:
    """Drop database ``name``, closing whatever is still connected to it."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def with_database(dsn: str) -> AsyncIterator[str]:
    """Yield the DSN of a fresh, empty database that is dropped afterwards."""
    name = fresh_database_name()
    url = await create_database(dsn, name)
    try:
        yield url
    finally:
        await drop_database(dsn, name)


@contextlib.contextmanager
def process_stderr() -> Iterator[None]:
    """Point ``sys.stderr`` at the process's file descriptor 2 for a while.

    ``configure_logging`` binds its writers to ``sys.stderr`` as it is when
    called, and pytest swaps that object per test. Configuring while it is
    the process's own stream sends every log line to descriptor 2, which
    stays valid for the whole run and which ``capfd`` captures.
    """
    saved = sys.stderr
    sys.stderr = sys.__stderr__
    try:
        yield
    finally:
        sys.stderr = saved


def make_app(settings: Settings) -> Litestar:
    """Build the app as ``create_app`` does, logging to descriptor 2."""
    with process_stderr():
        return create_app(settings)


def app_settings(database_url: str, **overrides: Any) -> Settings:
    """Return settings for an app on the test database."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "pool_min": 1,
        "pool_max": 8,
        "log_level": "info",
        "log_format": "json",
        # Every test request comes from one address with many keys; the
        # limits have tests of their own with apps that set them.
        "key_rate": 0.0,
        "failure_rate": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


IssueToken = Callable[..., Awaitable[Issued]]
IssueKey = Callable[..., Awaitable[Issued]]


async def until_accepted(
    client: AsyncTestClient[Litestar], secret: str, kind: CredentialKind
) -> None:
    """Wait until the app behind ``client`` accepts a new credential.

    A new credential reaches a running service through NOTIFY, a moment
    after its INSERT commits. Tests wait for it, as an operator hands a token
    over only after creating it; the race itself has a test of its own.
    """
    services: Services = client.app.state.services
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if client.blocking_portal.call(services.credentials.verify, secret, kind):
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"the running service never accepted a new {kind.value}")
