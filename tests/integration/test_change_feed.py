"""``GET /v1/changes``: commit order, cursors, long polling, and no missed change.

A poller that keeps passing ``next`` back must end up with every item's final
state, however the writers' transactions interleave and however late one of
them commits. The concurrency tests run the service in its own process and
write both through it and straight into the database beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.cursors import decode_cursor, encode_cursor
from ordertrail.api.services import Services
from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.notifications import PositionSignal
from ordertrail.eventstore.store import EventStore
from ordertrail.ingest.writer import append_and_project
from ordertrail.projections.feed import FeedHead
from ordertrail.projections.served import ServedProjection
from tests.integration.api_support import problem
from tests.integration.helpers import TOKEN_HEADER, post_webhook
from tests.support import (
    WEBHOOK_PATH,
    bearer,
    concurrently,
    delivery,
    new_order_id,
    webhook_body,
)

ItemKey = tuple[str, str]
"""(order_id, upc)"""


async def read_changes(
    http: httpx.AsyncClient, key: str, **params: Any
) -> dict[str, Any]:
    """One page of the change feed; fails the test on anything but 200."""
    response = await http.get("/v1/changes", params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
    page = response.json()
    assert isinstance(page, dict)
    return page


async def feed_end(http: httpx.AsyncClient, key: str, mode: str = "live") -> str:
    """The cursor after every change committed so far in ``mode``."""
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"mode": mode, "limit": 1000}
        if cursor is not None:
            params["after"] = cursor
        page = await read_changes(http, key, **params)
        cursor = page["next"]
        if not page["more"]:
            return cursor


def mine(page: dict[str, Any], order_id: str) -> list[tuple[str, int, str]]:
    """(upc, version, state) of ``order_id``'s items on a page, in page order."""
    return [
        (change["upc"], change["version"], change["state"])
        for change in page["changes"]
        if change["order_id"] == order_id
    ]


async def deliver(
    client: AsyncTestClient[Litestar], token: str, order_id: str, upc: str, status: str
) -> None:
    response = await post_webhook(
        client, webhook_body(order_id, upc=upc, status=status), token
    )
    assert response.status_code == 202, response.text


# Pages -------------------------------------------------------------------------


