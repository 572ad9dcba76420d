"""A fixed-time mixed load on a real service, then an exact account of it.

``ordertrail serve`` runs with two granian workers on a database of the
test's own. For a fixed time, posters send cart items through their statuses
(pickups, refunds, partial refunds, messages, ship-to-store and same-day
delivery steps, surprises), some sent twice as Locally's retries are, some
with idempotency keys; beside them, pollers revalidate items by ETag,
followers long-poll the change feed by its cursors, and walkers page through
the item listing. Then the load stops, the projection settles, and every
answer is held against the log:

- every 202 is one event, with the stream, version, body and key it was
  answered for, and no event went unanswered;
- each retry is flagged as the redelivery of the delivery it repeats;
- the item view equals a fresh fold of the whole log, stream by stream;
- every view any reader saw was true at its version, and no read went back
  behind an earlier one or behind the reader's own 202;
- an ETag names one state, and a poller's last ETag is still current
  exactly when it came with the item's final version;
- each follower's newest state of each item is the final view, for every
  item of its mode, and a full walk of the listing is the view;
- nothing answered 5xx, and every hash chain verifies.

The counts (requests by kind, answers by status, events) are printed, also
when the test passes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from ordertrail.api.items import ChangePage, ItemPage
from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from ordertrail.eventstore.records import Cursor, RecordedEvent, StreamKey
from ordertrail.ingest.controller import Accepted
from ordertrail.projections.items import ItemProjection, ItemView
from tests.integration.helpers import TOKEN_HEADER
from tests.integration.projection_support import (
    OwnDatabase,
    Service,
    assert_verified,
    differing,
    end_state,
    environment,
    free_port,
    ordertrail,
    served_version,
    settle,
    until,
    whole_log,
)
from tests.support import WEBHOOK_PATH, bearer, new_order_id, stream_chain_errors

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LOAD_SECONDS = 20.0
WORKERS = 2
POSTERS = 24
ITEM_POLLERS = 6
LIVE_FOLLOWERS = 3
TEST_FOLLOWERS = 1
LISTING_WALKERS = 2
OPEN_ITEMS = 300
"""Items in progress at any moment; a finished item makes room for a new one."""
LONG_POLL = 2.0
"""Seconds a follower lets the feed hold its request while nothing changed."""
REQUEST_TIMEOUT = 20.0
SEED = 20_250_301

# The traffic ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """The statuses Locally sends for one kind of cart item, in order."""

    name: str
    statuses: tuple[str, ...]
    ends_in: str
    """The item's lifecycle state once every status is in."""


# No status string repeats within a scenario: a repeated body for the same
# item inside the redelivery window is a redelivery, and only the retries
# below are meant to be.
SCENARIOS = (
    Scenario(
        "pickup",
        ("ordered", "confirmed", "ready for pickup", "message", "picked up"),
        "completed",
    ),
    Scenario("refund", ("ordered", "in stock", "refunded"), "refunded"),
    Scenario(
        "partial refunds",
        (
            "ordered",
            "confirmed",
            "partial refund",
            "shopper message",
            "partially refunded",
            "completed",
        ),
        "completed",
    ),
    Scenario(
        "ship to store",
        ("ordered", "ship to store", "sts shipped", "arrived at store", "picked up"),
        "completed",
    ),
    Scenario(
        "same-day delivery",
        (
            "placed",
            "same day delivery",
            "out for delivery",
            "same day delivery delivered",
        ),
        "completed",
    ),
    Scenario("cancelled", ("ordered", "out of stock"), "cancelled"),
    Scenario(
        "surprises",
        ("ordered", "Backordered", "confirmed", "refunded", "Confirmed"),
        "refunded",
    ),
    Scenario("late report", ("confirmed", "ordered"), "confirmed"),
)


@dataclass
class PlannedItem:
    """A cart item the posters move through its scenario."""

    stream: StreamKey
    scenario: Scenario
    sent: int = 0
    """How many of the scenario's statuses have been posted."""

    @property
    def finished(self) -> bool:
        return self.sent == len(self.scenario.statuses)


