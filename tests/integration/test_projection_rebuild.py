"""Blue/green rebuilds: build a new version beside the served one, then swap.

Every test here has a database of its own: a swap changes the version every
reader of that database is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from ordertrail.db.connection import connect
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import Delivery
from ordertrail.projections import catalogue, rebuild
from ordertrail.projections.catalogue import ProjectionState, ProjectionVersion
from ordertrail.projections.items import PROJECTION_NAME
from ordertrail.projections.runner import Batch
from ordertrail.projections.served import ServedProjection
from tests.integration.helpers import TOKEN_HEADER
from tests.integration.projection_support import (
    STORE,
    OwnDatabase,
    Service,
    append_inline,
    append_raw,
    differing,
    kill_group,
    ordertrail,
    projection_for,
    report,
    rows_of,
    running_service,
    scratch_fold,
    served_version,
    settle,
    start_command,
    table_exists,
    until,
    view_source,
)
from tests.support import WEBHOOK_PATH, bearer, new_order_id, webhook_body

_STATUSES = ("ordered", "confirmed", "note", "ready for pickup", "picked up")
ALIAS = "good to go"
"""A status the shipped vocabulary does not know."""


def spread(orders: list[str], count: int, *, start: int = 0) -> list[Delivery]:
    """``count`` reports spread over two items of each order."""
    streams = list(itertools.product(orders, ("U1", "U2")))
    return [
        report(order_id, _STATUSES[(start + i) // len(streams) % 5], upc=upc)
        for i, (order_id, upc) in zip(
            range(count), itertools.cycle(streams), strict=False
        )
    ]


async def version(pool: asyncpg.Pool, number: int) -> ProjectionVersion:
    async with pool.acquire() as connection:
        found = await catalogue.find(connection, PROJECTION_NAME, number)
    assert found is not None, f"no version {number}"
    return found


async def matches_fold(pool: asyncpg.Pool, number: int) -> list[str]:
    """How version ``number``'s table differs from a fold of the whole log."""
    record = await version(pool, number)
    async with pool.acquire() as connection:
        return differing(
            await rows_of(connection, record.table_name),
            await scratch_fold(connection, await projection_for(connection, number)),
        )


async def event_count(pool: asyncpg.Pool) -> int:
    count = await pool.fetchval("SELECT count(*) FROM events")
    assert isinstance(count, int)
    return count


# Rebuilding under load -----------------------------------------------------------


@dataclass
class Traffic:
    """Webhooks and reads sent to a service for as long as a rebuild takes."""

    service: Service
    token: str
    key: str
    orders: list[str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    accepted: list[int] = field(default_factory=list)
    reads: int = 0
    faults: list[str] = field(default_factory=list)

    async def write(self) -> None:
        """Post webhooks, one after another, until told to stop."""
        async with httpx.AsyncClient(base_url=self.service.base_url) as http:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                await self.post(http, self.orders[n % len(self.orders)], n)

    async def post(self, http: httpx.AsyncClient, order_id: str, n: int) -> None:
        """Post one webhook; record its position or what went wrong."""
        status = _STATUSES[n // len(self.orders) % 5]
        body = webhook_body(order_id, upc="U1", status=status, sequence=n)
        try:
            answer = await http.post(
                WEBHOOK_PATH,
                content=body,
                headers={TOKEN_HEADER: self.token, "content-type": "application/json"},
                timeout=30,
            )
        except httpx.HTTPError as error:
            self.faults.append(f"POST: {error!r}")
            return
        if answer.status_code == 202:
            self.accepted.append(answer.json()["position"])
        else:
            self.faults.append(f"POST {answer.status_code}: {answer.text}")

    async def read(self) -> None:
        """Read items and orders until told to stop; every read must succeed."""
        async with httpx.AsyncClient(
            base_url=self.service.base_url, headers=bearer(self.key), timeout=30
        ) as http:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                order_id = self.orders[n % len(self.orders)]
                path = (
                    f"/v1/orders/{order_id}/items/U2"
                    if n % 2
                    else f"/v1/orders/{order_id}"
                )
                try:
                    answer = await http.get(path)
                except httpx.HTTPError as error:
                    self.faults.append(f"GET {path}: {error!r}")
                    continue
                self.reads += 1
                if answer.status_code != 200:
                    self.faults.append(f"GET {path} {answer.status_code}")


@contextlib.asynccontextmanager
async def traffic(
    own: OwnDatabase, service: Service, orders: list[str], token: str
) -> AsyncIterator[Traffic]:
    async with own.pool.acquire() as connection:
        key = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.READER, label="rebuild"
        )
    load = Traffic(service, token, key.secret, orders)
    # Credentials reach the running service through a notification.
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        await until(
            lambda: _accepted(http, key.secret), "the service accepting the key"
        )
    tasks = [asyncio.create_task(load.write()), asyncio.create_task(load.read())]
    try:
        yield load
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)