async def test_a_page_lists_each_changed_item_once_in_commit_order(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    cursor = await feed_end(client, reader_key)
    for upc, status in [
        ("a", "ordered"),
        ("b", "ordered"),
        ("a", "confirmed"),
        ("c", "ordered"),
        ("b", "confirmed"),
    ]:
        await deliver(client, live_token, order_id, upc, status)

    page = await read_changes(client, reader_key, after=cursor)

    # Each item appears where its latest change committed, with that state.
    assert mine(page, order_id) == [
        ("a", 2, "confirmed"),
        ("c", 1, "ordered"),
        ("b", 2, "confirmed"),
    ]
    assert page["mode"] == "live"
    assert page["more"] is False


async def test_next_continues_and_more_says_the_page_was_full(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    cursor = await feed_end(client, reader_key)
    upcs = [f"item-{index}" for index in range(5)]
    for upc in upcs:
        await deliver(client, live_token, order_id, upc, "ordered")

    pages = []
    for _ in range(4):
        page = await read_changes(client, reader_key, after=cursor, limit=2)
        pages.append(page)
        cursor = page["next"]

    assert [len(page["changes"]) for page in pages] == [2, 2, 1, 0]
    assert [page["more"] for page in pages] == [True, True, False, False]
    assert [upc for page in pages for upc, _, _ in mine(page, order_id)] == upcs
    # An empty page hands the same place back: nothing was passed over.
    assert pages[3]["next"] == pages[2]["next"]


async def test_a_full_last_page_says_more_and_the_next_one_is_empty(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    cursor = await feed_end(client, reader_key)
    for upc in ("one", "two"):
        await deliver(client, live_token, order_id, upc, "ordered")

    full = await read_changes(client, reader_key, after=cursor, limit=2)
    after = await read_changes(client, reader_key, after=full["next"], limit=2)

    assert (len(full["changes"]), full["more"]) == (2, True)
    assert (after["changes"], after["more"], after["next"]) == ([], False, full["next"])


async def test_modes_have_separate_feeds(
    client: AsyncTestClient[Litestar],
    live_token: str,
    test_token: str,
    reader_key: str,
    order_id: str,
) -> None:
    live_cursor = await feed_end(client, reader_key, "live")
    test_cursor = await feed_end(client, reader_key, "test")
    await deliver(client, live_token, order_id, "in-live", "ordered")
    await deliver(client, test_token, order_id, "in-test", "confirmed")

    live = await read_changes(client, reader_key, after=live_cursor)
    test = await read_changes(client, reader_key, mode="test", after=test_cursor)

    assert mine(live, order_id) == [("in-live", 1, "ordered")]
    assert mine(test, order_id) == [("in-test", 1, "confirmed")]
    assert {change["mode"] for change in test["changes"]} == {"test"}
    assert (live["mode"], test["mode"]) == ("live", "test")


# Refused parameters ------------------------------------------------------------


async def _items_cursor(
    client: AsyncTestClient[Litestar], token: str, key: str, order_id: str
) -> str:
    for upc in ("first", "second"):
        await deliver(client, token, order_id, upc, "ordered")
    response = await client.get(
        "/v1/items", params={"order_id": order_id, "limit": 1}, headers=bearer(key)
    )
    cursor = response.json()["next"]
    assert isinstance(cursor, str)
    return cursor


@pytest.mark.parametrize(
    ("params", "parameter", "kind"),
    [
        ({"after": "not a cursor"}, "after", "invalid-cursor"),
        ({"after": "bm90IGpzb24"}, "after", "invalid-cursor"),
        ({"after": encode_cursor("changes", 1)}, "after", "invalid-cursor"),
        ({"after": encode_cursor("changes", "1", 1)}, "after", "invalid-cursor"),
        ({"after": encode_cursor("changes", True, 1)}, "after", "invalid-cursor"),
        ({"limit": 0}, "limit", "invalid-parameter"),
        ({"limit": 1001}, "limit", "invalid-parameter"),
        ({"limit": "many"}, "limit", "invalid-parameter"),
        ({"wait": 31}, "wait", "invalid-parameter"),
        ({"wait": -1}, "wait", "invalid-parameter"),
        ({"mode": "sandbox"}, "mode", "invalid-parameter"),
    ],
    ids=[
        "garbage",
        "not-json",
        "short",
        "text-xid",
        "bool-xid",
        "limit-0",
        "limit-1001",
        "limit-text",
        "wait-31",
        "wait-negative",
        "mode",
    ],
)
async def test_a_bad_parameter_is_a_problem_naming_it(
    client: AsyncTestClient[Litestar],
    reader_key: str,
    params: dict[str, Any],
    parameter: str,
    kind: str,
) -> None:
    response = await client.get(
        "/v1/changes", params=params, headers=bearer(reader_key)
    )

    document = problem(response, 400)
    assert document["parameter"] == parameter
    assert document["type"] == f"urn:ordertrail:problem:{kind}"


async def test_a_cursor_of_the_item_listing_is_refused(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    cursor = await _items_cursor(client, live_token, reader_key, order_id)

    response = await client.get(
        "/v1/changes", params={"after": cursor}, headers=bearer(reader_key)
    )

    document = problem(response, 400)
    assert document["parameter"] == "after"
    assert document["type"] == "urn:ordertrail:problem:invalid-cursor"


# Long polling through the session's app ---------------------------------------


async def test_a_long_poll_returns_as_soon_as_a_webhook_commits(
    client: AsyncTestClient[Litestar], live_token: str, reader_key: str, order_id: str
) -> None:
    cursor = await feed_end(client, reader_key)

    async def later(http: httpx.AsyncClient) -> httpx.Response:
        # Long enough for the poll to be parked before the commit.
        await asyncio.sleep(0.3)
        return await http.post(
            WEBHOOK_PATH,
            content=webhook_body(order_id),
            headers={TOKEN_HEADER: live_token},
        )

    started = time.monotonic()
    poll, posted = await concurrently(
        client,
        lambda http: [
            http.get(
                "/v1/changes",
                params={"after": cursor, "wait": 10},
                headers=bearer(reader_key),
            ),
            later(http),
        ],
    )
    elapsed = time.monotonic() - started

    assert posted.status_code == 202
    assert poll.status_code == 200
    assert [upc for upc, _, _ in mine(poll.json(), order_id)] == [posted.json()["upc"]]
    assert elapsed < 3.0, "the poll was not woken by the commit"


async def test_a_long_poll_with_nothing_new_returns_empty_with_the_same_cursor(
    client: AsyncTestClient[Litestar], reader_key: str
) -> None:
    cursor = await feed_end(client, reader_key)

    started = time.monotonic()
    page = await read_changes(client, reader_key, after=cursor, wait=1)
    elapsed = time.monotonic() - started

    assert page == {"mode": "live", "changes": [], "next": cursor, "more": False}
    assert elapsed >= 0.95, "the poll did not wait"


@pytest.mark.slow
async def test_a_commit_in_the_other_mode_does_not_end_a_long_poll(
    client: AsyncTestClient[Litestar], test_token: str, reader_key: str, order_id: str
) -> None:
    cursor = await feed_end(client, reader_key, "live")

    async def later(http: httpx.AsyncClient) -> httpx.Response:
        await asyncio.sleep(0.2)
        return await http.post(
            WEBHOOK_PATH,
            content=webhook_body(order_id),
            headers={TOKEN_HEADER: test_token},
        )

    started = time.monotonic()
    poll, posted = await concurrently(
        client,
        lambda http: [
            http.get(
                "/v1/changes",
                params={"after": cursor, "wait": 1.5},
                headers=bearer(reader_key),
            ),
            later(http),
        ],
    )
    elapsed = time.monotonic() - started

    assert posted.status_code == 202
    assert poll.json()["changes"] == []
    assert elapsed >= 1.45


class CountingPool:
    """Stands in for the app's pool and counts the connections taken from it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.acquired = 0

    def acquire(self) -> Any:
        self.acquired += 1
        return self._pool.acquire()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def test_commits_with_nobody_waiting_cost_the_feed_head_no_query(
    pool: asyncpg.Pool,
) -> None:
    # Under a stream of webhooks and no long poll, the head is only marked
    # stale; the first waiter reads it, once, for everyone.
    counting = CountingPool(pool)
    appended = PositionSignal()
    head = FeedHead(counting, appended)  # type: ignore[arg-type]
    await head.start()
    try:
        known, started = head.head("live"), counting.acquired
        async with pool.acquire() as connection:
            events = await append_and_project(
                connection,
                _STORE,
                ServedProjection(_STORE, Vocabulary.load(None)),
                [delivery(new_order_id(), status="ordered")],
            )
        for _ in range(50):
            appended.notice(str(events[-1].position))
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert counting.acquired == started
        assert head.head("live") == known

        waiters = [head.wait_past("live", known, 5) for _ in range(5)]
        assert await asyncio.gather(*waiters) == [True] * 5
        assert counting.acquired == started + 1
        assert head.head("live") > known
    finally:
        await head.stop()


async def test_a_late_waiter_still_sees_a_commit_the_horizon_held_back(
    pool: asyncpg.Pool,
) -> None:
    # Nobody waited when the commit was announced, and an older transaction
    # held it below the horizon. The first waiter looks as the follower
    # would have: again and again, until the commit settles.
    appended = PositionSignal()
    head = FeedHead(pool, appended)
    await head.start()
    try:
        known = head.head("live")
        async with pool.acquire() as holding, holding.transaction():
            await holding.fetchval("SELECT pg_current_xact_id()")
            async with pool.acquire() as connection:
                events = await append_and_project(
                    connection,
                    _STORE,
                    ServedProjection(_STORE, Vocabulary.load(None)),
                    [delivery(new_order_id(), status="ordered")],
                )
            appended.notice(str(events[-1].position))
            await asyncio.sleep(0.05)
            waiting = asyncio.create_task(head.wait_past("live", known, 5))
            await asyncio.sleep(0.1)
            assert not waiting.done()
        started = time.monotonic()

        assert await waiting
        assert time.monotonic() - started < 2
    finally:
        await head.stop()


@pytest.mark.slow
async def test_a_waiting_poller_does_not_query_in_a_loop_while_the_horizon_lags(
    *,
    client: AsyncTestClient[Litestar],
    services: Services,
    pool: asyncpg.Pool,
    live_token: str,
    reader_key: str,
    order_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The feed's head is where the newest visible row was. When that row is
    # changed again while an older transaction is still open, the row leaves
    # the visible range but the head stays: a poller behind the head must
    # still wait quietly, not query again and again until its wait is over.
    cursor = await feed_end(client, reader_key)
    await deliver(client, live_token, order_id, "moving", "ordered")
    await _until_head_passes(client, reader_key, services, cursor)
    async with pool.acquire() as connection, connection.transaction():
        await connection.fetchval("SELECT pg_current_xact_id()")
        await deliver(client, live_token, order_id, "moving", "confirmed")
        counting = CountingPool(services.pool)
        monkeypatch.setattr(services, "pool", counting)

        page = await read_changes(client, reader_key, after=cursor, wait=1)

    assert mine(page, order_id) == []
    assert counting.acquired <= 10, f"{counting.acquired} queries for one poll"


async def _until_head_passes(
    client: AsyncTestClient[Litestar], key: str, services: Services, cursor: str
) -> None:
    place = decode_cursor(cursor, "changes", (int, int), parameter="after")
    # Nobody waiting, the head is left stale; a poller waiting past the end
    # of the feed reads it.
    end = await feed_end(client, key)
    await read_changes(client, key, after=end, wait=0.5)
    assert services.feed.head("live") > place, "the feed head never moved"


# The service in its own process ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Served:
    """The service running in a process of its own."""

    base_url: str
    key: str
    token: str


@pytest.fixture(scope="module")
async def served(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Served]:
    async with pool.acquire() as connection:
        key = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.READER, label="feed"
        )
        token = await create_credential(
            connection, CredentialKind.WEBHOOK_TOKEN, mode="live", label="feed"
        )
    port = _free_port()
    environment = {
        **os.environ,
        "ORDERTRAIL_DATABASE_URL": database_url,
        "ORDERTRAIL_PORT": str(port),
        "ORDERTRAIL_LOG_LEVEL": "warning",
        # Hundreds of requests from one key and one address on purpose.
        "ORDERTRAIL_KEY_RATE": "0",
        "ORDERTRAIL_FAILURE_RATE": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordertrail",
        "serve",
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        await _until_ready(base_url)
        yield Served(base_url, key.secret, token.secret)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=15)


async def _until_ready(base_url: str) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=base_url) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/health/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    pytest.fail("the service did not become ready")


@dataclass
class Poller:
    """Follows the change feed with long polls, checking every page it gets."""

    http: httpx.AsyncClient
    key: str
    cursor: str
    orders: set[str]
    limit: int = 7
    seen: dict[ItemKey, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    pages: int = 0
    changes: int = 0
    """Changes of the followed orders read, an item's repeats included."""

    async def follow(self, stop: asyncio.Event) -> None:
        """Read page after page until ``stop`` is set."""
        while not stop.is_set():
            page = await read_changes(
                self.http, self.key, after=self.cursor, wait=1, limit=self.limit
            )
            self.pages += 1
            self._check(page)
            self.cursor = page["next"]

    def _check(self, page: dict[str, Any]) -> None:
        on_page = [(c["order_id"], c["upc"]) for c in page["changes"]]
        if len(set(on_page)) != len(on_page):
            self.faults.append(f"page {self.pages} lists an item twice: {on_page}")
        for change in page["changes"]:
            if change["order_id"] not in self.orders:
                continue
            item = (change["order_id"], change["upc"])
            version = change["version"]
            self.changes += 1
            if version < self.seen.get(item, 0):
                self.faults.append(
                    f"page {self.pages}: {item} at version {version} "
                    f"after version {self.seen[item]}"
                )
            self.seen[item] = max(version, self.seen.get(item, 0))

    async def until_seen(self, versions: dict[ItemKey, int], within: float) -> None:
        """Wait until every item was seen at its version (or a fault is logged)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(self.seen.get(item, 0) >= v for item, v in versions.items()):
                return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def following(
    served: Served, orders: Sequence[str], *, limit: int = 7
) -> AsyncIterator[Poller]:
    """A poller following the served feed from its current end."""
    async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
        start = await feed_end(http, served.key)
        poller = Poller(http, served.key, start, set(orders), limit)
        stop = asyncio.Event()
        task = asyncio.create_task(poller.follow(stop))
        try:
            yield poller
        finally:
            stop.set()
            await task


async def final_versions(
    pool: asyncpg.Pool, orders: Sequence[str]
) -> dict[ItemKey, int]:
    """Every item's version as its row holds it now: what a poller must reach."""
    rows = await pool.fetch(
        "SELECT order_id, upc, version FROM item_view "
        "WHERE mode = 'live' AND order_id = ANY($1::text[])",
        list(orders),
    )
    return {(row["order_id"], row["upc"]): row["version"] for row in rows}


_STORE = EventStore()


@pytest.fixture(scope="module")
def projection() -> ServedProjection:
    """The projection the served service runs, for appending beside it."""
    return ServedProjection(_STORE, Vocabulary.load(None))


async def append_directly(
    connection: asyncpg.Connection,
    projection: ServedProjection,
    items: Sequence[ItemKey],
    status: str,
) -> None:
    """Append one delivery per item through the writer's own transaction step."""
    await append_and_project(
        connection,
        _STORE,
        projection,
        [delivery(order_id, upc=upc, status=status) for order_id, upc in items],
    )


_STATUSES = ("ordered", "confirmed", "message", "ready for pickup", "note", "shipped")


@pytest.mark.slow
async def test_a_poller_misses_no_change_while_webhooks_commit_concurrently(
    served: Served, pool: asyncpg.Pool
) -> None:
    orders = [new_order_id() for _ in range(5)]
    items = [(order, f"{upc:012d}") for order in orders for upc in range(10)]
    chooser = random.Random(20240611)
    plan = [[chooser.choice(items) for _ in range(50)] for _ in range(4)]

    async def writer(http: httpx.AsyncClient, deliveries: list[ItemKey]) -> None:
        for sent, (order_id, upc) in enumerate(deliveries):
            body = webhook_body(
                order_id, upc=upc, status=chooser.choice(_STATUSES), sent=sent
            )
            response = await http.post(
                WEBHOOK_PATH, content=body, headers={TOKEN_HEADER: served.token}
            )
            assert response.status_code == 202, response.text

    async with following(served, orders) as poller:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=30) as http:
            await asyncio.gather(*(writer(http, part) for part in plan))
        final = await final_versions(pool, orders)
        await poller.until_seen(final, within=15)

    assert len(final) == len({item for part in plan for item in part})
    assert sum(final.values()) == 200
    assert poller.faults == []
    assert poller.seen == final
    # The poller followed the writes rather than reading their end state in
    # one sweep: it saw some item before that item's last change. (How many
    # pages it took depends on how far it lagged, which the machine decides.)
    assert poller.changes > len(final)


@pytest.mark.slow
async def test_a_poller_misses_no_change_while_transactions_commit_out_of_order(
    served: Served, pool: asyncpg.Pool, projection: ServedProjection
) -> None:
    orders = [new_order_id() for _ in range(3)]
    items = [(order, f"{upc:012d}") for order in orders for upc in range(8)]
    chooser = random.Random(7)

    async def writer(rounds: int) -> None:
        # Each transaction takes its id early, then waits a random while
        # before appending and again before committing: ids, positions and
        # commits all come in different orders across the four writers.
        async with pool.acquire() as connection:
            for _ in range(rounds):
                batch = chooser.sample(items, chooser.randint(1, 3))
                async with connection.transaction():
                    await connection.fetchval("SELECT pg_current_xact_id()")
                    await asyncio.sleep(chooser.uniform(0, 0.02))
                    await append_directly(
                        connection, projection, batch, chooser.choice(_STATUSES)
                    )
                    await asyncio.sleep(chooser.uniform(0, 0.02))

    async with following(served, orders, limit=5) as poller:
        await asyncio.gather(*(writer(30) for _ in range(4)))
        final = await final_versions(pool, orders)
        await poller.until_seen(final, within=15)

    assert final, "nothing was appended"
    assert poller.faults == []
    assert poller.seen == final


@pytest.mark.slow
async def test_a_change_that_commits_late_still_reaches_the_poller(
    served: Served, pool: asyncpg.Pool, projection: ServedProjection
) -> None:
    order_id = new_order_id()
    early, held_item = (order_id, "early"), (order_id, "held")
    later = [(order_id, f"later-{index}") for index in range(4)]

    async with (
        following(served, [order_id]) as poller,
        pool.acquire() as early_connection,
        pool.acquire() as held_connection,
        httpx.AsyncClient(base_url=served.base_url, timeout=30) as http,
    ):
        # Both transactions take their ids now, the held one after the early
        # one: the early one may be read once it commits, the held one holds
        # back everything that commits after it took its id.
        early_transaction = early_connection.transaction()
        held_transaction = held_connection.transaction()
        await early_transaction.start()
        await early_connection.fetchval("SELECT pg_current_xact_id()")
        await held_transaction.start()
        await held_connection.fetchval("SELECT pg_current_xact_id()")
        try:
            await append_directly(early_connection, projection, [early], "ordered")
            await early_transaction.commit()
            await poller.until_seen({early: 1}, within=5)

            for upc in ("later-0", "later-1"):
                await _post(http, served, order_id, upc)
            await append_directly(held_connection, projection, [held_item], "ordered")
            for upc in ("later-2", "later-3"):
                await _post(http, served, order_id, upc)
            await asyncio.sleep(0.5)
            seen_while_held = dict(poller.seen)
        finally:
            await held_transaction.commit()
        await poller.until_seen({held_item: 1, **dict.fromkeys(later, 1)}, within=5)

    assert poller.faults == []
    # The poller moved on past the early change while the held one was open.
    assert seen_while_held.get(early) == 1
    assert held_item not in seen_while_held
    assert poller.seen == {early: 1, held_item: 1, **dict.fromkeys(later, 1)}


@pytest.mark.slow
async def test_deliveries_are_acknowledged_while_an_append_transaction_is_held(
    served: Served, pool: asyncpg.Pool, projection: ServedProjection
) -> None:
    # One append transaction that stalls before its commit (a paused process,
    # a connection whose client died) must not hold up every other delivery:
    # Locally gives up on a delivery about a minute after the first attempt.
    order_id = new_order_id()
    held_item = (order_id, "held")
    later = [(order_id, f"later-{index}") for index in range(3)]

    async with (
        following(served, [order_id]) as poller,
        pool.acquire() as held_connection,
        httpx.AsyncClient(base_url=served.base_url, timeout=60) as http,
    ):
        held_transaction = held_connection.transaction()
        await held_transaction.start()
        try:
            await append_directly(held_connection, projection, [held_item], "ordered")
            posts = [
                asyncio.create_task(_post(http, served, order_id, upc))
                for _, upc in later
            ]
            _, pending = await asyncio.wait(posts, timeout=5)
            acknowledged_while_held = len(posts) - len(pending)
        finally:
            await held_transaction.commit()
        await asyncio.gather(*posts)
        await poller.until_seen({held_item: 1, **dict.fromkeys(later, 1)}, within=5)

    assert poller.faults == []
    assert poller.seen == {held_item: 1, **dict.fromkeys(later, 1)}
    assert acknowledged_while_held == len(later), (
        f"{len(later) - acknowledged_while_held} of {len(later)} deliveries waited "
        "for another transaction's commit"
    )


async def _post(
    http: httpx.AsyncClient, served: Served, order_id: str, upc: str
) -> None:
    response = await http.post(
        WEBHOOK_PATH,
        content=webhook_body(order_id, upc=upc),
        headers={TOKEN_HEADER: served.token},
    )
    assert response.status_code == 202, response.text