class Carts:
    """Hands each poster an item to move on; never one item to two posters.

    An item is out of the queue while a poster holds it, so its statuses
    arrive in order (as Locally sends them) while different items interleave.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._queue: collections.deque[PlannedItem] = collections.deque()
        self.items: list[PlannedItem] = []
        while len(self._queue) < OPEN_ITEMS:
            self._open_order()

    def take(self) -> PlannedItem:
        """Return the item whose turn it is."""
        if not self._queue:
            self._open_order()
        return self._queue.popleft()

    def give_back(self, item: PlannedItem) -> None:
        """Queue the item's next status, or a new order in its place."""
        if item.finished:
            self._open_order()
        else:
            self._queue.append(item)

    def _open_order(self) -> None:
        # One cart in eight comes through the test connectivity.
        mode = "test" if self._rng.random() < 0.125 else "live"
        order_id = new_order_id()
        upcs = self._rng.sample(range(10**11, 10**12), self._rng.randint(1, 3))
        for upc in upcs:
            item = PlannedItem(
                StreamKey(mode, order_id, str(upc)), self._rng.choice(SCENARIOS)
            )
            self.items.append(item)
            self._queue.append(item)


# What the clients saw ------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    """A delivery the service answered 202 for, and what it was."""

    stream: StreamKey
    body: bytes
    idempotency_key: str | None
    answer: Accepted


