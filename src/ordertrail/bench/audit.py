"""Audit reads and verification on a million-event log, beside raw scans.

Run with ``python -m ordertrail.bench.audit`` (``make bench-audit``). On a
fresh database it writes a realistic log with COPY: about 250,000 items in
carts, most following one of a few lifecycles, with redeliveries, late
reports and unrecognized statuses mixed in, and some carts of exactly 50
events; every stream carries a valid hash chain, computed here. Then it
measures, in the same run:

- fetching a 50-event order history (``EventStore.read_order``, what
  ``GET /v1/orders/{id}/events`` does) and an order's state ``as_of`` a
  position or a time (``GET /v1/orders/{id}?as_of=``, without HTTP), over
  many orders: p50 and p99;
- recording a checkpoint of every stream, and ``audit verify`` of the whole
  log, in events per second;
- beside them, the raw scans they cannot beat: every event in position order
  decoded as the store decodes it, and the chain columns in the order verify
  reads them; and the NDJSON export written to nowhere.

Figures vary from run to run on a shared machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import asyncpg
import msgspec

from ordertrail.audit.chains import CHAIN_COLUMNS, ChainEvent
from ordertrail.audit.checkpoints import record_checkpoint
from ordertrail.audit.digest import AuditKey
from ordertrail.audit.export import export_lines
from ordertrail.audit.history import AsOf, past_events, past_state
from ordertrail.audit.verify import verify_log
from ordertrail.bench.database import bench_database, describe_url, find_server
from ordertrail.bench.machine import Machine, describe_machine
from ordertrail.bench.report import percentile
from ordertrail.bench.workload import order_id as cart_id
from ordertrail.bench.workload import upc as product_upc
from ordertrail.db.connection import connect
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.hashing import GENESIS, canonical, chain_hash
from ordertrail.eventstore.records import EVENT_TYPE, RecordedEvent
from ordertrail.eventstore.store import EventStore
from ordertrail.lib.logging import configure_logging
from ordertrail.projections.items import ItemProjection
from ordertrail.projections.orders import roll_up

__all__ = ["Log", "benchmark", "main", "write_log"]

T = TypeVar("T")

LARGE_ORDER_ITEMS = 10
LARGE_ORDER_EVENTS = 50
"""A large cart: ten items of five reports each."""

_PATHS = (
    # (weight, statuses): the lifecycles items follow, by how common they are.
    (30, ("ordered", "confirmed", "ready for pickup", "picked up")),
    (12, ("ordered", "ship to store", "sts shipped", "sts arrived", "picked up")),
    (10, ("ordered", "same day delivery", "sdd dispatched", "sdd delivered")),
    (10, ("ordered", "cancelled")),
    (8, ("ordered", "confirmed", "picked up", "refunded")),
    (6, ("ordered", "confirmed", "picked up", "partial refund")),
    (14, ("ordered", "message", "confirmed", "ready for pickup", "picked up")),
    (10, ("ordered", "confirmed")),
)
_LARGE_PATH = ("ordered", "confirmed", "ready for pickup", "message", "picked up")
_REDELIVERY = 0.03
_LATE_ORDERED = 0.02
_UNRECOGNIZED = 0.01
_TEST_MODE = 0.05
_WINDOW_ITEMS = 4000
"""Items whose reports interleave in the log, as concurrent carts' do."""
_COPY_BATCH = 50_000
_START = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
_SPACING = timedelta(milliseconds=20)

_COPY_COLUMNS = (
    "position",
    "mode",
    "order_id",
    "upc",
    "version",
    "event_type",
    "schema_version",
    "raw_status",
    "raw_body",
    "body_sha256",
    "received_at",
    "request_id",
    "client_address",
    "token_id",
    "idempotency_key",
    "redelivery_of",
    "previous_hash",
    "hash",
)


class _Body(msgspec.Struct):
    upc: str
    order_id: str
    status: str
    order_url: str


@dataclass
class _Item:
    mode: str
    order_id: str
    upc: str
    statuses: list[str]
    redelivered: list[bool]
    version: int = 0
    previous: bytes = GENESIS
    last_body: bytes = b""
    last_position: int = 0


@dataclass
class Log:
    """What was written, and what the measurements sample from."""

    events: int = 0
    streams: int = 0
    orders: list[tuple[str, str, int, int]] = field(default_factory=list)
    """Every order: (mode, order id, first position, last position)."""
    large_orders: list[str] = field(default_factory=list)
    """Live orders of exactly 50 events."""
    redeliveries: int = 0
    unrecognized: int = 0
    late: int = 0
    generate_seconds: float = 0.0
    copy_seconds: float = 0.0