async def _accepted(http: httpx.AsyncClient, key: str) -> bool:
    answer = await http.get("/v1/items", headers=bearer(key))
    return answer.status_code == 200


@pytest.mark.slow
async def test_a_rebuild_swaps_in_a_new_version_while_webhooks_and_reads_go_on(
    own: OwnDatabase,
) -> None:
    orders = [new_order_id() for _ in range(30)]
    served = ServedProjection(STORE, Vocabulary.default())
    for start in range(0, 600, 60):
        await append_inline(own.pool, served, spread(orders, 60, start=start))
    token = secrets.token_urlsafe(24)
    # The reader polls as fast as it can with one key, on purpose.
    unlimited = {"ORDERTRAIL_KEY_RATE": "0", "ORDERTRAIL_WEBHOOK_TOKEN_LIVE": token}
    async with running_service(own.url, **unlimited) as service:
        async with traffic(own, service, orders, token) as load:
            swapped = await rebuild_between_deliveries(own, load)
        # Built from position 0: every event of the log is applied once, by
        # the build, by the swap, or by the service's runner after it.
        await until(
            lambda: _all_applied(own.pool, 2), "version 2 counting every event", 20
        )

    assert load.faults == []
    assert load.reads > 20
    assert swapped.version == 2
    assert swapped.state is ProjectionState.SERVING
    assert (await served_version(own.pool)).version == 2
    assert await view_source(own.pool) == "item_view_v2"
    assert (await version(own.pool, 1)).state is ProjectionState.RETIRED
    # Every item, including those written while the swap held appends back,
    # is exactly what a fold of its whole stream gives.
    assert await matches_fold(own.pool, 2) == []
    streams = await own.pool.fetchval(
        "SELECT count(DISTINCT (mode, order_id, upc)) FROM events"
    )
    assert await own.pool.fetchval("SELECT count(*) FROM item_view") == streams

    # The old version stays, whole, until an operator drops it.
    assert await table_exists(own.pool, "item_view_v1")
    dropped = await ordertrail(own.url, "projections", "drop-old", "items")
    assert dropped.returncode == 0, dropped.stderr
    assert "dropped item_view_v1" in dropped.stdout
    assert not await table_exists(own.pool, "item_view_v1")
    async with own.pool.acquire() as connection:
        left = await catalogue.versions(connection, PROJECTION_NAME)
    assert [(v.version, v.state) for v in left] == [(2, ProjectionState.SERVING)]
    assert await own.pool.fetchval("SELECT count(*) FROM item_view") == streams
    again = await ordertrail(own.url, "projections", "drop-old", "items")
    assert "no retired version to drop" in again.stdout


async def rebuild_between_deliveries(
    own: OwnDatabase, load: Traffic
) -> ProjectionVersion:
    """Build version 2 and swap it in while ``load`` keeps posting and reading."""
    await until(lambda: _some(load), "the first webhooks and reads")
    rebuilding = await connect(own.url)
    try:
        await rebuild.rebuild_lock(rebuilding)
        building = await rebuild.begin(rebuilding, Vocabulary.default())
        await rebuild.build(rebuilding, building, STORE, batch_size=50)
        await rebuild.prepare(rebuilding, building)
        # These commit to version 1 only: the swap must bring them over.
        late = len(load.accepted)
        await until(lambda: _grown(load, late + 5), "webhooks between build and swap")
        during = len(load.accepted)
        swapped = await rebuild.swap(rebuilding, building, STORE)
    finally:
        await rebuilding.close()
    # Deliveries after the swap go to the new version, inline.
    await until(lambda: _grown(load, during + 10), "webhooks after the swap")
    return swapped


async def _all_applied(pool: asyncpg.Pool, number: int) -> bool:
    return (await version(pool, number)).events_applied == await event_count(pool)


async def _some(load: Traffic) -> bool:
    return bool(load.accepted) and load.reads > 0


async def _grown(load: Traffic, count: int) -> bool:
    return len(load.accepted) >= count