@dataclass
class Ledger:
    """Everything the clients sent and were answered, shared by all actors."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    answers: collections.Counter[tuple[str, int]] = field(
        default_factory=collections.Counter
    )
    faults: list[str] = field(default_factory=list)
    deliveries: list[list[Acceptance]] = field(default_factory=list)
    """One group per status sent: the delivery and its retries, if any."""
    accepted_streams: list[StreamKey] = field(default_factory=list)
    """Streams with at least one 202, in the order they got their first."""
    views: list[tuple[str, ItemView]] = field(default_factory=list)
    """Every item view a reader was served, with who read it."""
    tags: list[tuple[StreamKey, str, ItemView]] = field(default_factory=list)
    """Every item ETag served with a view, and that view."""

    async def send(
        self, kind: str, request: Awaitable[httpx.Response]
    ) -> httpx.Response | None:
        """Count a request and its answer; a failed exchange is a fault."""
        self.requests[kind] += 1
        try:
            response = await request
        except httpx.HTTPError as error:
            self.faults.append(f"{kind}: {type(error).__name__}: {error}")
            return None
        self.answers[kind, response.status_code] += 1
        return response

    def unexpected(self, kind: str, response: httpx.Response) -> None:
        """Record an answer that no request of the load should get."""
        self.faults.append(f"{kind}: {response.status_code} {response.text[:200]}")

    def saw(self, reader: str, view: ItemView) -> None:
        self.views.append((reader, view))


# The actors ----------------------------------------------------------------------


@dataclass
class Load:
    """What every actor shares: the service, its secrets, the ledger, the end."""

    base_url: str
    tokens: dict[str, str]
    """The webhook token of each mode."""
    reader_key: str
    ledger: Ledger
    deadline: float = 0.0

    @property
    def running(self) -> bool:
        """Whether actors should still start new requests."""
        return time.monotonic() < self.deadline

    def client(self) -> httpx.AsyncClient:
        """A client of its own: one keep-alive connection, as one system has."""
        return httpx.AsyncClient(base_url=self.base_url, timeout=REQUEST_TIMEOUT)

    async def read(
        self,
        http: httpx.AsyncClient,
        kind: str,
        path: str,
        params: dict[str, str | int | float],
        tag: str | None = None,
    ) -> httpx.Response | None:
        """GET with the reader key (and ``If-None-Match``), counted as ``kind``."""
        headers = bearer(self.reader_key)
        if tag is not None:
            headers["if-none-match"] = tag
        return await self.ledger.send(
            kind, http.get(path, params=params, headers=headers)
        )


async def post_statuses(load: Load, carts: Carts, rng: random.Random) -> None:
    """Post the next status of one item after another until the deadline."""
    async with load.client() as http:
        while load.running:
            item = carts.take()
            group = await _post_status(http, load, item, rng)
            item.sent += 1
            carts.give_back(item)
            if group and rng.random() < 0.2:
                await _read_own_write(http, load, item.stream, group)


async def _post_status(
    http: httpx.AsyncClient, load: Load, item: PlannedItem, rng: random.Random
) -> list[Acceptance]:
    stream = item.stream
    body = msgspec.json.encode(
        {
            "upc": stream.upc,
            "order_id": stream.order_id,
            "status": item.scenario.statuses[item.sent],
            "order_url": f"https://www.locally.com/api/v2/cart/{stream.order_id}",
        }
    )
    headers = {
        TOKEN_HEADER: load.tokens[stream.mode],
        "content-type": "application/json",
    }
    key = None
    chance = rng.random()
    if chance < 0.25:
        key = secrets.token_hex(8)
        headers["idempotency-key"] = key
    elif chance < 0.4:
        key = secrets.token_hex(8)
        headers["webhook-id"] = key

    def post(kind: str) -> Awaitable[httpx.Response | None]:
        sent = http.post(WEBHOOK_PATH, content=body, headers=headers)
        return load.ledger.send(kind, sent)

    # A retry either follows the answer (Locally saw it too late) or races
    # the original (Locally gave up on a slow one and sent it again).
    retry = rng.random()
    if retry < 0.08:
        responses = list(await asyncio.gather(post("webhook"), post("webhook retry")))
    elif retry < 0.2:
        responses = [await post("webhook"), await post("webhook retry")]
    else:
        responses = [await post("webhook")]

    group = []
    for response in responses:
        if response is None:
            continue
        if response.status_code != 202:
            load.ledger.unexpected("webhook", response)
            continue
        answer = msgspec.json.decode(response.content, type=Accepted)
        group.append(Acceptance(stream, body, key, answer))
    if group:
        if item.sent == 0:
            load.ledger.accepted_streams.append(stream)
        load.ledger.deliveries.append(group)
    return group


async def _read_own_write(
    http: httpx.AsyncClient, load: Load, stream: StreamKey, group: list[Acceptance]
) -> None:
    # A 202 goes out after the commit that also updated the view, so a read
    # sent after it must show at least that version.
    written = max(acceptance.answer.version for acceptance in group)
    kind = "item GET after 202"
    response = await load.read(http, kind, _item_path(stream), {"mode": stream.mode})
    if response is None:
        return
    if response.status_code != 200:
        load.ledger.unexpected(kind, response)
        return
    view = msgspec.json.decode(response.content, type=ItemView)
    load.ledger.saw("poster", view)
    load.ledger.tags.append((stream, response.headers["etag"], view))
    if view.version < written:
        load.ledger.faults.append(
            f"{stream}: read version {view.version} after a 202 for {written}"
        )


def _item_path(stream: StreamKey) -> str:
    return f"/v1/orders/{stream.order_id}/items/{stream.upc}"


@dataclass
class Poller:
    """A point-of-sale system revalidating the items it watches by ETag."""

    held: dict[StreamKey, str] = field(default_factory=dict)
    """The last ETag held for each item polled."""
    versions: dict[StreamKey, int] = field(default_factory=dict)
    """The version each held ETag came with."""
    watched: list[StreamKey] = field(default_factory=list)

    def choose(self, known: list[StreamKey], rng: random.Random) -> StreamKey:
        """Pick the item to poll next, among a handful watched."""
        # A point-of-sale system watches a few open carts and moves on to
        # newer ones now and then.
        if len(self.watched) < 12:
            self.watched.append(rng.choice(known))
        elif rng.random() < 0.05:
            self.watched[rng.randrange(len(self.watched))] = rng.choice(known[-200:])
        return rng.choice(self.watched)

    async def revalidate(
        self, http: httpx.AsyncClient, load: Load, stream: StreamKey
    ) -> None:
        """GET the item, sending back the ETag held for it."""
        tag = self.held.get(stream)
        kind = "item GET" if tag is None else "item GET revalidation"
        path = _item_path(stream)
        response = await load.read(http, kind, path, {"mode": stream.mode}, tag)
        if response is None:
            return
        if response.status_code == 304:
            if response.headers.get("etag") != tag:
                load.ledger.faults.append(f"{stream}: 304 for {tag} named another tag")
            return
        if response.status_code != 200:
            load.ledger.unexpected(kind, response)
            return
        view = msgspec.json.decode(response.content, type=ItemView)
        load.ledger.saw("item poller", view)
        self.held[stream] = response.headers["etag"]
        load.ledger.tags.append((stream, self.held[stream], view))
        if view.version < self.versions.get(stream, 0):
            load.ledger.faults.append(
                f"{stream}: a poller saw version {view.version} "
                f"after {self.versions[stream]}"
            )
        self.versions[stream] = view.version


async def poll_items(load: Load, poller: Poller, rng: random.Random) -> None:
    """Revalidate watched items by ETag until the deadline."""
    async with load.client() as http:
        while load.running:
            known = load.ledger.accepted_streams
            if not known:
                await asyncio.sleep(0.05)
                continue
            await poller.revalidate(http, load, poller.choose(known, rng))


async def revalidate_held(
    http: httpx.AsyncClient, load: Load, poller: Poller
) -> dict[StreamKey, httpx.Response]:
    """Revalidate every ETag a poller last held, once the load is over."""
    answers = {}
    for stream, tag in poller.held.items():
        kind = "item GET revalidation"
        path = _item_path(stream)
        response = await load.read(http, kind, path, {"mode": stream.mode}, tag)
        if response is not None:
            answers[stream] = response
    return answers


def check_revalidated(
    poller: Poller,
    answers: dict[StreamKey, httpx.Response],
    view: dict[StreamKey, ItemView],
) -> None:
    """A held ETag is current exactly when it came with the final version."""
    assert set(answers) == set(poller.held)
    for stream, response in answers.items():
        final = view[stream]
        assert poller.versions[stream] <= final.version
        if poller.versions[stream] == final.version:
            assert response.status_code == 304, (stream, response.status_code)
        else:
            assert response.status_code == 200, (stream, response.status_code)
            assert msgspec.json.decode(response.content, type=ItemView) == final


@dataclass
class Follower:
    """A change-feed client that keeps passing ``next`` back."""

    mode: str
    limit: int
    cursor: str | None = None
    newest: dict[StreamKey, ItemView] = field(default_factory=dict)
    """The newest state seen of each item."""
    pages: int = 0

    async def poll(
        self, http: httpx.AsyncClient, load: Load, wait: float
    ) -> ChangePage | None:
        """Fetch the page after the cursor; move the cursor past it."""
        params: dict[str, str | int | float] = {
            "mode": self.mode,
            "limit": self.limit,
            "wait": wait,
        }
        if self.cursor is not None:
            params["after"] = self.cursor
        response = await load.read(http, "changes", "/v1/changes", params)
        if response is None:
            return None
        if response.status_code != 200:
            load.ledger.unexpected("changes", response)
            return None
        page = msgspec.json.decode(response.content, type=ChangePage)
        self._take(page, load.ledger)
        return page

    def _take(self, page: ChangePage, ledger: Ledger) -> None:
        self.pages += 1
        self.cursor = page.next
        streams = [StreamKey(v.mode, v.order_id, v.upc) for v in page.changes]
        if len(set(streams)) != len(streams):
            ledger.faults.append(f"a {self.mode} feed page repeats an item")
        for stream, view in zip(streams, page.changes, strict=True):
            if view.mode != self.mode:
                ledger.faults.append(f"the {self.mode} feed served {stream}")
            seen = self.newest.get(stream)
            if seen is not None and view.version < seen.version:
                ledger.faults.append(
                    f"{stream}: the feed went from {seen.version} to {view.version}"
                )
                continue
            self.newest[stream] = view
            ledger.saw(f"{self.mode} follower", view)


async def follow_changes(load: Load, follower: Follower) -> None:
    """Long-poll the feed until the deadline."""
    async with load.client() as http:
        while load.running:
            await follower.poll(http, load, LONG_POLL)


async def catch_up(load: Load, follower: Follower) -> None:
    """Read the feed on to its end, without waiting."""
    async with load.client() as http:
        for _ in range(10_000):
            page = await follower.poll(http, load, 0)
            if page is None or not page.changes:
                return
    pytest.fail(f"the {follower.mode} feed never ended")


_FILTERS: tuple[dict[str, str], ...] = (
    {},
    {},
    {"state": "refunded"},
    {"state": "confirmed"},
    {"state": "completed"},
    {"fulfilment": "same_day_delivery"},
    {"fulfilment": "ship_to_store"},
)


async def walk_listing(load: Load, rng: random.Random) -> None:
    """Page through the listing, with one filter or none, again and again."""
    async with load.client() as http:
        while load.running:
            await walk(http, load, rng.choice(_FILTERS), within_load=True)


async def walk(
    http: httpx.AsyncClient,
    load: Load,
    filters: dict[str, str],
    *,
    within_load: bool = False,
) -> dict[StreamKey, ItemView]:
    """Follow the listing's cursors from the top to the last page.

    Checks that keys rise page after page and that each item matches the
    filters; returns every item served. ``within_load`` stops at the deadline.
    """
    served: dict[StreamKey, ItemView] = {}
    params: dict[str, str | int | float] = {"mode": "live", "limit": 50, **filters}
    last: tuple[str, str] = ("", "")
    while load.running or not within_load:
        response = await load.read(http, "items listing", "/v1/items", params)
        if response is None:
            break
        if response.status_code != 200:
            load.ledger.unexpected("items listing", response)
            break
        page = msgspec.json.decode(response.content, type=ItemPage)
        for view in page.items:
            if (view.order_id, view.upc) <= last:
                load.ledger.faults.append(f"the listing went back to {view.order_id}")
            last = (view.order_id, view.upc)
            if view.mode != "live" or not _matches(view, filters):
                load.ledger.faults.append(f"{filters} listed {view}")
            served[StreamKey(view.mode, view.order_id, view.upc)] = view
            load.ledger.saw("listing walker", view)
        if page.next is None:
            break
        params["cursor"] = page.next
    return served


def _matches(view: ItemView, filters: dict[str, str]) -> bool:
    return all(getattr(view, name) == value for name, value in filters.items())


# The service ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    database_url: str, log_file: Path, **variables: str
) -> AsyncIterator[Service]:
    """Run ``ordertrail serve`` with its workers, logging to ``log_file``."""
    port = free_port()
    with log_file.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ordertrail",
            "serve",
            "--workers",
            str(WORKERS),
            env=environment(database_url, ORDERTRAIL_PORT=str(port), **variables),
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    service = Service(process, f"http://127.0.0.1:{port}")
    try:
        await until(_ready(service), "the service answering ready", within=30)
        yield service
    finally:
        await service.stop()


def _ready(service: Service) -> Callable[[], Awaitable[bool]]:
    async def ready() -> bool:
        if service.process.returncode is not None:
            pytest.fail(f"the service exited with {service.process.returncode}")
        try:
            async with httpx.AsyncClient(base_url=service.base_url) as http:
                return (await http.get("/health/ready")).status_code == 200
        except httpx.TransportError:
            return False

    return ready


# The test ------------------------------------------------------------------------


async def test_a_mixed_load_leaves_exactly_what_was_acknowledged(
    own: OwnDatabase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A line per request would bury the report and cost the clients' CPU.
    caplog.set_level(logging.WARNING, logger="httpx")
    tokens = {"live": secrets.token_urlsafe(24), "test": secrets.token_urlsafe(24)}
    settings = {
        "ORDERTRAIL_WEBHOOK_TOKEN_LIVE": tokens["live"],
        "ORDERTRAIL_WEBHOOK_TOKEN_TEST": tokens["test"],
        # Every reader here shares one key; the per-key limit has tests of
        # its own and would only turn this load into 429s.
        "ORDERTRAIL_KEY_RATE": "0",
    }
    reader_key = await _reader_key(own.pool)
    rng = random.Random(SEED)
    carts = Carts(rng)
    followers = [
        Follower("live", limit=rng.choice((20, 50, 100))) for _ in range(LIVE_FOLLOWERS)
    ] + [Follower("test", limit=50) for _ in range(TEST_FOLLOWERS)]
    pollers = [Poller() for _ in range(ITEM_POLLERS)]
    server_log = tmp_path / "serve.log"

    async with serving(own.url, server_log, **settings) as service:
        load = Load(service.base_url, tokens, reader_key, Ledger())
        loaded = await asyncio.wait_for(
            apply_load(load, carts, followers, pollers, rng),
            LOAD_SECONDS + 3 * REQUEST_TIMEOUT,
        )
        await settle(own.pool)
        await until(
            lambda: _checkpoint_at_head(own.pool),
            "the projection's runner reaching the head of the log",
            within=30,
        )
        for follower in followers:
            await catch_up(load, follower)
        async with load.client() as http:
            listed = await walk(http, load, {})
            revalidated = [await revalidate_held(http, load, p) for p in pollers]

    log, projection, view, fold = await end_state(own.pool)
    verified = await ordertrail(own.url, "audit", "verify", "--json")
    ledger = load.ledger
    with capsys.disabled():
        print(_report(ledger, log, loaded, followers, pollers))

    # Said in a line each, not in the assertion's repr of the whole ledger.
    if ledger.faults:
        pytest.fail("\n".join(ledger.faults[:30]))
    assert not [status for (_, status) in ledger.answers if status >= 500]
    if errors := _error_lines(server_log):
        pytest.fail("\n".join(errors[:10]))
    check_acknowledged(ledger, {event.position: event for event in log})
    check_redeliveries(ledger)
    check_streams(ledger, view)
    assert differing(view, fold) == []
    check_scenarios(carts, view)
    history = views_by_version(projection, log)
    check_views_seen(ledger, history)
    check_tags(ledger)
    for follower in followers:
        final = {key: v for key, v in view.items() if key.mode == follower.mode}
        assert differing(follower.newest, final) == [], f"{follower.mode} follower"
    for poller, answers in zip(pollers, revalidated, strict=True):
        check_revalidated(poller, answers, view)
    assert differing(listed, {k: v for k, v in view.items() if k.mode == "live"}) == []
    check_chains(log)
    assert_verified(verified, len(log))


async def _reader_key(pool: asyncpg.Pool) -> str:
    # Created before the service starts, which loads it with the others.
    async with pool.acquire() as connection:
        issued = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.READER, label="load"
        )
    return issued.secret


async def apply_load(
    load: Load,
    carts: Carts,
    followers: list[Follower],
    pollers: list[Poller],
    rng: random.Random,
) -> float:
    """Run every actor for the load's time; return how long it took."""
    started = time.monotonic()
    load.deadline = started + LOAD_SECONDS

    def own_rng() -> random.Random:
        return random.Random(rng.getrandbits(64))

    await asyncio.gather(
        *(post_statuses(load, carts, own_rng()) for _ in range(POSTERS)),
        *(poll_items(load, poller, own_rng()) for poller in pollers),
        *(follow_changes(load, follower) for follower in followers),
        *(walk_listing(load, own_rng()) for _ in range(LISTING_WALKERS)),
    )
    return time.monotonic() - started