def _lifecycle(rng: random.Random) -> list[str]:
    weights = [weight for weight, _ in _PATHS]
    (statuses,) = rng.choices([path for _, path in _PATHS], weights=weights)
    chosen = list(statuses)
    if rng.random() < _LATE_ORDERED and len(chosen) > 2:
        chosen.insert(rng.randint(2, len(chosen)), "order placed")
    if rng.random() < _UNRECOGNIZED:
        chosen.insert(rng.randint(1, len(chosen)), "awaiting vendor review")
    return chosen


def _orders(rng: random.Random, events: int, log: Log) -> Iterator[list[_Item]]:
    """Yield carts of items until their reports add up to ``events``."""
    planned = 0
    number = 0
    large_every = 46  # about one cart in 46 is large: a tenth of all events
    while planned < events:
        number += 1
        cart = cart_id(number)
        mode = "test" if rng.random() < _TEST_MODE else "live"
        large = number % large_every == 0 and planned + LARGE_ORDER_EVENTS <= events
        if large:
            mode = "live"
            paths = [list(_LARGE_PATH) for _ in range(LARGE_ORDER_ITEMS)]
        else:
            paths = [_lifecycle(rng) for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))]
        items = []
        for index, path in enumerate(paths):
            statuses = path
            redelivered = [not large and rng.random() < _REDELIVERY for _ in path]
            size = len(statuses) + sum(redelivered)
            if planned + size > events:
                # The last cart is cut so that the log has exactly the size asked.
                statuses = path[: max(1, events - planned)]
                redelivered = [False] * len(statuses)
                size = len(statuses)
            upc = product_upc(number * LARGE_ORDER_ITEMS + index)
            items.append(_Item(mode, cart, upc, statuses, redelivered))
            planned += size
            if planned >= events:
                break
        if large:
            log.large_orders.append(cart)
        yield items


def _reports(item: _Item) -> list[tuple[str, bool]]:
    """The item's deliveries in order: (status, whether it repeats the last)."""
    sent = []
    for status, again in zip(item.statuses, item.redelivered, strict=True):
        sent.append((status, False))
        if again:
            sent.append((status, True))
    return sent


class _Writer:
    """Turns carts into interleaved, hash-chained event rows."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.position = 0
        self.encode = msgspec.json.Encoder().encode
        self.spans: dict[tuple[str, str], list[int]] = {}

    def window(
        self, items: list[_Item], rng: random.Random
    ) -> list[tuple[object, ...]]:
        """Rows for a window of items, their reports interleaved round by round."""
        queues = [_reports(item) for item in items]
        rows = []
        for round_number in range(max(len(q) for q in queues)):
            turn = [i for i, queue in enumerate(queues) if round_number < len(queue)]
            rng.shuffle(turn)
            for index in turn:
                status, again = queues[index][round_number]
                rows.append(self.row(items[index], status, again))
        return rows

    def row(self, item: _Item, status: str, again: bool) -> tuple[object, ...]:
        self.position += 1
        position = self.position
        item.version += 1
        if again:
            body = item.last_body
            redelivery_of: int | None = item.last_position
            self.log.redeliveries += 1
        else:
            body = self.encode(
                _Body(
                    upc=item.upc,
                    order_id=item.order_id,
                    status=status,
                    order_url=f"https://www.locally.com/api/v2/cart/{item.order_id}",
                )
            )
            redelivery_of = None
            item.last_body, item.last_position = body, position
            self.log.unrecognized += status == "awaiting vendor review"
            self.log.late += status == "order placed"
        received_at = _START + _SPACING * position
        digest = chain_hash(
            item.previous,
            canonical(
                mode=item.mode,
                order_id=item.order_id,
                upc=item.upc,
                version=item.version,
                event_type=EVENT_TYPE,
                raw_status=status,
                raw_body=body,
                received_at=received_at,
            ),
        )
        row = (
            position,
            item.mode,
            item.order_id,
            item.upc,
            item.version,
            EVENT_TYPE,
            1,
            status,
            body,
            hashlib.sha256(body).digest(),
            received_at,
            f"{position:016x}",
            "203.0.113.7",
            "tok_bench",
            None,
            redelivery_of,
            item.previous,
            digest,
        )
        item.previous = digest
        span = self.spans.setdefault((item.mode, item.order_id), [position, position])
        span[1] = position
        self.log.events += 1
        return row


async def write_log(
    connection: asyncpg.Connection,
    events: int,
    progress: Callable[[str], None],
    seed: int = 20250301,
) -> Log:
    """Generate the log and COPY it into ``events``; return what was written."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload, not a secret
    log = Log()
    writer = _Writer(log)
    pending: list[tuple[object, ...]] = []
    window: list[_Item] = []

    async def flush(rows: list[tuple[object, ...]]) -> None:
        started = time.perf_counter()
        await connection.copy_records_to_table(
            "events", records=rows, columns=_COPY_COLUMNS
        )
        log.copy_seconds += time.perf_counter() - started
        progress(f"  {log.events:,} events written")

    started = time.perf_counter()
    for cart in _orders(rng, events, log):
        window.extend(cart)
        log.streams += len(cart)
        if len(window) >= _WINDOW_ITEMS:
            pending.extend(writer.window(window, rng))
            window = []
            if len(pending) >= _COPY_BATCH:
                log.generate_seconds += time.perf_counter() - started
                await flush(pending)
                pending = []
                started = time.perf_counter()
    if window:
        pending.extend(writer.window(window, rng))
    log.generate_seconds += time.perf_counter() - started
    if pending:
        await flush(pending)

    await connection.execute(
        "SELECT setval(pg_get_serial_sequence('events', 'position'), $1)",
        writer.position,
    )
    await connection.execute("ANALYZE events")
    log.orders = [
        (mode, order, first, last)
        for (mode, order), (first, last) in writer.spans.items()
    ]
    return log


