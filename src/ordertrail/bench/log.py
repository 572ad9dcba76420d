"""A realistic event log, written straight into the events table with COPY.

The read and rebuild benchmarks need a log of a million events or more, and
sending that many webhooks through the service would take longer than the
measurements. This module writes what the service would have stored instead:
the same rows, with valid stream versions and hash chains, so every reader
(projections, the change feed, the auditor) takes them for the real thing.

The shape follows Locally's traffic. Items come in carts of one to five
UPCs, a tenth of the carts in test mode. Each item follows one lifecycle
(pickup, delivery, ship-to-store, same-day delivery, cancelled, or still
open), with messages, refunds, partial refunds and statuses no vocabulary
knows sprinkled in, and a few reports out of order. About one delivery in
twenty is a redelivery: the same body again within the retry window, stored
with ``redelivery_of`` naming the original. A few thousand items are under
way at any moment, so one item's events are spread over the log the way a
cart's life is spread over a day.

Generation is one pass in Python that keeps only the items under way in
memory, so a log of any length takes the same memory. Rows go in with COPY,
one transaction per chunk, so that events carry many transaction ids, as
after group commits; a thread generates the next chunk while the previous
one is copied.

``python -m ordertrail.bench.log --url URL --events N`` fills a migrated,
empty database by hand (for profiling, say).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from ordertrail.auth.credentials import CredentialKind, create_credential
from ordertrail.bench.workload import order_id, upc
from ordertrail.db.connection import Connection, connect
from ordertrail.db.migrate import apply_migrations
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.hashing import GENESIS, canonical, chain_hash
from ordertrail.eventstore.records import EVENT_TYPE
from ordertrail.eventstore.store import SCHEMA_VERSION, EventStore
from ordertrail.projections import catalogue
from ordertrail.projections import rebuild as projection_rebuild
from ordertrail.projections.items import PROJECTION_NAME
from ordertrail.projections.rebuild import projection_of
from ordertrail.projections.runner import Batch, ProjectionRunner

__all__ = [
    "ChainCheck",
    "FilledView",
    "GeneratedLog",
    "LogShape",
    "build_served_view",
    "check_chains",
    "fill_served_view",
    "generate_log",
]

# Raw status strings as a sender might spell them; the shipped vocabulary
# folds case and separators, so the spellings vary on purpose.
_PICKUP = ("ordered", "confirmed", "ready_for_pickup", "Picked Up")
_DELIVERY = ("ordered", "confirmed", "ready_for_delivery", "delivered")
_SHIP_TO_STORE = (
    "ordered",
    "ship_to_store",
    "sts_shipped",
    "arrived_at_store",
    "picked_up",
)
_SAME_DAY = ("ordered", "same_day_delivery", "out_for_delivery", "sdd_delivered")
_OPEN = ("ordered", "confirmed")
_CANCELLATIONS = ("cancelled", "out_of_stock", "Canceled")
_MESSAGES = ("message", "store_message", "customer message")
_UNKNOWN = ("backordered", "price_adjusted", "awaiting_payment", "gift_wrapped")

# (lifecycle, share of items); the shares add up to one.
_LIFECYCLES: tuple[tuple[tuple[str, ...], float], ...] = (
    (_PICKUP, 0.40),
    (_DELIVERY, 0.10),
    (_SHIP_TO_STORE, 0.15),
    (_SAME_DAY, 0.10),
    (("ordered", "<cancelled>"), 0.10),
    (_OPEN, 0.15),
)
_CART_SIZES = ((1, 0.30), (2, 0.25), (3, 0.25), (4, 0.12), (5, 0.08))

_START = datetime(2025, 3, 3, 7, 0, tzinfo=UTC)
_COLUMNS = (
    "position", "mode", "order_id", "upc", "version", "event_type",
    "schema_version", "raw_status", "raw_body", "body_sha256", "received_at",
    "request_id", "client_address", "token_id", "idempotency_key",
    "redelivery_of", "previous_hash", "hash",
)  # fmt: skip
# transaction_id is left out on purpose: its default, pg_current_xact_id(),
# gives each chunk's transaction its own id, as group commits would.

Row = tuple[object, ...]


@dataclass(frozen=True)
class LogShape:
    """How big the log is and how its traffic is mixed."""

    events: int = 1_000_000
    under_way: int = 5_000
    """Items whose lifecycle is in progress at any moment."""
    test_share: float = 0.10
    """Share of carts sent by Locally's test connectivity."""
    redelivery_share: float = 0.05
    """Share of events that repeat an earlier delivery."""
    message_share: float = 0.20
    refund_share: float = 0.04
    partial_refund_share: float = 0.04
    unknown_share: float = 0.03
    """Share of items that get a status no vocabulary lists."""
    out_of_order_share: float = 0.02
    """Share of items whose last two reports arrive swapped."""
    mean_gap: float = 2.5
    """Mean seconds between two deliveries, over the whole log."""
    chunk: int = 10_000
    """Events per COPY transaction."""
    seed: int = 20_250_303


