"""The OpenAPI document against the running service: schemathesis explores
every operation with generated requests, and no answer may be a server error
or differ from what the document promises (status, content type, body)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from tests.support import new_order_id, webhook_body

pytestmark = pytest.mark.slow

_LONGEST_WAIT = "0.05"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def secrets(database_url: str) -> dict[str, str]:
    """An admin key and a live webhook token, made before the server starts."""

    async def issue() -> dict[str, str]:
        connection = await asyncpg.connect(database_url)
        try:
            key = await create_credential(
                connection, CredentialKind.API_KEY, role=Role.ADMIN, label="contract"
            )
            token = await create_credential(
                connection, CredentialKind.WEBHOOK_TOKEN, mode="live", label="contract"
            )
        finally:
            await connection.close()
        return {"key": key.secret, "token": token.secret}

    import asyncio

    return asyncio.run(issue())


@pytest.fixture(scope="module")
def service(database_url: str, secrets: dict[str, str]) -> Iterator[str]:
    """ordertrail served by granian in its own process, on a free port."""
    port = _free_port()
    environment = {
        **os.environ,
        "ORDERTRAIL_DATABASE_URL": database_url,
        "ORDERTRAIL_PORT": str(port),
        "ORDERTRAIL_LOG_LEVEL": "warning",
        # Generated requests come fast; limits are tested on their own.
        "ORDERTRAIL_KEY_RATE": "0",
        "ORDERTRAIL_FAILURE_RATE": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "ordertrail", "serve"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(base)
        # Something to find: an order for the generated reads to hit.
        httpx.post(
            f"{base}/webhooks/locally",
            content=webhook_body(new_order_id()),
            headers={"locally-webhook-token": secrets["token"]},
        ).raise_for_status()
        yield base
    finally:
        process.terminate()
        process.wait(timeout=15)


def _wait_until_ready(base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("the service did not become ready")


_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_every_answer_matches_the_document(
    service: str, secrets: dict[str, str]
) -> None:
    api = schemathesis.openapi.from_url(f"{service}/schema/openapi.json")
    headers = {
        "Authorization": f"Bearer {secrets['key']}",
        "locally-webhook-token": secrets["token"],
    }
    failures: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8, "the document lost operations"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def explore(case: schemathesis.Case) -> None:
            # A long poll on an idle feed would hold each example for its wait.
            if case.query and "wait" in case.query:
                case.query["wait"] = _LONGEST_WAIT
            case.call_and_validate(base_url=service, headers=headers, checks=_CHECKS)

        try:
            explore()
        except Exception as failure:  # every operation is explored; report all
            failures.append(f"{operation.label}: {failure}")
    assert not failures, "\n\n".join(failures)
