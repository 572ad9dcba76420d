"""Cost growth: ingest and item reads on an empty log and on a long one.

Run with ``python -m ordertrail.bench.growth`` (``make bench-growth``). One
run makes two databases on the same server: one starts empty, the other is
filled with a generated log of five million events (see ``log.py``) whose
item view is built as a rebuild builds one, and served. Each is served
by its own ordertrail, started the same way, and each gets, in turn:

- webhooks from 64 keep-alive connections (as in the ingest benchmark), for
  the accepted rate and the p99 to the 202;
- item GETs of random live items from as many connections (as in the read
  benchmark), for the p99 to the 200.

Before the measurements, each log takes a few seconds of deliveries and its
tables are analysed, as a database in service has statistics of what it
holds (see ``_settle``). A log that costs more as it grows shows as the long
log's figures falling behind the empty one's. The run passes when, on the
long log, the ingest rate is at least 80% of the empty log's and each p99 at
most 120% of it.
Rounds alternate between the two databases, so that the machine's other
load falls on both alike. Both databases are dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import asyncpg

from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from ordertrail.bench import summary
from ordertrail.bench.database import (
    BenchDatabase,
    bench_database,
    count_rows,
    describe_url,
    find_server,
)
from ordertrail.bench.ingest import Target as IngestTarget
from ordertrail.bench.ingest import measure as measure_ingest
from ordertrail.bench.load import LoadResult, run_load
from ordertrail.bench.log import (
    FilledView,
    GeneratedLog,
    LogShape,
    build_served_view,
    generate_log,
)
from ordertrail.bench.machine import CpuUsage, Machine, describe_machine, peak_memory
from ordertrail.bench.read import Target as ReadTarget
from ordertrail.bench.read import get_request
from ordertrail.bench.read import measure as measure_read
from ordertrail.bench.report import (
    MEASUREMENT_COLUMNS,
    MEASUREMENT_LEGEND,
    Check,
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
from ordertrail.bench.workload import build_requests, webhook_bodies
from ordertrail.db.connection import connect
from ordertrail.lib.logging import configure_logging

__all__ = ["Comparison", "GrowthReport", "Log", "benchmark", "main"]

ORDERTRAIL_APP = "ordertrail.api.app:create_app"
SLACK = 0.20
"""How far the long log's figures may fall behind the empty log's."""

_INGEST = "ingest"
_READ = "item GET"
_SETTLING = 5.0
"""Seconds of unmeasured deliveries before the tables are analysed."""


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m ordertrail.bench.growth",
        description="Compare ingest and item reads on an empty and a long log.",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=5_000_000,
        help="events in the long log (default 5,000,000)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="measured seconds per figure and round (default 10)",
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
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds over both logs, alternating (default 2)",
    )
    parser.add_argument(
        "--items",
        type=int,
        default=2_000,
        help="random live items each log's GETs cycle through (default 2,000)",
    )
    summary.add_outputs(parser, "growth")
    options = parser.parse_args(argv)
    if options.events < 1 or options.items < 1:
        parser.error("--events and --items must be at least 1")
    if options.seconds <= 0 or options.warmup < 0:
        parser.error("--seconds must be positive and --warmup not negative")
    if options.connections < 1 or options.rounds < 1:
        parser.error("--connections and --rounds must be at least 1")
    return options


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout holds the report alone.
    print(message, file=sys.stderr, flush=True)


@dataclass
class Log:
    """One of the two databases, its server and what was measured on it."""

    name: str
    database: BenchDatabase
    server: Server
    api_key: str
    preloaded: int
    """Events in the log before the first measured delivery."""
    items: list[bytes] = field(default_factory=list)
    """Item GET requests, filled once the log holds items."""
    sent: int = 0
    """Deliveries sent to it so far; the next load takes up after them."""
    runs: dict[str, list[tuple[LoadResult, CpuUsage]]] = field(
        default_factory=lambda: {_INGEST: [], _READ: []}
    )

    def figure(self, what: str) -> Measurement:
        """Return the pooled measurement of ``what`` on this log."""
        return Measurement.pool(f"{self.name}: {what}", self.runs[what])


@dataclass(frozen=True)
class Comparison:
    """One figure on both logs, and whether the long log kept up."""

    figure: str
    empty: float
    long: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        """The long log's figure over the empty log's."""
        return self.long / self.empty if self.empty > 0 else float("nan")

    @property
    def passed(self) -> bool:
        """Whether the long log is at most ``SLACK`` behind."""
        if self.higher_is_better:
            return self.ratio >= 1 - SLACK
        return self.ratio <= 1 + SLACK


@dataclass(frozen=True)
class GrowthReport:
    """Everything a run prints and writes."""

    machine: Machine
    database: str
    generated: GeneratedLog
    view: FilledView
    connections: int
    warmup: float
    seconds: float
    rounds: int
    measurements: list[Measurement]
    comparisons: list[Comparison]
    checks: list[Check]
    peak_rss: dict[str, int]

    @property
    def passed(self) -> bool:
        """Whether the long log kept up and every check held."""
        return all(c.passed for c in self.comparisons) and all(
            check.passed for check in self.checks
        )

    def _header(self) -> list[tuple[str, str]]:
        g, v = self.generated, self.view
        return [
            *machine_lines(self.machine),
            ("servers", f"granian {' '.join(GRANIAN_OPTIONS)}, one per log"),
            ("database", self.database),
            (
                "long log",
                f"{g.events:,} events ({g.items:,} items, {g.orders:,} orders) "
                f"generated in {g.seconds:.0f} s; item view of {v.rows:,} rows "
                f"built in {v.seconds:.0f} s, as a rebuild builds it",
            ),
            (
                "load",
                f"{self.connections} keep-alive connections, one request in flight "
                f"on each, {self.warmup:g} s warm-up, then {self.seconds:g} s per "
                f"figure and log, {self.rounds} round(s) alternating between logs",
            ),
        ]

    def _comparison_rows(self) -> list[list[str]]:
        return [
            [
                c.figure,
                f"{c.empty:,.2f}",
                f"{c.long:,.2f}",
                f"{c.ratio:.2f}",
                "PASS" if c.passed else "FAIL",
            ]
            for c in self.comparisons
        ]

    def _notes(self) -> list[str]:
        sizes = ", ".join(
            f"{name} {size / 1e6:,.0f} MB" for name, size in self.peak_rss.items()
        )
        return [f"peak RSS of the server process trees: {sizes}"]

    def text(self) -> str:
        """Return the report as aligned plain text."""
        lines = ["ordertrail cost growth benchmark", ""]
        lines += [f"  {name:<9} {value}" for name, value in self._header()]
        lines += ["", *aligned([MEASUREMENT_COLUMNS, *self._rows()]), ""]
        lines += [MEASUREMENT_LEGEND, "", f"growth ({_GROWTH_LEGEND})"]
        lines += [
            f"  {line}"
            for line in aligned(
                [_COMPARISON_COLUMNS, *self._comparison_rows()], left=(0, 4)
            )
        ]
        lines.append(f"  overall: {'PASS' if self.passed else 'FAIL'}")
        lines += ["", "correctness", *(f"  {_describe(c)}" for c in self.checks)]
        lines += ["", "notes", *(f"  {note}" for note in self._notes())]
        return "\n".join(lines)

    def markdown(self) -> str:
        """Return the report as markdown."""
        lines = ["# ordertrail cost growth benchmark", ""]
        lines += [f"- **{name}**: {value}" for name, value in self._header()]
        lines += ["", *markdown_table([MEASUREMENT_COLUMNS, *self._rows()]), ""]
        lines += [MEASUREMENT_LEGEND, "", "## Growth", "", _GROWTH_LEGEND, ""]
        lines += markdown_table(
            [_COMPARISON_COLUMNS, *self._comparison_rows()], left=(0, 4)
        )
        lines += ["", f"Overall: **{'PASS' if self.passed else 'FAIL'}**"]
        lines += ["", "## Correctness", "", *(f"- {_describe(c)}" for c in self.checks)]
        lines += ["", "## Notes", "", *(f"- {note}" for note in self._notes())]
        return "\n".join(lines) + "\n"

    def _rows(self) -> list[list[str]]:
        return measurement_rows(self.measurements)

    def summary_rows(self) -> list[summary.SummaryRow]:
        """Return the headline figures: the long log's against the empty log's."""
        rss = self.peak_rss.get(_LONG, 0)
        return [
            summary.SummaryRow(
                figure=f"{c.figure}, {self.generated.events:,}-event log",
                value=f"{c.long:,.2f}",
                ceiling="same, empty log",
                ceiling_value=f"{c.empty:,.2f}",
                ratio=f"{c.ratio:.2f}",
                target=(
                    f">= {1 - SLACK:.2f}"
                    if c.higher_is_better
                    else f"<= {1 + SLACK:.2f}"
                ),
                peak_rss=summary.megabytes(rss) if rss else "",
            )
            for c in self.comparisons
        ]


_EMPTY = "empty log"
_LONG = "long log"
_COMPARISON_COLUMNS = ["figure", _EMPTY, _LONG, "ratio", "verdict"]
_GROWTH_LEGEND = (
    f"long log / empty log; passes when a rate keeps {1 - SLACK:.0%} and a p99 "
    f"stays under {1 + SLACK:.0%}"
)


def _describe(check: Check) -> str:
    verdict = "ok" if check.passed else "MISMATCH"
    unanswered = (
        f" ({check.unanswered:,} requests unanswered)" if check.unanswered else ""
    )
    return (
        f"{check.target}: {check.stored:,} events appended, "
        f"{check.accepted:,} deliveries answered 2xx{unanswered}: {verdict}"
    )


async def _fill(
    database: BenchDatabase, events: int
) -> tuple[GeneratedLog, FilledView]:
    connection = await connect(database.url)
    reader = await connect(database.url)
    try:
        _progress(f"generating a log of {events:,} events")
        generated = await generate_log(connection, LogShape(events=events))
        _progress(
            f"  {generated.events:,} events in {generated.seconds:.0f} s; "
            "building the served item view"
        )
        view = await build_served_view(connection, reader)
        _progress(f"  {view.rows:,} item rows in {view.seconds:.0f} s")
    finally:
        await reader.close()
        await connection.close()
    return generated, view


async def _api_key(database: BenchDatabase) -> str:
    connection = await connect(database.url)
    try:
        issued = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.READER, label="bench growth"
        )
    finally:
        await connection.close()
    return issued.secret


async def _item_requests(log: Log, count: int) -> list[bytes]:
    """Return GETs of up to ``count`` random live items of ``log``."""
    connection = await connect(log.database.url)
    try:
        rows = await connection.fetch(
            "SELECT order_id, upc FROM item_view WHERE mode = 'live' "
            "ORDER BY random() LIMIT $1",
            count,
        )
    finally:
        await connection.close()
    headers = [("Authorization", f"Bearer {log.api_key}")]
    return [
        get_request(log.server.port, _item_path(r["order_id"], r["upc"]), headers)
        for r in rows
    ]


def _item_path(order_id: str, upc: str) -> str:
    return f"/v1/orders/{quote(order_id, safe='')}/items/{quote(upc, safe='')}"


async def _round(log: Log, options: argparse.Namespace, bodies: list[bytes]) -> None:
    target = IngestTarget(
        f"{log.name}: {_INGEST}", log.server, "/webhooks/locally", None
    )
    requests = _ingest_requests(log, bodies)
    result, usage = await measure_ingest(
        target, requests, options, log.database.name, first=log.sent
    )
    log.sent += result.sent
    log.runs[_INGEST].append((result, usage))
    if not log.items:
        # Chosen after deliveries arrived, so that the empty log has items.
        log.items = await _item_requests(log, options.items)
    reads = ReadTarget(f"{log.name}: {_READ}", log.server, log.items, {200})
    log.runs[_READ].append(
        await measure_read(reads, options.connections, options.warmup, options.seconds)
    )


def _ingest_requests(log: Log, bodies: list[bytes]) -> list[bytes]:
    return build_requests(
        bodies,
        host=HOST,
        port=log.server.port,
        path="/webhooks/locally",
        token=log.database.token,
    )


async def _settle(log: Log, options: argparse.Namespace, bodies: list[bytes]) -> None:
    """Send deliveries unmeasured, then analyse the log's tables.

    The empty log's database is new: PostgreSQL's plans for the service's
    joins, made and kept by the prepared statements while its tables are
    empty, go on scanning them whole as they grow, until the autovacuum
    analyses them a minute later. Both logs get the same few seconds of
    deliveries and an ANALYZE, so that each is measured as a database in
    service would be: with statistics of what it holds.
    """
    settling = await run_load(
        HOST,
        log.server.port,
        _ingest_requests(log, bodies),
        connections=options.connections,
        warmup=0,
        seconds=_SETTLING,
    )
    log.sent += settling.sent
    connection = await connect(log.database.url)
    try:
        table = await connection.fetchval(
            "SELECT table_name FROM projections WHERE state = 'serving'"
        )
        await connection.execute("ANALYZE events")
        await connection.execute(f'ANALYZE "{table}"')
    finally:
        await connection.close()
    log.preloaded = await count_rows(log.database.url, "events")


async def _check(log: Log) -> Check:
    stored = await count_rows(log.database.url, "events") - log.preloaded
    runs = log.runs[_INGEST]
    return Check(
        target=log.name,
        table="events",
        stored=stored,
        accepted=sum(result.total_accepted for result, _ in runs),
        unanswered=sum(result.unanswered for result, _ in runs),
    )


def _compare(empty: Log, long: Log) -> list[Comparison]:
    empty_in, long_in = empty.figure(_INGEST), long.figure(_INGEST)
    empty_read, long_read = empty.figure(_READ), long.figure(_READ)
    return [
        Comparison(
            f"{_INGEST} accepted/s", empty_in.throughput, long_in.throughput, True
        ),
        Comparison(f"{_INGEST} p99 ms", empty_in.p99_ms, long_in.p99_ms, False),
        Comparison(f"{_READ} p99 ms", empty_read.p99_ms, long_read.p99_ms, False),
    ]


async def benchmark(options: argparse.Namespace) -> GrowthReport:
    """Set up both logs, measure each in turn, check what was stored, tear down."""
    async with contextlib.AsyncExitStack() as stack:
        server_url, source = await stack.enter_async_context(find_server())
        empty_db = await stack.enter_async_context(bench_database(server_url))
        long_db = await stack.enter_async_context(bench_database(server_url))
        _progress(
            f"databases {describe_url(empty_db.url)} (empty) and "
            f"{describe_url(long_db.url)} (long), on the {source}"
        )
        generated, view = await _fill(long_db, options.events)

        logs = []
        for name, database, preloaded in (
            (_EMPTY, empty_db, 0),
            (_LONG, long_db, generated.events),
        ):
            environment = {
                "ORDERTRAIL_DATABASE_URL": database.url,
                # As in service: every accepted delivery writes its log line.
                "ORDERTRAIL_LOG_LEVEL": "info",
                # One key makes every read: its limit is far above what the
                # machine serves, so the limiter runs but never refuses.
                "ORDERTRAIL_KEY_RATE": "1000000",
                "ORDERTRAIL_KEY_BURST": "1000000",
            }
            server = stack.enter_context(
                serve(name.replace(" ", "-"), ORDERTRAIL_APP, environment)
            )
            logs.append(
                Log(name, database, server, await _api_key(database), preloaded)
            )
        await asyncio.gather(*(wait_ready(log.server, "/health/ready") for log in logs))

        bodies = webhook_bodies()
        for log in logs:
            _progress(f"settling: {log.name}")
            await _settle(log, options, bodies)
        for round_number in range(1, options.rounds + 1):
            for log in logs:
                _progress(f"round {round_number}/{options.rounds}: {log.name}")
                await _round(log, options, bodies)

        empty, long = logs
        return GrowthReport(
            machine=describe_machine(empty_db.server_version),
            database=(
                f"{describe_url(server_url)} ({source}), two databases created for "
                "this run and dropped after it"
            ),
            generated=generated,
            view=view,
            connections=options.connections,
            warmup=options.warmup,
            seconds=options.seconds,
            rounds=options.rounds,
            measurements=[
                log.figure(what) for what in (_INGEST, _READ) for log in logs
            ],
            comparisons=_compare(empty, long),
            checks=[await _check(log) for log in logs],
            peak_rss={log.name: peak_memory(log.server.process.pid) for log in logs},
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print and write the report.

    Returns 0, 1 if the long log fell behind or a check failed, or 2 if the
    run could not be set up.
    """
    options = parse_arguments(argv)
    configure_logging("warning", "console")
    try:
        report = asyncio.run(benchmark(options))
    except (ServerFailed, OSError, asyncpg.PostgresError) as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 2
    summary.publish(
        options,
        "growth",
        text=report.text(),
        markdown=report.markdown(),
        machine=report.machine,
        rows=report.summary_rows(),
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