@dataclass(frozen=True)
class GeneratedLog:
    """What was written."""

    events: int
    items: int
    orders: int
    redeliveries: int
    test_events: int
    unknown_statuses: int
    transactions: int
    seconds: float
    """Generating and copying, without the VACUUM ANALYZE after."""
    first_received_at: datetime
    last_received_at: datetime

    @property
    def rate(self) -> float:
        """Events written per second."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


class _Stream:
    """An item under way: where its stream stands and what it will report."""

    __slots__ = ("hash", "mode", "order", "order_url", "pending", "upc", "version")

    def __init__(self, mode: str, order: str, item_upc: str, pending: list[str]):
        self.mode = mode
        self.order = order
        self.upc = item_upc
        self.order_url = f"https://www.locally.com/api/v2/cart/{order}"
        self.pending = pending
        """Statuses still to report, the next one last (popped from the end)."""
        self.version = 0
        self.hash = GENESIS


class _Webhook(msgspec.Struct):
    upc: str
    order_id: str
    status: str
    order_url: str


class _Generator:
    """Produces the rows of one log, chunk by chunk, in receive order."""

    def __init__(
        self, shape: LogShape, token_ids: dict[str, str], first_position: int
    ) -> None:
        self.shape = shape
        self.token_ids = token_ids
        # Seeded, so every run measures the same log; no secret comes from it.
        self.random = random.Random(shape.seed)  # noqa: S311
        self.position = first_position
        self.clock = 0
        """Microseconds since ``_START`` of the last delivery."""
        self.items = 0
        self.orders = 0
        self.redeliveries = 0
        self.test_events = 0
        self.unknown_statuses = 0
        self.unreported = 0
        """Items drawn to refill the pool at the very end, with no event yet."""
        self._cart: list[tuple[str, str, str]] = []
        self._retries: list[tuple[int, int, _Stream, int, str, bytes]] = []
        self._retry_count = 0
        self._encode = msgspec.json.Encoder().encode
        self._request_prefix = f"{self.random.getrandbits(32):08x}"
        self._lifecycles = [path for path, _ in _LIFECYCLES]
        self._lifecycle_weights = [share for _, share in _LIFECYCLES]
        self._cart_sizes = [size for size, _ in _CART_SIZES]
        self._cart_weights = [share for _, share in _CART_SIZES]
        # Each original is repeated with this chance, so that repeats make up
        # ``redelivery_share`` of all events.
        self._retry_chance = shape.redelivery_share / (1 - shape.redelivery_share)
        self._mean_gap_us = shape.mean_gap * 1e6

    def chunks(self) -> Iterator[list[Row]]:
        """Yield the rows in chunks of ``shape.chunk``, positions rising."""
        shape = self.shape
        under_way = [self._new_stream() for _ in range(shape.under_way)]
        remaining = shape.events
        step = 0
        while remaining > 0:
            rows: list[Row] = []
            for _ in range(min(shape.chunk, remaining)):
                step += 1
                self.clock += 1 + int(self.random.expovariate(1.0) * self._mean_gap_us)
                retries = self._retries
                if retries and retries[0][0] <= step:
                    _, _, stream, original, status, body = heapq.heappop(retries)
                    rows.append(self._row(stream, status, body, original))
                    self.redeliveries += 1
                    continue
                index = self.random.randrange(len(under_way))
                stream = under_way[index]
                status = stream.pending.pop()
                if not stream.pending:
                    under_way[index] = self._new_stream()
                body = self._encode(
                    _Webhook(stream.upc, stream.order, status, stream.order_url)
                )
                rows.append(self._row(stream, status, body, None))
                if self.random.random() < self._retry_chance:
                    self._schedule_retry(step, stream, status, body)
            remaining -= len(rows)
            if remaining == 0:
                self.unreported = sum(1 for s in under_way if s.version == 0)
            yield rows

    def _schedule_retry(
        self, step: int, stream: _Stream, status: str, body: bytes
    ) -> None:
        # A retry comes a few deliveries later: seconds, well inside the
        # service's redelivery window, as Locally retries within a minute.
        self._retry_count += 1
        due = step + self.random.randint(1, 12)
        heapq.heappush(
            self._retries,
            (due, self._retry_count, stream, self.position - 1, status, body),
        )

    def _row(
        self, stream: _Stream, status: str, body: bytes, redelivery_of: int | None
    ) -> Row:
        stream.version += 1
        received_at = _START + timedelta(microseconds=self.clock)
        previous = stream.hash
        stream.hash = chain_hash(
            previous,
            canonical(
                mode=stream.mode,
                order_id=stream.order,
                upc=stream.upc,
                version=stream.version,
                event_type=EVENT_TYPE,
                raw_status=status,
                raw_body=body,
                received_at=received_at,
            ),
        )
        position = self.position
        self.position += 1
        if stream.mode == "test":
            self.test_events += 1
        return (
            position,
            stream.mode,
            stream.order,
            stream.upc,
            stream.version,
            EVENT_TYPE,
            SCHEMA_VERSION,
            status,
            body,
            hashlib.sha256(body).digest(),
            received_at,
            f"{self._request_prefix}-{position:x}",
            "203.0.113.17",
            self.token_ids[stream.mode],
            None,
            redelivery_of,
            previous,
            stream.hash,
        )

    def _new_stream(self) -> _Stream:
        if not self._cart:
            self._cart = self._new_cart()
        mode, order, item_upc = self._cart.pop()
        self.items += 1
        return _Stream(mode, order, item_upc, self._lifecycle())

    def _new_cart(self) -> list[tuple[str, str, str]]:
        number = self.orders
        self.orders += 1
        mode = "test" if self.random.random() < self.shape.test_share else "live"
        size = self.random.choices(self._cart_sizes, self._cart_weights)[0]
        # Consecutive item numbers give the cart distinct UPCs.
        first = self.items + len(self._cart)
        return [(mode, order_id(number), upc(first + k)) for k in range(size)]

    def _lifecycle(self) -> list[str]:
        chance = self.random.random
        path = self.random.choices(self._lifecycles, self._lifecycle_weights)[0]
        statuses = [
            self.random.choice(_CANCELLATIONS) if s == "<cancelled>" else s
            for s in path
        ]
        ended = statuses[-1] not in _OPEN
        if chance() < self.shape.message_share:
            where = self.random.randint(1, len(statuses))
            statuses.insert(where, self.random.choice(_MESSAGES))
        if chance() < self.shape.unknown_share:
            where = self.random.randint(1, len(statuses))
            statuses.insert(where, self.random.choice(_UNKNOWN))
            self.unknown_statuses += 1
        if ended and chance() < self.shape.partial_refund_share:
            statuses.append("partial_refund")
        if ended and chance() < self.shape.refund_share:
            statuses.append("refunded")
        if len(statuses) > 2 and chance() < self.shape.out_of_order_share:
            statuses[-1], statuses[-2] = statuses[-2], statuses[-1]
        statuses.reverse()
        return statuses


async def _token_ids(connection: Connection) -> dict[str, str]:
    """Return a webhook token id per mode, creating the ones missing."""
    ids: dict[str, str] = {}
    for mode in ("live", "test"):
        found = await connection.fetchval(
            "SELECT id FROM credentials WHERE kind = 'webhook_token' AND mode = $1 "
            "AND revoked_at IS NULL ORDER BY created_at LIMIT 1",
            mode,
        )
        if found is None:
            issued = await create_credential(
                connection, CredentialKind.WEBHOOK_TOKEN, mode=mode, label="bench log"
            )
            found = issued.credential.id
        ids[mode] = str(found)
    return ids


async def generate_log(
    connection: Connection, shape: LogShape | None = None
) -> GeneratedLog:
    """Write a generated log into the (empty) events table of ``connection``.

    Afterwards the identity sequence continues past the last position, so
    deliveries appended later line up behind the log, and the table is
    vacuumed and analysed, so that no autovacuum starts during a measurement
    and the planner knows the table's size.
    """
    shape = shape if shape is not None else LogShape()
    if await connection.fetchval("SELECT EXISTS (SELECT 1 FROM events)"):
        msg = "the log generator writes into an empty events table only"
        raise RuntimeError(msg)
    generator = _Generator(shape, await _token_ids(connection), first_position=1)

    started = time.perf_counter()
    chunks = generator.chunks()
    transactions = 0
    following = asyncio.create_task(asyncio.to_thread(next, chunks, None))
    while (rows := await following) is not None:
        # The next chunk is generated in a thread while this one is copied;
        # the PostgreSQL backend works meanwhile, so the two overlap.
        following = asyncio.create_task(asyncio.to_thread(next, chunks, None))
        async with connection.transaction():
            await connection.copy_records_to_table(
                "events", records=rows, columns=_COLUMNS
            )
        transactions += 1
    seconds = time.perf_counter() - started

    await connection.execute(
        "SELECT setval(pg_get_serial_sequence('events', 'position'), $1)",
        generator.position - 1,
    )
    await connection.execute("VACUUM ANALYZE events")
    return GeneratedLog(
        events=shape.events,
        items=generator.items - generator.unreported,
        orders=generator.orders,
        redeliveries=generator.redeliveries,
        test_events=generator.test_events,
        unknown_statuses=generator.unknown_statuses,
        transactions=transactions,
        seconds=seconds,
        first_received_at=_START,
        last_received_at=_START + timedelta(microseconds=generator.clock),
    )


@dataclass(frozen=True)
class FilledView:
    """The served item view after the projection runner caught up."""

    events: int
    rows: int
    seconds: float

    @property
    def rate(self) -> float:
        """Events applied per second."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def fill_served_view(connection: Connection) -> FilledView:
    """Run the served version's projection runner over the whole log.

    This is the service's own catch-up path (the one its elected runner
    takes), so the view's rows, change ids and checkpoint are what a service
    that had received the log would hold; the servers started afterwards
    find nothing left to apply.
    """
    record = await catalogue.served(connection, PROJECTION_NAME)
    store = EventStore()
    projection = await projection_of(connection, record, store, Vocabulary.default())
    runner = ProjectionRunner(store, projection, record.name)
    applied = 0

    def count(batch: Batch) -> None:
        nonlocal applied
        applied += batch.applied

    started = time.perf_counter()
    last = await runner.catch_up(connection, on_batch=count)
    seconds = time.perf_counter() - started
    if last.failure is not None:
        msg = f"the projection failed at position {last.failure.event.position}"
        raise RuntimeError(msg)
    await connection.execute(f'VACUUM ANALYZE "{record.table_name}"')
    rows = await connection.fetchval(f'SELECT count(*) FROM "{record.table_name}"')
    return FilledView(applied, int(rows), seconds)


