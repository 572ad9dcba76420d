"""Read API throughput and latency, against minimal handlers measured alongside.

Run with ``python -m ordertrail.bench.read`` (``make bench-read``). One run
generates a log (a million events by default, see ``log.py``), lets the
served item projection catch up with it, and then serves the same database
two ways with the same granian command:

- ordertrail, with API keys, ETags and its own views and cursors;
- minimal litestar handlers (``baseline.py``) running the same queries and
  returning the rows as the database gave them: the ceiling.

From 64 keep-alive connections it measures, one after the other: an item
read by the minimal handler and by ordertrail (200), ordertrail's answer to
a revalidation with the item's current ETag (304), and change-feed pages of
100 walked by their cursors, by both. Then it parks 500 long-polling
requests on the feed's head and measures what they cost the server: its
CPU time with and without them, idle and beside item reads from a few
connections, and how long one delivery takes to wake them all.

``--profile`` loads every target but the revalidations once more while
py-spy samples its server, and reports where the time went, so that the
same request can be compared with and without ordertrail around it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import asyncpg
import msgspec

from ordertrail.api.cursors import encode_cursor
from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from ordertrail.bench import summary
from ordertrail.bench.database import bench_database, describe_url, find_server
from ordertrail.bench.load import LoadResult, Walk, run_load
from ordertrail.bench.log import (
    ChainCheck,
    FilledView,
    GeneratedLog,
    LogShape,
    check_chains,
    fill_served_view,
    generate_log,
)
from ordertrail.bench.machine import (
    CpuSample,
    CpuUsage,
    Machine,
    cpu_usage,
    describe_machine,
    peak_memory,
    sample_cpu,
)
from ordertrail.bench.report import (
    MEASUREMENT_COLUMNS,
    Measurement,
    aligned,
    machine_lines,
    markdown_table,
    measurement_rows,
)
from ordertrail.bench.servers import (
    GRANIAN_OPTIONS,
    HOST,
    Server,
    ServerFailed,
    serve,
    wait_ready,
)
from ordertrail.bench.stacks import StackSummary, py_spy, summarize
from ordertrail.db.connection import Connection, connect
from ordertrail.lib.logging import configure_logging

__all__ = ["ReadReport", "benchmark", "main"]

ORDERTRAIL_APP = "ordertrail.api.app:create_app"
BASELINE_APP = "ordertrail.bench.baseline:create_app"
# Both servers get these on top of the shared options: 500 long polls and
# the measuring connections must all be accepted and in flight at once.
READ_OPTIONS = ("--backlog", "2048", "--backpressure", "2048")

ITEM = "ordertrail: item GET (200)"
REVALIDATION = "ordertrail: item GET, current ETag (304)"
MINIMAL_ITEM = "ceiling: minimal PK SELECT"
FEED = "ordertrail: change feed page"
MINIMAL_FEED = "ceiling: minimal page query"

ITEM_TARGET = 0.9
"""Item GETs should reach this share of the minimal handler's rate."""

FEED_LIMIT = 100


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m ordertrail.bench.read",
        description="Measure the read API against minimal handlers in the same run.",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=1_000_000,
        help="events in the generated log (default 1,000,000)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=8.0,
        help="measured seconds per target and round (default 8)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="unmeasured seconds before each measurement (default 2)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=64,
        help="concurrent keep-alive connections (default 64)",
    )
    # Two interleaved rounds by default: on a shared machine one round's
    # ratios moved by a quarter from run to run.
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds over all targets, interleaved to spread out noise (default 2)",
    )
    parser.add_argument(
        "--items",
        type=int,
        default=20_000,
        help="random live items the item GETs cycle through (default 20,000)",
    )
    parser.add_argument(
        "--pollers",
        type=int,
        default=500,
        help="idle long-polling connections (default 500)",
    )
    parser.add_argument(
        "--poll-window",
        type=float,
        default=10.0,
        help="seconds of each CPU window in the long-polling part (default 10)",
    )
    parser.add_argument(
        "--side-connections",
        type=int,
        default=4,
        help="connections reading items beside the long polls (default 4)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="load the targets again under py-spy and report where the time went",
    )
    summary.add_outputs(parser, "read")
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.warmup < 0 or options.poll_window <= 0:
        parser.error("--seconds and --poll-window must be positive, --warmup not <0")
    if min(options.connections, options.rounds, options.side_connections) < 1:
        parser.error("--connections, --rounds and --side-connections must be >= 1")
    if options.events < 1000 or options.items < 1 or options.pollers < 1:
        parser.error("--events must be >= 1000, --items and --pollers >= 1")
    # Every long poll must still be parked when the last window with them
    # closes: a second to settle, two windows, a second of warm-up, margin.
    if 2 * options.poll_window + 4 >= 30:
        parser.error("--poll-window too long: the long polls wait 30 s at most")
    return options


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout holds the report alone.
    print(message, file=sys.stderr, flush=True)