@dataclass(frozen=True)
class Latency:
    """Latencies of one kind of read, over many orders."""

    name: str
    samples: int
    p50_ms: float
    p99_ms: float
    note: str


@dataclass(frozen=True)
class Rate:
    """A whole-log pass: how many events per second it went through."""

    name: str
    events: int
    seconds: float
    note: str

    @property
    def per_second(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Report:
    """Everything a run prints."""

    machine: Machine
    database: str
    log: Log
    latencies: list[Latency] = field(default_factory=list)
    rates: list[Rate] = field(default_factory=list)
    findings: int = 0
    export_memory: list[tuple[int, int]] = field(default_factory=list)
    """(events exported, peak RSS in bytes) of ``ordertrail export`` runs."""

    def rate(self, name: str) -> Rate:
        """Return the rate measured under ``name``."""
        return next(rate for rate in self.rates if rate.name == name)

    def lines(self) -> list[str]:
        """Return the report as plain text lines."""
        m, log = self.machine, self.log
        lines = [
            "ordertrail audit benchmark",
            "",
            f"  machine   {m.cores} cores (nproc), {m.cpu_model}",
            f"  software  Python {m.python}, PostgreSQL {m.postgresql}, "
            f"asyncpg {m.asyncpg}",
            f"  database  {self.database}",
            f"  log       {log.events:,} events in {log.streams:,} streams, "
            f"{len(log.orders):,} orders ({len(log.large_orders):,} of exactly "
            f"{LARGE_ORDER_EVENTS} events); {log.redeliveries:,} redeliveries, "
            f"{log.late:,} late reports, {log.unrecognized:,} unrecognized",
            f"  written   chains computed in {log.generate_seconds:.1f} s "
            f"({log.events / log.generate_seconds:,.0f} events/s), COPY in "
            f"{log.copy_seconds:.1f} s ({log.events / log.copy_seconds:,.0f} rows/s)",
            "",
        ]
        rows = [["read", "samples", "p50 ms", "p99 ms", "what"]]
        rows += [
            [x.name, f"{x.samples:,}", f"{x.p50_ms:.2f}", f"{x.p99_ms:.2f}", x.note]
            for x in self.latencies
        ]
        lines += [*_aligned(rows), ""]
        rows = [["whole-log pass", "events", "seconds", "events/s", "what"]]
        rows += [
            [
                x.name,
                f"{x.events:,}",
                f"{x.seconds:.2f}",
                f"{x.per_second:,.0f}",
                x.note,
            ]
            for x in self.rates
        ]
        lines += [*_aligned(rows), ""]
        verify = self.rate("audit verify")
        lines.append("ratios (same run)")
        for baseline in ("scan, position order", "scan, stream order"):
            reference = self.rate(baseline)
            lines.append(
                f"  audit verify / {baseline:<22} "
                f"{verify.per_second / reference.per_second:5.2f}"
            )
        export = self.rate("export to NDJSON")
        scan = self.rate("scan, position order")
        lines.append(
            f"  export / {'scan, position order':<28} "
            f"{export.per_second / scan.per_second:5.2f}"
        )
        if self.export_memory:
            lines += ["", "memory of `ordertrail export -o FILE` in its own process"]
            lines += [
                f"  {events:>9,} events exported: peak RSS {rss / 2**20:,.0f} MB"
                for events, rss in self.export_memory
            ]
        lines += [
            "",
            "correctness",
            f"  audit verify of the generated log: {self.findings} findings "
            f"({'ok' if self.findings == 0 else 'MISMATCH'})",
        ]
        return lines


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.ljust(width) if i in (0, len(row) - 1) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout holds the report alone.
    print(message, file=sys.stderr, flush=True)


def _latency(name: str, durations: list[int], note: str) -> Latency:
    ordered = sorted(durations)
    return Latency(
        name,
        len(ordered),
        percentile(ordered, 0.50) / 1e6,
        percentile(ordered, 0.99) / 1e6,
        note,
    )


async def _timed(
    samples: Sequence[T], run: Callable[[T], Awaitable[None]]
) -> list[int]:
    durations = []
    for sample in samples:
        started = time.perf_counter_ns()
        await run(sample)
        durations.append(time.perf_counter_ns() - started)
    return durations


async def measure_reads(
    connection: asyncpg.Connection, log: Log, samples: int, rng: random.Random
) -> list[Latency]:
    """Time order histories and past states over randomly chosen orders."""
    store = EventStore()
    projection = ItemProjection(Vocabulary.default(), store)
    large = [rng.choice(log.large_orders) for _ in range(samples)]
    chosen = [rng.choice(log.orders) for _ in range(samples)]
    points = [
        (mode, order, rng.randint(first, last)) for mode, order, first, last in chosen
    ]
    folded: list[int] = []

    async def history(order: str) -> None:
        events = await store.read_order(connection, "live", order, limit=1000)
        assert len(events) == LARGE_ORDER_EVENTS

    async def as_of(point: tuple[str, str, int]) -> None:
        mode, order, position = point
        moment = AsOf(text=str(position), position=position)
        events = await past_events(connection, mode, order, moment)
        state = past_state(projection, events)
        assert state is not None
        roll_up(state.items)
        folded.append(len(events))

    async def as_of_time(point: tuple[str, str, int]) -> None:
        mode, order, position = point
        moment = AsOf(text="", moment=_START + _SPACING * position)
        events = await past_events(connection, mode, order, moment)
        state = past_state(projection, events)
        assert state is not None
        roll_up(state.items)

    # A first pass loads indexes and code paths; it is not counted.
    await _timed(large[: samples // 10], history)
    await _timed(points[: samples // 10], as_of)
    histories = await _timed(large, history)
    folded.clear()
    states = await _timed(points, as_of)
    times = await _timed(points, as_of_time)
    typical = sorted(folded)[len(folded) // 2]
    return [
        _latency(
            "order history, 50 events",
            histories,
            "EventStore.read_order of a 50-event order, decoded",
        ),
        _latency(
            "order as_of a position",
            states,
            f"read + fold + roll-up; median {typical} events folded",
        ),
        _latency("order as_of a time", times, "the same, bounded by received_at"),
    ]


async def _scan(
    connection: asyncpg.Connection,
    query: str,
    decode: Callable[[asyncpg.Record], object],
) -> int:
    count = 0
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        async for row in connection.cursor(query, prefetch=5000):
            decode(row)
            count += 1
    return count


def _recorded(row: asyncpg.Record) -> object:
    # By index, the cheapest complete decode: a ceiling, not the store's path.
    return RecordedEvent(
        position=row[0],
        transaction_id=row[1],
        mode=row[2],
        order_id=row[3],
        upc=row[4],
        version=row[5],
        event_type=row[6],
        schema_version=row[7],
        raw_status=row[8],
        raw_body=row[9],
        body_sha256=row[10],
        received_at=row[11],
        request_id=row[12],
        client_address=row[13],
        token_id=row[14],
        idempotency_key=row[15],
        redelivery_of=row[16],
        previous_hash=row[17],
        hash=row[18],
    )


def _chain(row: asyncpg.Record) -> object:
    return ChainEvent(*row)


async def measure_passes(
    connection: asyncpg.Connection, key: AuditKey
) -> tuple[list[Rate], int]:
    """Time the whole-log passes; return them and verify's finding count."""
    columns = ", ".join(RecordedEvent.__struct_fields__)
    by_position = f"SELECT {columns} FROM events ORDER BY position"
    by_stream = (
        f"SELECT {CHAIN_COLUMNS} FROM events ORDER BY mode, order_id, upc, version"
    )
    rates: list[Rate] = []
    findings: list[int] = []

    async def timed(name: str, note: str, run: Callable[[], Awaitable[int]]) -> None:
        _progress(f"measuring: {name}")
        started = time.perf_counter()
        events = await run()
        rates.append(Rate(name, events, time.perf_counter() - started, note))

    async def checkpoint() -> int:
        recorded = await record_checkpoint(connection, key)
        assert recorded is not None
        return int(await connection.fetchval("SELECT count(*) FROM events"))

    async def verify() -> int:
        report = await verify_log(connection, key=key)
        findings.append(len(report.findings) + report.omitted)
        return report.events

    async def export() -> int:
        lines = 0
        async for chunk in export_lines(
            connection, mode=None, from_position=1, to_position=2**62
        ):
            lines += chunk.count(b"\n")
        return lines - 2

    _progress("scanning once to warm the caches")
    await _scan(connection, by_position, _recorded)
    await timed(
        "scan, position order",
        "every column, decoded into RecordedEvent",
        lambda: _scan(connection, by_position, _recorded),
    )
    await timed(
        "scan, stream order",
        "the chain columns in verify's order, decoded (ChainEvent)",
        lambda: _scan(connection, by_stream, _chain),
    )
    await timed(
        "record a checkpoint",
        "heads of every stream, digest, signature (first checkpoint)",
        checkpoint,
    )
    await timed(
        "audit verify",
        "every chain, the checkpoint's signature and digest, heads vs table",
        verify,
    )
    await timed("export to NDJSON", "every event and every head, encoded", export)
    return rates, findings[0]


_EXPORT_PEAK = """
import resource, runpy, sys
sys.argv = ["ordertrail", "export", "-o", sys.argv[1], "--to-position", sys.argv[2]]
try:
    runpy.run_module("ordertrail", run_name="__main__")
except SystemExit:
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


async def measure_export_memory(url: str, events: int) -> list[tuple[int, int]]:
    """Export a tenth of the log, then all of it; return each run's peak RSS.

    Each export runs in a process of its own, so its peak is its own: a
    streamed export should peak the same whatever the number of events.
    """
    found = []
    with tempfile.TemporaryDirectory(prefix="ordertrail-export-") as folder:
        for count in (events // 10, events):
            _progress(f"exporting {count:,} events in a process of its own")
            finished = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-c",
                    _EXPORT_PEAK,
                    f"{folder}/export.ndjson",
                    str(count),
                ],
                env={**os.environ, "ORDERTRAIL_DATABASE_URL": url},
                capture_output=True,
                text=True,
                check=True,
            )
            found.append((count, int(finished.stdout.strip().splitlines()[-1])))
    return found


async def benchmark(options: argparse.Namespace) -> Report:
    """Set up, write the log, measure, and tear down."""
    rng = random.Random(options.seed)  # noqa: S311 - reproducible sampling
    async with contextlib.AsyncExitStack() as stack:
        server_url, source = await stack.enter_async_context(find_server())
        database = await stack.enter_async_context(bench_database(server_url))
        _progress(f"database {describe_url(database.url)} ({source})")
        connection = await connect(database.url)
        stack.push_async_callback(connection.close)

        _progress(f"writing {options.events:,} events")
        log = await write_log(connection, options.events, _progress, options.seed)
        _progress(f"measuring reads over {options.samples:,} orders each")
        latencies = await measure_reads(connection, log, options.samples, rng)
        key = AuditKey(secrets.token_urlsafe(32))
        rates, findings = await measure_passes(connection, key)
        memory = await measure_export_memory(database.url, options.events)
        return Report(
            machine=describe_machine(database.server_version),
            database=f"{describe_url(database.url)} ({source}), created for this "
            "run and dropped after it",
            log=log,
            latencies=latencies,
            rates=rates,
            findings=findings,
            export_memory=memory,
        )


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m ordertrail.bench.audit",
        description="Measure audit reads and verification on a generated log.",
    )
    parser.add_argument(
        "--events", type=int, default=1_000_000, help="events to write (1,000,000)"
    )
    parser.add_argument(
        "--samples", type=int, default=2000, help="orders timed per read (2,000)"
    )
    parser.add_argument("--seed", type=int, default=20250301, help="workload seed")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results/audit.txt"),
        help="where to write the report too (bench-results/audit.txt)",
    )
    options = parser.parse_args(argv)
    if options.events < 10 * LARGE_ORDER_EVENTS * 46 or options.samples < 10:
        parser.error("--events must be at least 23,000 and --samples at least 10")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; return 1 if verify found anything."""
    options = parse_arguments(argv)
    configure_logging("warning", "console")
    report = asyncio.run(benchmark(options))
    text = "\n".join(report.lines())
    print(text)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text + "\n")
    print(f"\nreport written to {options.output}")
    return 0 if report.findings == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