async def build_served_view(connection: Connection, reader: Connection) -> FilledView:
    """Build the item view from the whole log and serve it, as a rebuild does.

    Much faster than the runner's catch-up on a long log: each stream is
    folded whole and its row written once (``reader``, a second connection
    to the same database, reads ahead meanwhile), then the table is indexed
    and swapped in. The view holds what ``fill_served_view`` would leave,
    under the next projection version, and the servers started afterwards
    find nothing left to apply.
    """
    store = EventStore()
    started = time.perf_counter()
    record = await projection_rebuild.begin(connection, Vocabulary.default())
    last = await projection_rebuild.build(connection, record, store, reader=reader)
    if last.failure is not None:
        msg = f"the projection failed at position {last.failure.event.position}"
        raise RuntimeError(msg)
    await projection_rebuild.prepare(connection, record)
    swapped = await projection_rebuild.swap(connection, record, store)
    await projection_rebuild.drop_retired(connection)
    seconds = time.perf_counter() - started
    await connection.execute(f'VACUUM ANALYZE "{swapped.table_name}"')
    events = await connection.fetchval("SELECT count(*) FROM events")
    rows = await connection.fetchval(f'SELECT count(*) FROM "{swapped.table_name}"')
    return FilledView(int(events), int(rows), seconds)