# Requests -------------------------------------------------------------------


def get_request(port: int, path: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """Return a complete keep-alive GET of ``path``."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "User-Agent: ordertrail-bench",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _item_path(order_id: str, upc: str) -> str:
    return f"/v1/orders/{quote(order_id, safe='')}/items/{quote(upc, safe='')}"


def _minimal_item_path(order_id: str, upc: str) -> str:
    return f"/items/{quote(order_id, safe='')}/{quote(upc, safe='')}"


class _Page(msgspec.Struct):
    """What a walk needs of an ordertrail change page; the rest is skipped."""

    next: str
    more: bool


class _MinimalPage(msgspec.Struct):
    """What a walk needs of a minimal change page."""

    next: tuple[int, int]
    more: bool


_page = msgspec.json.Decoder(_Page)
_minimal_page = msgspec.json.Decoder(_MinimalPage)


class FeedWalk:
    """Walks ordertrail's change feed by its cursors from one starting place.

    At the end of the feed (a page that is not full) or after an error, the
    walk starts again from its starting place.
    """

    def __init__(self, port: int, headers: Sequence[tuple[str, str]], start: str):
        self._port = port
        self._headers = headers
        self._start = start

    def _request(self, cursor: str) -> bytes:
        after = f"&after={cursor}" if cursor else ""
        path = f"/v1/changes?limit={FEED_LIMIT}{after}"
        return get_request(self._port, path, self._headers)

    def first(self) -> bytes:
        """Return the request for the starting place."""
        return self._request(self._start)

    def next(self, status: int, body: bytes) -> bytes:
        """Return the request for the page after ``body``."""
        if status != 200:
            return self.first()
        page = _page.decode(body)
        return self._request(page.next) if page.more else self.first()


class MinimalFeedWalk:
    """Walks the minimal handler's pages by (change_xid, position)."""

    def __init__(
        self, port: int, headers: Sequence[tuple[str, str]], start: tuple[int, int]
    ):
        self._port = port
        self._headers = headers
        self._start = start

    def _request(self, place: tuple[int, int]) -> bytes:
        path = f"/changes?xid={place[0]}&position={place[1]}&limit={FEED_LIMIT}"
        return get_request(self._port, path, self._headers)

    def first(self) -> bytes:
        """Return the request for the starting place."""
        return self._request(self._start)

    def next(self, status: int, body: bytes) -> bytes:
        """Return the request for the page after ``body``."""
        if status != 200:
            return self.first()
        page = _minimal_page.decode(body)
        return self._request(page.next) if page.more else self.first()


# Setting up -----------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """What the generated database holds and what the requests will ask for."""

    log: GeneratedLog
    view: FilledView
    chains: ChainCheck
    streams: int
    """Distinct streams in the log, which the view must have one row each of."""
    items: list[tuple[str, str]]
    """A random sample of live items, (order_id, upc)."""
    starts: list[tuple[int, int]]
    """Places spread over the live change feed, one per connection."""
    head: tuple[int, int]
    """The live change feed's newest place."""
    api_key: str


async def prepare(
    connection: Connection, options: argparse.Namespace
) -> tuple[Dataset, str]:
    """Generate the log, fill the served view, and choose what to request.

    Returns the dataset and a live webhook token's secret (to wake the long
    polls with one delivery).
    """
    _progress(f"generating a log of {options.events:,} events")
    generated = await generate_log(connection, LogShape(events=options.events))
    _progress(
        f"  {generated.events:,} events in {generated.seconds:.1f} s "
        f"({generated.rate:,.0f} events/s); filling the served item view"
    )
    view = await fill_served_view(connection)
    _progress(
        f"  {view.rows:,} item rows in {view.seconds:.1f} s ({view.rate:,.0f} events/s)"
    )
    chains = await check_chains(connection)
    streams = await connection.fetchval("SELECT count(*) FROM events WHERE version = 1")
    sample = await connection.fetch(
        "SELECT order_id, upc FROM item_view WHERE mode = 'live' "
        "ORDER BY random() LIMIT $1",
        options.items,
    )
    feed = await connection.fetch(
        "SELECT change_xid, position FROM item_view WHERE mode = 'live' "
        "ORDER BY change_xid, position"
    )
    places = [(int(r["change_xid"]), int(r["position"])) for r in feed]
    step = max(1, len(places) // options.connections)
    starts = [(0, 0), *places[step::step]][: options.connections]
    reader = await create_credential(
        connection, CredentialKind.API_KEY, role=Role.READER, label="bench read"
    )
    token = await create_credential(
        connection, CredentialKind.WEBHOOK_TOKEN, mode="live", label="bench wake"
    )
    dataset = Dataset(
        log=generated,
        view=view,
        chains=chains,
        streams=int(streams),
        items=[(r["order_id"], r["upc"]) for r in sample],
        starts=starts,
        head=places[-1] if places else (0, 0),
        api_key=reader.secret,
    )
    return dataset, token.secret


# Measuring ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One thing to load: a server, its requests and the answer expected."""

    name: str
    server: Server
    requests: list[bytes]
    accept: Collection[int]
    walks: Callable[[int], Walk] | None = None


async def measure(
    target: Target, connections: int, warmup: float, seconds: float
) -> tuple[LoadResult, CpuUsage]:
    """Load one target for one round; return its figures and the CPU it took."""
    samples: list[tuple[float, CpuSample]] = []

    def sample() -> None:
        samples.append((time.perf_counter(), sample_cpu(target.server.process.pid)))

    result = await run_load(
        HOST,
        target.server.port,
        target.requests,
        connections=connections,
        warmup=warmup,
        seconds=seconds,
        on_window_open=sample,
        on_window_close=sample,
        accept=target.accept,
        walks=target.walks,
    )
    (opened, before), (closed, after) = samples
    return result, cpu_usage(before, after, closed - opened)


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a new connection; return status, headers and body."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        return await _response(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    length = 0 if status in (204, 304) else int(headers.get("content-length", "0"))
    return status, headers, await reader.readexactly(length)


async def current_etags(
    port: int, requests: Sequence[bytes], connections: int = 8
) -> list[str]:
    """Return the ETag of each item GET in ``requests``, read over keep-alive."""
    etags = [""] * len(requests)

    async def fetch(first: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for index in range(first, len(requests), connections):
                writer.write(requests[index])
                status, headers, _ = await _response(reader)
                if status == 200:
                    etags[index] = headers.get("etag", "")
        finally:
            writer.close()

    await asyncio.gather(*(fetch(k) for k in range(connections)))
    return etags


async def profile(
    target: Target, options: argparse.Namespace, path: Path
) -> StackSummary:
    """Load ``target`` while py-spy samples its server; summarize the samples.

    The figures of this load are not reported: the sampler takes CPU from
    the two the server and PostgreSQL share.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    seconds = max(1, round(options.seconds))
    spy = await asyncio.create_subprocess_exec(
        py_spy(), "record", "--format", "raw", "--idle", "--rate", "200",
        "--subprocesses", "--duration", str(seconds),
        "--pid", str(target.server.process.pid), "--output", str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await measure(target, options.connections, 0.5, seconds + 1.0)
    if await spy.wait() != 0:
        msg = f"py-spy could not sample the server (exit {spy.returncode})"
        raise RuntimeError(msg)
    return summarize(path)


# Long polling ----------------------------------------------------------------


@dataclass
class Window:
    """One window of the long-polling part."""

    name: str
    pollers: int
    cpu: CpuUsage
    seconds: float
    load: LoadResult | None = None

    @property
    def server_ms_per_second(self) -> float:
        """Server CPU milliseconds per second of the window."""
        return self.cpu.server * 1000


@dataclass
class PollingResult:
    """What parking long polls on the feed's head did to the server."""

    pollers: int
    opened: int
    answered_early: int
    """Long polls answered before the wake-up delivery: none should be."""
    windows: list[Window] = field(default_factory=list)
    woken: int = 0
    """Long polls answered 200 after the wake-up delivery."""
    wake_ms: list[float] = field(default_factory=list)
    """Milliseconds from the delivery's 202 to each long poll's answer."""
    wake_error: str | None = None


class _Poll:
    """One parked long poll and, once it comes, its answer."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.writer = writer
        self.answer: asyncio.Task[tuple[int, float]] = asyncio.create_task(
            self._wait(reader)
        )

    @staticmethod
    async def _wait(reader: asyncio.StreamReader) -> tuple[int, float]:
        status, _, _ = await _response(reader)
        return status, time.perf_counter()

    def close(self) -> None:
        self.answer.cancel()
        self.writer.close()


async def _park(port: int, request: bytes, count: int) -> list[_Poll]:
    gate = asyncio.Semaphore(50)

    async def one() -> _Poll | None:
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                return None
            writer.write(request)
            await writer.drain()
            return _Poll(reader, writer)

    opened = await asyncio.gather(*(one() for _ in range(count)))
    return [poll for poll in opened if poll is not None]


async def _idle(server: Server, name: str, pollers: int, seconds: float) -> Window:
    started = time.perf_counter()
    before = sample_cpu(server.process.pid)
    await asyncio.sleep(seconds)
    after = sample_cpu(server.process.pid)
    elapsed = time.perf_counter() - started
    return Window(name, pollers, cpu_usage(before, after, elapsed), elapsed)


async def _beside(
    target: Target, name: str, pollers: int, options: argparse.Namespace
) -> Window:
    result, cpu = await measure(
        target, options.side_connections, 1.0, options.poll_window
    )
    return Window(name, pollers, cpu, result.window, result)


async def long_polling(
    ordertrail: Server,
    items: Target,
    dataset: Dataset,
    token: str,
    options: argparse.Namespace,
) -> PollingResult:
    """Measure the server with and without idle long polls on the feed's head."""
    headers = [("Authorization", f"Bearer {dataset.api_key}")]
    head = encode_cursor("changes", *dataset.head)
    request = get_request(ordertrail.port, f"/v1/changes?after={head}&wait=30", headers)
    window = options.poll_window
    count = options.pollers

    _progress(f"long polling: parking {count} requests on the feed's head")
    polls = await _park(ordertrail.port, request, count)
    result = PollingResult(count, len(polls), 0)
    try:
        await asyncio.sleep(1.0)
        result.windows.append(
            await _idle(ordertrail, "idle, long polls parked", len(polls), window)
        )
        result.windows.append(
            await _beside(items, "item GETs, long polls parked", len(polls), options)
        )
        result.answered_early = sum(poll.answer.done() for poll in polls)
        await _wake(ordertrail, dataset, token, polls, result)
    finally:
        for poll in polls:
            poll.close()

    await asyncio.sleep(1.0)
    result.windows.insert(0, await _idle(ordertrail, "idle, no long polls", 0, window))
    result.windows.insert(
        1, await _beside(items, "item GETs, no long polls", 0, options)
    )
    return result


async def _wake(
    ordertrail: Server,
    dataset: Dataset,
    token: str,
    polls: list[_Poll],
    result: PollingResult,
) -> None:
    """Send one delivery for a live item and time the long polls' answers."""
    order_id, upc = dataset.items[0]
    body = msgspec.json.encode(
        {
            "upc": upc,
            "order_id": order_id,
            "status": "customer message",
            "order_url": f"https://www.locally.com/api/v2/cart/{order_id}",
        }
    )
    request = (
        f"POST /webhooks/locally HTTP/1.1\r\nHost: {HOST}:{ordertrail.port}\r\n"
        f"Content-Type: application/json\r\nlocally-webhook-token: {token}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1") + body
    status, _, _ = await exchange(ordertrail.port, request)
    accepted_at = time.perf_counter()
    if status != 202:
        result.wake_error = f"the wake-up delivery was answered {status}"
        return
    waiting = [poll.answer for poll in polls if not poll.answer.done()]
    if waiting:
        await asyncio.wait(waiting, timeout=10.0)
    for poll in polls:
        answer = poll.answer
        if answer.done() and not answer.cancelled() and answer.exception() is None:
            answered_status, answered_at = answer.result()
            if answered_status == 200:
                result.woken += 1
                result.wake_ms.append(max(0.0, answered_at - accepted_at) * 1000)


# Reporting -------------------------------------------------------------------


@dataclass(frozen=True)
class RatioLine:
    """A figure over its same-run reference."""

    name: str
    numerator: Measurement
    denominator: Measurement
    target: float | None = None

    @property
    def throughput(self) -> float:
        """The numerator's rate over the denominator's."""
        reference = self.denominator.throughput
        return self.numerator.throughput / reference if reference else float("nan")

    @property
    def p99(self) -> float:
        """The numerator's p99 latency over the denominator's."""
        reference = self.denominator.p99_ms
        return self.numerator.p99_ms / reference if reference else float("nan")

    @property
    def cpu(self) -> float:
        """The numerator's server CPU per answer over the denominator's.

        Less noisy than the rates on a shared machine: a neighbour's load
        slows both servers' answers but hardly changes what each one costs.
        """
        reference = self.denominator.server_us_per_request
        own = self.numerator.server_us_per_request
        return own / reference if reference else float("nan")

    @property
    def verdict(self) -> str:
        """How the ratio stands against its target, if it has one."""
        if self.target is None:
            return ""
        mark = "met" if self.throughput >= self.target else "below"
        return f"target {self.target:.2f}: {mark}"


@dataclass
class ReadReport:
    """Everything a run prints and writes."""

    machine: Machine
    database: str
    options: argparse.Namespace
    dataset: Dataset
    measurements: list[Measurement]
    polling: PollingResult
    peak_rss: dict[str, int]
    server_command: str
    profiles: dict[str, tuple[Path, StackSummary]] = field(default_factory=dict)

    def _measurement(self, name: str) -> Measurement:
        return next(m for m in self.measurements if m.target == name)

    def ratios(self) -> list[RatioLine]:
        """Return the ratios the benchmark is about."""
        get = self._measurement
        return [
            RatioLine(
                "item GET (200) / minimal PK SELECT",
                get(ITEM),
                get(MINIMAL_ITEM),
                ITEM_TARGET,
            ),
            RatioLine("item GET 304 / item GET 200", get(REVALIDATION), get(ITEM)),
            RatioLine("change feed page / minimal page", get(FEED), get(MINIMAL_FEED)),
        ]

    @property
    def passed(self) -> bool:
        """Whether the data and every answer were what they should be.

        How many long polls one delivery woke is reported, not checked: a
        transaction open elsewhere on the server holds the feed's horizon,
        and so the wake-up, back.
        """
        polling = self.polling
        return (
            self.dataset.chains.passed
            and self.dataset.view.rows == self.dataset.streams
            and all(m.accepted > 0 and m.errors == 0 for m in self.measurements)
            and polling.opened == polling.pollers
            and polling.answered_early == 0
        )

    def _header(self) -> list[tuple[str, str]]:
        log, view, options = self.dataset.log, self.dataset.view, self.options
        rounds = f", {options.rounds} rounds interleaved" if options.rounds > 1 else ""
        return [
            *machine_lines(self.machine),
            ("servers", f"{self.server_command}, the same for both"),
            (
                "apps",
                f"ordertrail: {ORDERTRAIL_APP}, minimal handlers: {BASELINE_APP}",
            ),
            ("database", self.database),
            (
                "log",
                f"{log.events:,} events, {self.dataset.streams:,} items in "
                f"{log.orders:,} orders, {log.redeliveries / log.events:.1%} "
                f"redeliveries, {log.test_events / log.events:.1%} test mode, "
                f"{log.transactions:,} transactions; generated in "
                f"{log.seconds:.1f} s ({log.rate:,.0f} events/s)",
            ),
            (
                "view",
                f"{view.rows:,} item rows, filled by the served version's "
                f"projection runner in {view.seconds:.1f} s "
                f"({view.rate:,.0f} events/s)",
            ),
            (
                "load",
                f"{options.connections} keep-alive connections, one request in "
                f"flight on each, {options.warmup:g} s warm-up, then "
                f"{options.seconds:g} s per target{rounds}",
            ),
            (
                "workload",
                f"items: {len(self.dataset.items):,} random live items in turn; "
                f"304: the first {_revalidated(self.options):,} of them with "
                f"their current ETag; feed: pages of {FEED_LIMIT} walked by "
                f"their cursors from {len(self.dataset.starts)} places",
            ),
        ]

    def _ratio_rows(self) -> list[list[str]]:
        return [
            [
                line.name,
                f"{line.throughput:.2f}",
                f"{line.p99:.2f}",
                f"{line.cpu:.2f}",
                line.verdict,
            ]
            for line in self.ratios()
        ]

    def _polling_rows(self) -> list[list[str]]:
        rows = [
            [
                "window",
                "long polls",
                "server CPU ms/s",
                "loop run",
                "item GETs/s",
                "µs/GET",
            ]
        ]
        for window in self.polling.windows:
            load = window.load
            per_get = ""
            if load is not None and load.accepted:
                per_get = (
                    f"{window.cpu.server * load.window / load.accepted * 1e6:,.0f}"
                )
            rows.append(
                [
                    window.name,
                    f"{window.pollers:,}",
                    f"{window.server_ms_per_second:,.1f}",
                    f"{window.cpu.loop:.1%}",
                    f"{load.throughput:,.0f}" if load is not None else "",
                    per_get,
                ]
            )
        return rows

    def _polling_lines(self) -> list[str]:
        polling = self.polling
        lines = [
            f"{polling.opened:,} of {polling.pollers:,} long polls "
            f"(GET /v1/changes?after=<head>&wait=30) parked; "
            f"{polling.answered_early:,} answered before the wake-up delivery",
        ]
        if polling.wake_error is not None:
            lines.append(polling.wake_error)
        elif polling.wake_ms:
            ordered = sorted(polling.wake_ms)
            lines.append(
                f"one delivery woke {polling.woken:,} of them with its change: "
                f"first answer after {ordered[0]:,.0f} ms, median "
                f"{statistics.median(ordered):,.0f} ms, last {ordered[-1]:,.0f} ms"
            )
        added = self._added_cpu()
        if added is not None:
            lines.append(
                f"server CPU added by the idle long polls: {added:+,.1f} ms per "
                "second (ticks of 10 ms over each window)"
            )
        return lines

    def _added_cpu(self) -> float | None:
        idle = [w for w in self.polling.windows if w.load is None]
        if len(idle) != 2:
            return None
        without, with_polls = sorted(idle, key=lambda w: w.pollers)
        return with_polls.server_ms_per_second - without.server_ms_per_second

    def _checks(self) -> list[str]:
        data = self.dataset
        verdict = "ok" if data.chains.passed else "BROKEN"
        lines = [
            f"hash chains: {data.chains.streams:,} random streams, "
            f"{data.chains.events:,} events recomputed with eventstore.hashing: "
            f"{verdict}",
            f"item view: {data.view.rows:,} rows for {data.streams:,} streams: "
            f"{'ok' if data.view.rows == data.streams else 'MISMATCH'}",
        ]
        for m in self.measurements:
            if m.errors:
                statuses = ", ".join(
                    f"{count:,} x {status}"
                    for status, count in sorted(m.rejected.items())
                )
                lines.append(
                    f"{m.target}: {m.errors:,} unexpected answers ({statuses})"
                )
        return lines

    def _memory(self) -> list[str]:
        return [
            f"{name}: {summary.megabytes(size)} peak RSS (server process tree)"
            for name, size in self.peak_rss.items()
        ]

    def text(self) -> str:
        """Return the report as aligned plain text."""
        lines = ["ordertrail read benchmark", ""]
        lines += [f"  {name:<9} {value}" for name, value in self._header()]
        rows = [MEASUREMENT_COLUMNS, *measurement_rows(self.measurements)]
        lines += ["", *aligned(rows), "", _LEGEND, ""]
        lines += ["ratios (same run)"]
        ratio_rows = [
            ["ratio", "throughput", "p99", "CPU/answer", ""],
            *self._ratio_rows(),
        ]
        lines += [f"  {line}" for line in aligned(ratio_rows)]
        lines += ["", "idle long polls"]
        lines += [f"  {line}" for line in aligned(self._polling_rows())]
        lines += [f"  {line}" for line in self._polling_lines()]
        lines += ["", "correctness", *(f"  {line}" for line in self._checks())]
        lines += ["", "memory", *(f"  {line}" for line in self._memory())]
        for title, profile in self._profiles():
            lines += ["", title, *(f"  {line}" for line in profile)]
        return "\n".join(lines)

    def markdown(self) -> str:
        """Return the report as markdown."""
        lines = ["# ordertrail read benchmark", ""]
        lines += [f"- **{name}**: {value}" for name, value in self._header()]
        rows = [MEASUREMENT_COLUMNS, *measurement_rows(self.measurements)]
        lines += ["", *markdown_table(rows), "", _LEGEND, ""]
        lines += ["## Ratios", ""]
        lines += markdown_table(
            [
                ["ratio (same run)", "throughput", "p99", "CPU/answer", "target"],
                *self._ratio_rows(),
            ]
        )
        lines += ["", "## Idle long polls", ""]
        lines += markdown_table(self._polling_rows())
        lines += ["", *(f"- {line}" for line in self._polling_lines())]
        lines += ["", "## Correctness", "", *(f"- {line}" for line in self._checks())]
        lines += ["", "## Memory", "", *(f"- {line}" for line in self._memory())]
        for title, profile in self._profiles():
            lines += ["", f"## {title}", "", "```", *profile, "```"]
        return "\n".join(lines) + "\n"

    def _profiles(self) -> list[tuple[str, list[str]]]:
        return [
            (
                f"profile of {name} (raw stacks in {path})",
                found.lines(within=_SERVED_CODE),
            )
            for name, (path, found) in self.profiles.items()
        ]

    def summary_rows(self) -> list[summary.SummaryRow]:
        """Return the headline figures for the summary table."""
        rss = summary.megabytes(self.peak_rss.get("ordertrail", 0))
        rows = [
            summary.SummaryRow(
                figure=f"{line.numerator.target}, req/s",
                value=f"{line.numerator.throughput:,.0f}",
                ceiling=line.denominator.target,
                ceiling_value=f"{line.denominator.throughput:,.0f}",
                ratio=f"{line.throughput:.2f}",
                target=f">= {line.target:.2f}" if line.target is not None else "",
                peak_rss=rss,
            )
            for line in self.ratios()
        ]
        beside = [w for w in self.polling.windows if w.load is not None]
        if len(beside) == 2:
            without, with_polls = sorted(beside, key=lambda w: w.pollers)
            assert without.load is not None
            assert with_polls.load is not None
            rows.append(
                summary.SummaryRow(
                    figure=(
                        f"item GETs/s from {self.options.side_connections} "
                        f"connections beside {with_polls.pollers} idle long polls"
                    ),
                    value=f"{with_polls.load.throughput:,.0f}",
                    ceiling="the same without long polls",
                    ceiling_value=f"{without.load.throughput:,.0f}",
                    ratio=_ratio(with_polls.load.throughput, without.load.throughput),
                    target="about 1",
                    peak_rss=rss,
                )
            )
        added = self._added_cpu()
        if added is not None:
            idle = sorted(
                (w for w in self.polling.windows if w.load is None),
                key=lambda w: w.pollers,
            )
            rows.append(
                summary.SummaryRow(
                    figure=f"server CPU, idle, {idle[1].pollers} long polls parked",
                    value=f"{idle[1].server_ms_per_second:,.1f} ms/s",
                    ceiling="idle, no long polls",
                    ceiling_value=f"{idle[0].server_ms_per_second:,.1f} ms/s",
                    ratio=f"{added:+,.1f} ms/s",
                    target="+0",
                    peak_rss=rss,
                )
            )
        return rows


# Targets profiled with --profile, and the file name each profile gets. A
# 304 runs the 200's code up to the ETag, so it has nothing of its own.
_PROFILED = {
    MINIMAL_ITEM: "minimal-item",
    ITEM: "item",
    FEED: "feed",
    MINIMAL_FEED: "minimal-feed",
}

# The code a request runs, as py-spy names its files; the event loop's and
# granian's own frames would only repeat the total.
_SERVED_CODE = ("ordertrail/", "litestar/", "asyncpg/", "msgspec/", "structlog/")


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "n/a"


def _revalidated(options: argparse.Namespace) -> int:
    # The 304s need each item's current ETag, read once over HTTP first.
    return int(min(options.items, 5_000))


_LEGEND = "\n".join(
    [
        "accepted/s: expected answers a second (200; 304 for the revalidations). "
        "p50, p99: send-to-answer",
        "latency of expected answers. errors: other answers and failed requests. "
        "µs/req: server CPU",
        "time per expected answer. server, postgres, client, machine: CPU cores "
        "in use (1.00 is one",
        "core busy) by the granian process tree, all postgres processes, this "
        "load generator, everything.",
        "loop run, loop wait: share of the time the server's busiest thread (its "
        "event loop) ran, and",
        "was ready to run but had no CPU. pressure: share of the time some task "
        "waited for a CPU.",
        f"Feed pages hold up to {FEED_LIMIT} items; the minimal handlers return "
        "rows as fetched.",
    ]
)


# Running ---------------------------------------------------------------------


async def benchmark(options: argparse.Namespace) -> ReadReport:
    """Set up, measure every target and the long polls, and tear down."""
    async with contextlib.AsyncExitStack() as stack:
        server_url, source = await stack.enter_async_context(find_server())
        database = await stack.enter_async_context(bench_database(server_url))
        _progress(f"database {describe_url(database.url)} ({source})")
        connection = await connect(database.url)
        try:
            dataset, token = await prepare(connection, options)
        finally:
            await connection.close()

        environment = {
            "ORDERTRAIL_DATABASE_URL": database.url,
            "ORDERTRAIL_LOG_LEVEL": "warning",
            # One key makes every request here: its limit is set far above
            # what the machine can serve, so the limiter runs (and costs what
            # it costs in service) but never refuses.
            "ORDERTRAIL_KEY_RATE": "1000000",
            "ORDERTRAIL_KEY_BURST": "1000000",
        }
        ordertrail = stack.enter_context(
            serve("ordertrail", ORDERTRAIL_APP, environment, READ_OPTIONS)
        )
        baseline = stack.enter_context(
            serve("baseline", BASELINE_APP, environment, READ_OPTIONS)
        )
        await asyncio.gather(
            wait_ready(ordertrail, "/health/ready"),
            wait_ready(baseline, "/health/live"),
        )

        targets = await _targets(ordertrail, baseline, dataset, options)
        runs: dict[str, list[tuple[LoadResult, CpuUsage]]] = {
            target.name: [] for target in targets
        }
        for round_number in range(1, options.rounds + 1):
            for target in targets:
                _progress(f"round {round_number}/{options.rounds}: {target.name}")
                runs[target.name].append(
                    await measure(
                        target, options.connections, options.warmup, options.seconds
                    )
                )

        items = next(t for t in targets if t.name == ITEM)
        polling = await long_polling(ordertrail, items, dataset, token, options)
        profiles = {}
        if options.profile:
            for target in targets:
                if target.name in _PROFILED:
                    name = f"read-profile-{_PROFILED[target.name]}.txt"
                    path = options.markdown.with_name(name)
                    _progress(f"profiling {target.name} into {path}")
                    profiles[target.name] = (path, await profile(target, options, path))
        peak_rss = {
            "ordertrail": peak_memory(ordertrail.process.pid),
            "minimal handlers": peak_memory(baseline.process.pid),
        }
        return ReadReport(
            machine=describe_machine(database.server_version),
            database=(
                f"{describe_url(database.url)} ({source}), created for this run "
                "and dropped after it"
            ),
            options=options,
            dataset=dataset,
            measurements=[
                Measurement.pool(target.name, runs[target.name]) for target in targets
            ],
            polling=polling,
            peak_rss=peak_rss,
            profiles=profiles,
            server_command=f"granian {' '.join((*GRANIAN_OPTIONS, *READ_OPTIONS))}",
        )


async def _targets(
    ordertrail: Server,
    baseline: Server,
    dataset: Dataset,
    options: argparse.Namespace,
) -> list[Target]:
    headers = [("Authorization", f"Bearer {dataset.api_key}")]
    item_requests = [
        get_request(ordertrail.port, _item_path(order, item_upc), headers)
        for order, item_upc in dataset.items
    ]
    _progress("reading the current ETags of the items to revalidate")
    revalidated = item_requests[: _revalidated(options)]
    etags = await current_etags(ordertrail.port, revalidated)
    revalidations = [
        get_request(
            ordertrail.port,
            _item_path(order, item_upc),
            [*headers, ("If-None-Match", etag)],
        )
        for (order, item_upc), etag in zip(dataset.items, etags, strict=False)
        if etag
    ]
    if not revalidations:
        msg = "no item answered with an ETag"
        raise ServerFailed(msg)
    # The minimal handlers get the same headers, so the bytes to parse match.
    minimal_requests = [
        get_request(baseline.port, _minimal_item_path(order, item_upc), headers)
        for order, item_upc in dataset.items
    ]
    cursors = [
        encode_cursor("changes", *place) if place != (0, 0) else ""
        for place in dataset.starts
    ]
    starts = dataset.starts

    def feed_walk(k: int) -> Walk:
        return FeedWalk(ordertrail.port, headers, cursors[k % len(cursors)])

    def minimal_walk(k: int) -> Walk:
        return MinimalFeedWalk(baseline.port, headers, starts[k % len(starts)])

    # Compared pairs run next to each other, so drift in the machine's load
    # between them stays small.
    return [
        Target(MINIMAL_ITEM, baseline, minimal_requests, {200}),
        Target(ITEM, ordertrail, item_requests, {200}),
        Target(REVALIDATION, ordertrail, revalidations, {304}),
        Target(FEED, ordertrail, [], {200}, feed_walk),
        Target(MINIMAL_FEED, baseline, [], {200}, minimal_walk),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print and write the report.

    Returns 0, 1 if a correctness check failed, or 2 if the run could not be
    set up (no database, a server that would not start).
    """
    options = parse_arguments(argv)
    configure_logging("warning", "console")
    try:
        report = asyncio.run(benchmark(options))
    except (ServerFailed, OSError, RuntimeError, asyncpg.PostgresError) as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 2

    summary.publish(
        options,
        "read",
        text=report.text(),
        markdown=report.markdown(),
        machine=report.machine,
        rows=report.summary_rows(),
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