async def _checkpoint_at_head(pool: asyncpg.Pool) -> bool:
    async with pool.acquire() as connection:
        log = await whole_log(connection)
    head = Cursor(log[-1].transaction_id, log[-1].position) if log else Cursor()
    return (await served_version(pool)).checkpoint >= head


def _error_lines(server_log: Path) -> list[str]:
    lines = server_log.read_text(errors="replace").splitlines()
    return [line for line in lines if '"level":"error"' in line.replace(" ", "")]


# The account ---------------------------------------------------------------------


def check_acknowledged(ledger: Ledger, by_position: dict[int, RecordedEvent]) -> None:
    """Every 202 is one event, as answered; no event went unanswered."""
    accepted = [acceptance for group in ledger.deliveries for acceptance in group]
    positions = [acceptance.answer.position for acceptance in accepted]
    assert len(positions) == len(set(positions)), "two 202s named one position"
    assert set(positions) == set(by_position), "202s and events differ"
    assert (
        len(accepted)
        == ledger.answers["webhook", 202] + ledger.answers["webhook retry", 202]
    )
    for acceptance in accepted:
        event = by_position[acceptance.answer.position]
        answer = acceptance.answer
        assert (event.stream, event.version) == (acceptance.stream, answer.version)
        assert (event.raw_body, event.idempotency_key) == (
            acceptance.body,
            acceptance.idempotency_key,
        )
        assert event.redelivery_of == answer.redelivery_of
        assert answer.redelivery == (answer.redelivery_of is not None)