@dataclass(frozen=True)
class ChainCheck:
    """Streams whose versions and hash chains were recomputed from the table."""

    streams: int
    events: int
    broken: int

    @property
    def passed(self) -> bool:
        """Whether every sampled stream held."""
        return self.streams > 0 and self.broken == 0


async def check_chains(connection: Connection, streams: int = 500) -> ChainCheck:
    """Recompute the versions and hash chains of a random sample of streams."""
    keys = await connection.fetch(
        "SELECT mode, order_id, upc FROM events WHERE version = 1 "
        "ORDER BY random() LIMIT $1",
        streams,
    )
    events = broken = 0
    for key in keys:
        rows = await connection.fetch(
            "SELECT version, event_type, raw_status, raw_body, received_at, "
            "previous_hash, hash FROM events "
            "WHERE mode = $1 AND order_id = $2 AND upc = $3 ORDER BY version",
            key["mode"],
            key["order_id"],
            key["upc"],
        )
        events += len(rows)
        previous = GENESIS
        for expected_version, row in enumerate(rows, start=1):
            recomputed = chain_hash(
                previous,
                canonical(
                    mode=key["mode"],
                    order_id=key["order_id"],
                    upc=key["upc"],
                    version=row["version"],
                    event_type=row["event_type"],
                    raw_status=row["raw_status"],
                    raw_body=row["raw_body"],
                    received_at=row["received_at"],
                ),
            )
            if (
                row["version"] != expected_version
                or row["previous_hash"] != previous
                or row["hash"] != recomputed
            ):
                broken += 1
                break
            previous = row["hash"]
    return ChainCheck(len(keys), events, broken)


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ordertrail.bench.log",
        description="Fill a database's empty event log with a generated one.",
    )
    parser.add_argument("--url", required=True, help="the database to fill")
    parser.add_argument("--events", type=int, default=LogShape.events)
    parser.add_argument(
        "--fill", action="store_true", help="also run the served item projection"
    )
    return parser.parse_args(argv)


async def _fill_by_hand(options: argparse.Namespace) -> None:
    connection = await connect(options.url)
    try:
        await apply_migrations(connection)
        generated = await generate_log(connection, LogShape(events=options.events))
        print(
            f"{generated.events:,} events, {generated.items:,} items, "
            f"{generated.orders:,} orders in {generated.seconds:.1f} s "
            f"({generated.rate:,.0f} events/s)"
        )
        if options.fill:
            filled = await fill_served_view(connection)
            print(
                f"served view: {filled.rows:,} rows in {filled.seconds:.1f} s "
                f"({filled.rate:,.0f} events/s)"
            )
    finally:
        await connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Fill the database named on the command line; 2 if it could not."""
    options = _parse_arguments(argv)
    try:
        asyncio.run(_fill_by_hand(options))
    except (OSError, RuntimeError, asyncpg.PostgresError) as error:
        print(f"log generation failed: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