# Interrupted rebuilds -------------------------------------------------------------


async def test_a_build_cancelled_midway_resumes_in_the_same_version(
    own: OwnDatabase,
) -> None:
    served = ServedProjection(STORE, Vocabulary.default())
    orders = [new_order_id() for _ in range(20)]
    for start in range(0, 400, 40):
        await append_inline(own.pool, served, spread(orders, 40, start=start))
    total = await event_count(own.pool)
    await settle(own.pool)

    interrupted = await connect(own.url)
    await rebuild.rebuild_lock(interrupted)
    record = await rebuild.begin(interrupted, Vocabulary.default())
    batches = 0

    def cancel_after_three(_batch: Batch) -> None:
        # Called once a batch has committed: the cancellation lands inside
        # the next one, with its transaction open.
        nonlocal batches
        batches += 1
        if batches == 3:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(
            rebuild.build(
                interrupted,
                record,
                STORE,
                batch_size=15,
                on_batch=cancel_after_three,
            )
        )
    interrupted.terminate()

    halfway = await version(own.pool, 2)
    assert halfway.state is ProjectionState.BUILDING
    assert 0 < halfway.events_applied < total
    assert (await served_version(own.pool)).version == 1

    async with own.pool.acquire() as connection:
        await rebuild.rebuild_lock(connection)
        resumed = await rebuild.begin(connection, Vocabulary.default())
        assert resumed.version == 2
        last = await rebuild.build(connection, resumed, STORE, batch_size=15)
        assert last.failure is None
        await rebuild.prepare(connection, resumed)
        # The same vocabulary over the same log: the inline path and the
        # rebuild agree on every item.
        difference = await rebuild.differences(connection, resumed)
        await rebuild.swap(connection, resumed, STORE)
        await connection.execute("SELECT pg_advisory_unlock_all()")

    assert (difference.differing, difference.compared) == (0, 40)
    built = await version(own.pool, 2)
    # Each event counted once: the second run went on from where the first
    # had committed, neither from the start nor past a lost batch.
    assert built.events_applied == total
    assert built.state is ProjectionState.SERVING
    assert await matches_fold(own.pool, 2) == []


@pytest.mark.slow
async def test_a_rebuild_killed_midway_resumes_from_its_own_progress(
    own: OwnDatabase,
) -> None:
    orders = [new_order_id() for _ in range(600)]
    for start in range(0, 12_000, 1200):
        await append_raw(own.pool, spread(orders, 1200, start=start))
    total = await event_count(own.pool)
    await settle(own.pool)

    process = await start_command(
        own.url, "projections", "rebuild", "items", "--batch-size", "20"
    )
    try:
        await until(
            lambda: _under_way(own.pool), "the rebuild's first batch", within=30
        )
    finally:
        kill_group(process.pid)
        await process.wait()
    assert process.returncode == -9

    halfway = await version(own.pool, 2)
    assert halfway.state is ProjectionState.BUILDING
    assert 0 < halfway.events_applied < total, "killed before or after the build"
    assert (await served_version(own.pool)).version == 1
    assert await view_source(own.pool) == "item_view_v1"

    finished = await ordertrail(
        own.url, "projections", "rebuild", "items", "--batch-size", "500"
    )

    assert finished.returncode == 0, finished.stderr
    assert "version 2" in finished.stderr
    built = await version(own.pool, 2)
    assert built.state is ProjectionState.SERVING
    assert built.events_applied == total
    assert await view_source(own.pool) == "item_view_v2"
    assert await matches_fold(own.pool, 2) == []


async def _under_way(pool: asyncpg.Pool) -> bool:
    applied = await pool.fetchval(
        "SELECT events_applied FROM projections WHERE name = 'items' AND version = 2"
    )
    return bool(applied)


# Dry runs ------------------------------------------------------------------------


TAUGHT = (
    Vocabulary.default().text
    + f'\n[[status]]\ntransition = "confirmed"\naliases = ["{ALIAS}"]\n'
)
"""The shipped vocabulary, plus one alias an operator learned."""


@pytest.fixture
def vocabulary_with_alias(tmp_path: Path) -> Path:
    """The operator's vocabulary file."""
    file = tmp_path / "statuses.toml"
    file.write_text(TAUGHT, encoding="utf-8")
    return file