def check_redeliveries(ledger: Ledger) -> None:
    """In each status sent, one delivery is new; its retry names it."""
    for group in ledger.deliveries:
        originals = [a for a in group if a.answer.redelivery_of is None]
        assert len(originals) == 1, group
        for retry in group:
            if retry is not originals[0]:
                assert retry.answer.redelivery_of == originals[0].answer.position


def check_streams(ledger: Ledger, view: dict[StreamKey, ItemView]) -> None:
    """Each stream's versions are the 202s it got, one to the last, no gap."""
    versions: dict[StreamKey, list[int]] = collections.defaultdict(list)
    retries: collections.Counter[StreamKey] = collections.Counter()
    for group in ledger.deliveries:
        for acceptance in group:
            versions[acceptance.stream].append(acceptance.answer.version)
            retries[acceptance.stream] += acceptance.answer.redelivery
    assert set(versions) == set(view)
    for stream, answered in versions.items():
        assert sorted(answered) == list(range(1, len(answered) + 1)), stream
        assert view[stream].version == len(answered)
        assert view[stream].redelivery_count == retries[stream]


def check_scenarios(carts: Carts, view: dict[StreamKey, ItemView]) -> None:
    """An item whose every status went in ends where its scenario does."""
    finished = [item for item in carts.items if item.finished]
    assert finished
    for item in finished:
        assert view[item.stream].state == item.scenario.ends_in, (
            item.scenario.name,
            view[item.stream],
        )


