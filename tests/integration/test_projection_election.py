"""Exactly one runner per projection, across service processes.

Two ``ordertrail serve`` processes share one database. The runner's advisory
lock is visible in ``pg_locks``; the backend holding it is matched to the
process that owns the client side of its connection, so the test knows which
service runs the projection, kills that one as a crash would, and watches the
other take over.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import psutil  # type: ignore[import-untyped]  # comes with the embedded server
import pytest

from ordertrail.projections.items import PROJECTION_NAME
from tests.integration.helpers import TOKEN_HEADER
from tests.integration.projection_support import (
    OwnDatabase,
    Service,
    own_database,
    running_service,
    served_version,
    until,
)
from tests.support import WEBHOOK_PATH, new_order_id, webhook_body

pytestmark = pytest.mark.slow

# The backends holding the runner's lock: the two keys of
# pg_try_advisory_lock(int, int) appear as classid and objid, unsigned.
_HOLDERS = """
    SELECT a.pid, a.application_name, a.client_port
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = hashtext('ordertrail.runner')::oid
      AND l.objid = hashtext($1)::oid
"""


@pytest.fixture
async def own(server_url: str) -> AsyncIterator[OwnDatabase]:
    """A database of this test's own."""
    async with own_database(server_url) as database:
        yield database


async def holders(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """The backends that hold the items runner's lock now."""
    return await pool.fetch(_HOLDERS, PROJECTION_NAME)


def owns_port(service: Service, port: int) -> bool:
    """Whether a process of ``service`` (server or worker) has this local port."""
    try:
        leader = psutil.Process(service.pid)
        family = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in family:
        try:
            if any(c.laddr.port == port for c in process.net_connections("tcp")):
                return True
        except psutil.NoSuchProcess:
            continue
    return False


async def runner_of(pool: asyncpg.Pool, services: list[Service]) -> Service:
    """The one service whose connection holds the runner's lock."""
    (holder,) = await holders(pool)
    assert holder["application_name"] == "ordertrail"
    owners = [s for s in services if owns_port(s, holder["client_port"])]
    assert len(owners) == 1, "the lock holder belongs to no service, or to both"
    return owners[0]


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
    own: OwnDatabase,
) -> None:
    token = secrets.token_urlsafe(24)
    settings = {"ORDERTRAIL_WEBHOOK_TOKEN_LIVE": token}
    async with (
        running_service(own.url, **settings) as first,
        running_service(own.url, **settings) as second,
    ):
        services = [first, second]
        await until(
            lambda: _held(own.pool), "a service taking the runner lock", within=15
        )
        # Each loser tries again every two seconds; give both several tries.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert len(await holders(own.pool)) == 1
            await asyncio.sleep(0.1)
        leader = await runner_of(own.pool, services)
        survivor = second if leader is first else first

        # The elected runner follows deliveries taken by either service.
        last = await deliver(leader, token, 3)
        last = max(last, await deliver(survivor, token, 3))
        await until(lambda: checkpoint_reaches(own.pool, last), "the checkpoint")

        leader.kill()
        await leader.process.wait()
        took = await until(
            lambda: _held_by(own.pool, survivor),
            "the survivor taking over",
            within=10,
        )
        assert took < 10
        assert len(await holders(own.pool)) == 1

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
    return bool(await holders(pool))


async def _held_by(pool: asyncpg.Pool, service: Service) -> bool:
    found = await holders(pool)
    return len(found) == 1 and owns_port(service, found[0]["client_port"])