async def test_a_dry_run_reports_what_would_change_and_swaps_nothing(
    own: OwnDatabase, vocabulary_with_alias: Path
) -> None:
    served = ServedProjection(STORE, Vocabulary.default())
    taught, untaught, plain = new_order_id(), new_order_id(), new_order_id()
    for order_id, status in (
        (taught, "ordered"),
        (taught, ALIAS),
        (untaught, ALIAS),
        (plain, "ordered"),
        (plain, "confirmed"),
    ):
        await append_inline(own.pool, served, [report(order_id, status)])
    await settle(own.pool)

    same = await ordertrail(own.url, "projections", "rebuild", "--dry-run")
    assert same.returncode == 0, same.stderr
    assert "0 of 3 items differ from the served version" in same.stderr

    changed = await ordertrail(
        own.url,
        "projections",
        "rebuild",
        "--dry-run",
        ORDERTRAIL_VOCABULARY_FILE=str(vocabulary_with_alias),
    )

    assert changed.returncode == 0, changed.stderr
    assert "2 of 3 items differ from the served version" in changed.stderr
    assert "dry run: not swapped" in changed.stderr
    # The sample names the items and shows the served and rebuilt values.
    sample = changed.stderr.split("served version", 1)[1]
    assert taught in sample
    assert untaught in sample
    assert plain not in sample
    assert '"rebuilt": "confirmed"' in sample
    assert (await served_version(own.pool)).version == 1
    assert await view_source(own.pool) == "item_view_v1"
    state = await own.pool.fetchval(
        "SELECT state FROM item_view WHERE order_id = $1", untaught
    )
    assert state == "new"
    async with own.pool.acquire() as connection:
        found = await catalogue.versions(connection, PROJECTION_NAME)
    # The build made with the other vocabulary was discarded, and its number
    # taken again by a build that records the vocabulary it uses.
    assert [(v.version, v.state) for v in found] == [
        (2, ProjectionState.BUILDING),
        (1, ProjectionState.SERVING),
    ]
    assert found[0].vocabulary == TAUGHT

    swapped = await ordertrail(
        own.url,
        "projections",
        "rebuild",
        ORDERTRAIL_VOCABULARY_FILE=str(vocabulary_with_alias),
    )
    assert swapped.returncode == 0, swapped.stderr
    assert (await served_version(own.pool)).version == 2
    state = await own.pool.fetchval(
        "SELECT state FROM item_view WHERE order_id = $1", untaught
    )
    assert state == "confirmed"


async def test_the_swap_waits_for_an_append_in_flight_and_brings_its_event_over(
    own: OwnDatabase,
) -> None:
    served = ServedProjection(STORE, Vocabulary.default())
    order_id = new_order_id()
    await append_inline(own.pool, served, [report(order_id, "ordered")])
    await settle(own.pool)
    async with own.pool.acquire() as connection:
        await rebuild.rebuild_lock(connection)
        building = await rebuild.begin(connection, Vocabulary.default())
        await rebuild.build(connection, building, STORE)
        await rebuild.prepare(connection, building)
        await connection.execute("SELECT pg_advisory_unlock_all()")

    # An append in flight: it entered the served version 1 and inserted its
    # event, and has not committed yet.
    slow = await connect(own.url)
    transaction = slow.transaction()
    await transaction.start()
    entered = await slow.fetchval("SELECT enter_projection('items')")
    await STORE.append(slow, [report(order_id, "confirmed")])
    swapping = asyncio.create_task(_swap(own, building))
    await asyncio.sleep(0.5)
    assert not swapping.done(), "the swap did not wait for the append in flight"

    # An append arriving now waits behind the swap.
    newer = asyncio.create_task(
        append_inline(own.pool, served, [report(order_id, "picked up")])
    )
    await asyncio.sleep(0.5)
    assert not newer.done(), "an append went ahead of a waiting swap"
    await transaction.commit()
    await slow.close()
    await asyncio.wait_for(swapping, 10)
    await asyncio.wait_for(newer, 10)

    assert entered == 1
    assert (await served_version(own.pool)).version == 2
    item = await own.pool.fetchrow(
        "SELECT state, version FROM item_view WHERE order_id = $1", order_id
    )
    assert item is not None
    # The event in flight came over with the swap; the held one went to
    # version 2 inline.
    assert (item["state"], item["version"]) == ("completed", 3)
    assert await matches_fold(own.pool, 2) == []


async def _swap(own: OwnDatabase, building: ProjectionVersion) -> None:
    async with own.pool.acquire() as connection:
        await rebuild.swap(connection, building, STORE)