def views_by_version(
    projection: ItemProjection, log: list[RecordedEvent]
) -> dict[StreamKey, list[ItemView]]:
    """Each stream's view after each of its events: index ``version - 1``."""
    streams: dict[StreamKey, list[RecordedEvent]] = collections.defaultdict(list)
    for event in log:
        streams[event.stream].append(event)
    history = {}
    for stream, events in streams.items():
        item = None
        views = []
        for event in sorted(events, key=lambda e: e.version):
            item = projection.fold(item, [event])
            assert item is not None
            views.append(ItemView.of(item))
        history[stream] = views
    return history


def check_views_seen(ledger: Ledger, history: dict[StreamKey, list[ItemView]]) -> None:
    """Every view served was the fold of its stream at its version."""
    for reader, seen in ledger.views:
        views = history[StreamKey(seen.mode, seen.order_id, seen.upc)]
        assert 1 <= seen.version <= len(views), (reader, seen)
        assert seen == views[seen.version - 1], reader


def check_tags(ledger: Ledger) -> None:
    """An ETag names one state of its item: it never came with two versions."""
    versions: dict[tuple[StreamKey, str], set[int]] = collections.defaultdict(set)
    for stream, tag, seen in ledger.tags:
        versions[stream, tag].add(seen.version)
    assert {key: v for key, v in versions.items() if len(v) > 1} == {}


