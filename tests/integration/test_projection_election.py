"""Exactly one runner per projection, across service processes.

Two ``ordertrail serve`` processes share one database. Exactly one session
holds the runner's advisory lock (``pg_locks`` shows it), and exactly one
service logs its election. Over TCP the session's client port also names the
process that holds the lock, which must be that service; a Unix socket, as
the embedded server is reached, has no port to follow, so there the log
alone names it. The test kills the runner as a crash would and watches the
other service take over.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.integration.fault_support import (
    elections,
    log_tail,
    runner_holders,
    service_owning,
    serving,
)
from tests.integration.helpers import TOKEN_HEADER
from tests.integration.projection_support import (
    OwnDatabase,
    Service,
    served_version,
    until,
)
from tests.support import WEBHOOK_PATH, new_order_id, webhook_body

pytestmark = pytest.mark.slow


async def runs_the_projection(
    pool: asyncpg.Pool, service: Service, log: Path, *, elected: int = 1
) -> bool:
    """Whether ``service`` alone holds the runner's lock, elected ``elected`` times.

    The lock's session is matched to the service's processes where its
    connection has a client port.
    """
    holders = await runner_holders(pool)
    if len(holders) != 1 or elections(log) != elected:
        return False
    assert holders[0]["application_name"] == "ordertrail"
    port = holders[0]["client_port"]
    return port is None or port <= 0 or service_owning([service], port) == [service]


async def deliver(service: Service, token: str, count: int) -> int:
    """Post webhooks for new items; return the highest position appended."""
    last = 0
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as http:
        for _ in range(count):
            answer = await http.post(
                WEBHOOK_PATH,
                content=webhook_body(new_order_id(), status="ordered"),
                headers={TOKEN_HEADER: token, "content-type": "application/json"},
            )
            assert answer.status_code == 202, answer.text
            last = max(last, answer.json()["position"])
    return last


async def checkpoint_reaches(pool: asyncpg.Pool, position: int) -> bool:
    return (await served_version(pool)).checkpoint_position >= position


async def test_one_service_runs_the_projection_and_another_takes_over_when_it_dies(
    own: OwnDatabase, tmp_path: Path
) -> None:
    token = secrets.token_urlsafe(24)
    # At info the services log their elections, which name the runner.
    settings = {"ORDERTRAIL_WEBHOOK_TOKEN_LIVE": token, "ORDERTRAIL_LOG_LEVEL": "info"}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    async with (
        serving(own.url, logs[0], **settings) as first,
        serving(own.url, logs[1], **settings) as second,
    ):
        await until(
            lambda: _held(own.pool), "a service taking the runner lock", within=15
        )
        # Each loser tries again every two seconds; give both several tries.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert len(await runner_holders(own.pool)) == 1
            await asyncio.sleep(0.1)
        said = [elections(log) for log in logs]
        assert sorted(said) == [0, 1], [log_tail(log) for log in logs]
        leader, survivor = (first, second) if said[0] else (second, first)
        leader_log, survivor_log = (logs[0], logs[1]) if said[0] else (logs[1], logs[0])
        assert await runs_the_projection(own.pool, leader, leader_log)

        # The elected runner follows deliveries taken by either service.
        last = await deliver(leader, token, 3)
        last = max(last, await deliver(survivor, token, 3))
        await until(lambda: checkpoint_reaches(own.pool, last), "the checkpoint")

        leader.kill()
        await leader.process.wait()
        took = await until(
            lambda: runs_the_projection(own.pool, survivor, survivor_log),
            "the survivor taking over",
            within=10,
        )
        assert took < 10

        # The survivor's runner now moves the checkpoint as webhooks arrive.
        for _ in range(3):
            last = await deliver(survivor, token, 2)
            await until(
                functools.partial(checkpoint_reaches, own.pool, last),
                "the checkpoint after the take-over",
            )
        head = await own.pool.fetchval("SELECT max(position) FROM events")
        assert (await served_version(own.pool)).checkpoint_position == head


async def _held(pool: asyncpg.Pool) -> bool:
    return bool(await runner_holders(pool))