def check_chains(log: list[RecordedEvent]) -> None:
    """Every stream's hash chain recomputes from its first event."""
    streams: dict[StreamKey, list[RecordedEvent]] = collections.defaultdict(list)
    for event in log:
        streams[event.stream].append(event)
    for stream, events in streams.items():
        assert stream_chain_errors(sorted(events, key=lambda e: e.version)) == [], (
            stream
        )


def _report(
    ledger: Ledger,
    log: list[RecordedEvent],
    seconds: float,
    followers: list[Follower],
    pollers: list[Poller],
) -> str:
    total = sum(ledger.requests.values())
    lines = [
        "",
        f"load: {seconds:.1f} s, ordertrail serve with {WORKERS} workers; "
        f"{POSTERS} posters, {ITEM_POLLERS} item pollers, {len(followers)} "
        f"change-feed followers, {LISTING_WALKERS} listing walkers",
        f"requests: {total} ({total / seconds:.0f}/s)",
    ]
    lines += [f"  {kind}: {count}" for kind, count in sorted(ledger.requests.items())]
    lines.append("answers:")
    lines += [
        f"  {kind} {status}: {count}"
        for (kind, status), count in sorted(ledger.answers.items())
    ]
    redeliveries = sum(1 for event in log if event.redelivery_of is not None)
    streams = {event.stream for event in log}
    lines += [
        f"events: {len(log)} in {len(streams)} streams ({redeliveries} redeliveries)",
        f"views checked against the log: {len(ledger.views)}, "
        f"ETags: {len(ledger.tags)}, items held by pollers: "
        f"{sum(len(p.held) for p in pollers)}",
        "feed pages per follower: "
        + ", ".join(f"{f.mode} {f.pages}" for f in followers),
        f"faults: {len(ledger.faults)}",
    ]
    return "\n".join(lines)
