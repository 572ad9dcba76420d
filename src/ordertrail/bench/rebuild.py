"""Rebuilding the item projection, against the raw ceiling of reading the log.

Run with ``python -m ordertrail.bench.rebuild`` (``make bench-rebuild``). For
each log size (``--events 1000000,2000000`` by default) it generates a fresh
log (see ``log.py``), then runs processes one after the other on it:

- the ceiling: read every event in position order in keyset batches (the
  same columns a projection runner reads), decode each body with msgspec and
  count events per stream in a dict: what any rebuild must at least do;
- the rebuild: ``ordertrail.projections.rebuild.begin`` and ``build`` into a
  new version of the item view, exactly as ``ordertrail projections
  rebuild`` starts it (the comparison and the swap are left out);
- the ceiling again: the rebuild is compared with the mean of the two, so
  that a change in the shared machine's load during the run weighs on both
  sides alike.

Each runs in a process of its own so that its peak resident memory
(``ru_maxrss``) is its own; a rebuild's should not grow with the log.
``--profile`` rebuilds once more under py-spy and reports where the time
went.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec

from ordertrail.bench import summary
from ordertrail.bench.database import bench_database, describe_url, find_server
from ordertrail.bench.log import (
    ChainCheck,
    GeneratedLog,
    LogShape,
    check_chains,
    generate_log,
)
from ordertrail.bench.machine import (
    Machine,
    cpu_usage,
    describe_machine,
    memory_of,
    sample_cpu,
)
from ordertrail.bench.report import aligned, machine_lines, markdown_table
from ordertrail.bench.stacks import StackSummary, py_spy, summarize
from ordertrail.db.connection import Connection, connect
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import Cursor, RecordedEvent
from ordertrail.eventstore.store import EventStore
from ordertrail.lib.logging import configure_logging
from ordertrail.projections import catalogue
from ordertrail.projections import rebuild as projection_rebuild
from ordertrail.projections.items import PROJECTION_NAME

__all__ = ["ChildResult", "RebuildReport", "SizeResult", "benchmark", "main"]

EVENTS_TARGET = 50_000
"""A rebuild should apply at least this many events a second."""
CEILING_TARGET = 1 / 3
"""and reach at least this share of the raw ceiling."""
FLAT_MEMORY = 1.10
"""Peak memory is flat if the largest log's peak is within 10% of the smallest's."""

_DEFAULT_SIZES = "1000000,2000000"
# The code a rebuild runs, as py-spy names its files; the benchmark's own
# frames and the event loop's would only repeat the total.
_PROFILED_CODE = (
    "ordertrail/projections/",
    "ordertrail/domain/",
    "ordertrail/eventstore/",
    "ordertrail/db/",
    "eventsourcing/",
    "uuid.py",
)
_URL_VARIABLE = "ORDERTRAIL_DATABASE_URL"
# The columns a projection runner reads (EventStore.read_after), so that the
# ceiling moves the same bytes out of PostgreSQL.
_SCAN = f"""
    SELECT {", ".join(RecordedEvent.__struct_fields__)} FROM events
    WHERE position > $1
    ORDER BY position
    LIMIT $2
"""


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part]
    except ValueError:
        msg = f"not a list of event counts: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not sizes or min(sizes) < 1000:
        msg = "give one or more event counts of at least 1000"
        raise argparse.ArgumentTypeError(msg)
    return sizes


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m ordertrail.bench.rebuild",
        description="Measure a projection rebuild against reading the raw log.",
    )
    parser.add_argument(
        "--events",
        type=_sizes,
        default=_sizes(_DEFAULT_SIZES),
        help=f"log sizes, comma-separated (default {_DEFAULT_SIZES})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=5000,
        help="events per batch, for the rebuild and the ceiling (default 5000)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="rebuild once more under py-spy and report where the time went",
    )
    summary.add_outputs(parser, "rebuild")
    parser.add_argument("--child", choices=("scan", "rebuild"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return options


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout holds the report alone.
    print(message, file=sys.stderr, flush=True)


# The measured processes ------------------------------------------------------


class ChildResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one measured process reports about itself."""

    task: str
    events: int
    streams: int
    """Streams counted (ceiling) or item rows written (rebuild)."""
    seconds: float
    cpu_seconds: float
    """CPU time of the process itself inside the measured part."""
    postgres_cores: float
    """Cores used by all PostgreSQL processes meanwhile."""
    rss_before: int
    """Resident memory when the measured part began, in bytes."""
    rss_peak: int
    """Peak resident memory of the process over its life, in bytes."""
    failure: str | None = None

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cores(self) -> float:
        """Cores the process used while measured."""
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0


class _Body(msgspec.Struct):
    status: str
    order_url: str | None = None


async def _scan(connection: Connection, batch_size: int) -> tuple[int, int, str]:
    """Read the whole log, decode every body and count events per stream."""
    decode = msgspec.json.Decoder(_Body).decode
    per_stream: dict[tuple[str, str, str], int] = {}
    events = after = 0
    while rows := await connection.fetch(_SCAN, after, batch_size):
        for row in rows:
            decode(row["raw_body"])
            stream = (row["mode"], row["order_id"], row["upc"])
            per_stream[stream] = per_stream.get(stream, 0) + 1
        events += len(rows)
        after = rows[-1]["position"]
    return events, len(per_stream), ""


async def _discard_unfinished(connection: Connection) -> None:
    # A build left by an earlier run on this database (the measured one,
    # before a profiled one) would be resumed, finished, in no time.
    rows = await connection.fetch(
        "SELECT version, table_name FROM projections "
        "WHERE name = $1 AND state = 'building'",
        PROJECTION_NAME,
    )
    for row in rows:
        async with connection.transaction():
            await connection.execute(
                "DELETE FROM projection_skips WHERE name = $1 AND version = $2",
                PROJECTION_NAME,
                row["version"],
            )
            await connection.execute(
                "DELETE FROM projections WHERE name = $1 AND version = $2",
                PROJECTION_NAME,
                row["version"],
            )
            await connection.execute(f'DROP TABLE IF EXISTS "{row["table_name"]}"')


async def _rebuild(connection: Connection, batch_size: int) -> tuple[int, int, str]:
    """Build a new version of the item view from the whole log.

    As ``ordertrail projections rebuild`` does, with a second connection
    that reads ahead while the first folds and writes.
    """
    record = await projection_rebuild.begin(connection, Vocabulary.default())
    reader = await connect(os.environ[_URL_VARIABLE])
    try:
        last = await projection_rebuild.build(
            connection, record, EventStore(), batch_size=batch_size, reader=reader
        )
    finally:
        await reader.close()
    failure = ""
    if last.failure is not None:
        failure = f"position {last.failure.event.position}: {last.failure.error}"
    # The events the checkpoint covers: all of them, if the build finished.
    built = await catalogue.find(connection, record.name, record.version)
    checkpoint = built.checkpoint if built is not None else Cursor()
    events = await connection.fetchval(
        "SELECT count(*) FROM events "
        "WHERE (transaction_id, position) <= ($1::text::xid8, $2)",
        str(checkpoint.transaction_id),
        checkpoint.position,
    )
    rows = await connection.fetchval(f'SELECT count(*) FROM "{record.table_name}"')
    return int(events), int(rows), failure


async def _child(task: str, batch_size: int) -> ChildResult:
    url = os.environ[_URL_VARIABLE]
    connection = await connect(url)
    try:
        if task == "rebuild":
            await projection_rebuild.rebuild_lock(connection)
            await _discard_unfinished(connection)
        pid = os.getpid()
        rss_before = memory_of(pid)
        before = sample_cpu(pid)
        started, cpu_started = time.perf_counter(), time.process_time()
        work = _rebuild if task == "rebuild" else _scan
        events, streams, failure = await work(connection, batch_size)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        usage = cpu_usage(before, sample_cpu(pid), seconds)
    finally:
        await connection.close()
    # Linux reports ru_maxrss in kilobytes.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ChildResult(
        task=task,
        events=events,
        streams=streams,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        postgres_cores=usage.postgres,
        rss_before=rss_before,
        rss_peak=peak,
        failure=failure or None,
    )


def child_main(task: str, batch_size: int) -> int:
    """Run one measured task and print its result as one JSON line."""
    configure_logging("warning", "console")
    result = asyncio.run(_child(task, batch_size))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    return 0


async def run_child(
    task: str, url: str, batch_size: int, profile: Path | None = None
) -> ChildResult:
    """Run a measured task in a process of its own; return what it reported."""
    command = [
        sys.executable, "-m", "ordertrail.bench.rebuild",
        "--child", task, "--batch-size", str(batch_size),
    ]  # fmt: skip
    if profile is not None:
        command = [
            py_spy(), "record", "--format", "raw", "--idle", "--rate", "200",
            "--output", str(profile), "--", *command,
        ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command,
        env={**os.environ, _URL_VARIABLE: url},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    # py-spy, when it wraps the process, writes its own lines to stdout too.
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        msg = (
            f"the {task} process failed ({process.returncode}): {err.decode()[-2000:]}"
        )
        raise RuntimeError(msg)
    return msgspec.json.decode(lines[-1], type=ChildResult)


# The parent: generate, measure, compare ---------------------------------------


@dataclass(frozen=True)
class SizeResult:
    """Everything measured on one log size."""

    log: GeneratedLog
    chains: ChainCheck
    streams: int
    ceilings: tuple[ChildResult, ChildResult]
    """The ceiling measured before and after the rebuild."""
    rebuild: ChildResult
    profiled: ChildResult | None = None
    profile: StackSummary | None = None
    profile_path: Path | None = None

    @property
    def ceiling_rate(self) -> float:
        """The mean of the two ceilings' rates."""
        return sum(c.rate for c in self.ceilings) / len(self.ceilings)

    @property
    def ceiling_cores(self) -> float:
        """Cores the ceiling's process used, on average."""
        return sum(c.cores for c in self.ceilings) / len(self.ceilings)

    @property
    def ceiling_rss(self) -> int:
        """The larger of the two ceilings' peak resident memory."""
        return max(c.rss_peak for c in self.ceilings)

    @property
    def ratio(self) -> float:
        """The rebuild's rate over the ceiling's."""
        ceiling = self.ceiling_rate
        return self.rebuild.rate / ceiling if ceiling else 0.0

    @property
    def passed(self) -> bool:
        """Whether the log held and every process saw all of it."""
        return (
            self.chains.passed
            and self.rebuild.failure is None
            and all(c.events == self.log.events for c in self.ceilings)
            and all(c.streams == self.streams for c in self.ceilings)
            and self.rebuild.events == self.log.events
            and self.rebuild.streams == self.streams
        )


async def measure_size(
    server_url: str, events: int, options: argparse.Namespace
) -> tuple[SizeResult, str]:
    """Generate a log of ``events`` on a fresh database and measure both tasks.

    Returns the result and the server's version.
    """
    async with bench_database(server_url) as database:
        _progress(f"{events:,} events: database {describe_url(database.url)}")
        connection = await connect(database.url)
        try:
            generated = await generate_log(connection, LogShape(events=events))
            _progress(
                f"  generated in {generated.seconds:.1f} s "
                f"({generated.rate:,.0f} events/s)"
            )
            chains = await check_chains(connection)
            streams = int(
                await connection.fetchval(
                    "SELECT count(*) FROM events WHERE version = 1"
                )
            )
        finally:
            await connection.close()

        _progress("  ceiling: reading, decoding and counting the log")
        before = await run_child("scan", database.url, options.batch_size)
        _progress(f"    {before.rate:,.0f} events/s; rebuilding")
        rebuilt = await run_child("rebuild", database.url, options.batch_size)
        _progress(f"    {rebuilt.rate:,.0f} events/s; the ceiling again")
        after = await run_child("scan", database.url, options.batch_size)
        _progress(f"    {after.rate:,.0f} events/s")
        ceilings = (before, after)
        result = SizeResult(generated, chains, streams, ceilings, rebuilt)
        if options.profile:
            path = options.markdown.with_name(f"rebuild-profile-{events}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            _progress(f"  rebuilding again under py-spy into {path}")
            profiled = await run_child(
                "rebuild", database.url, options.batch_size, profile=path
            )
            result = SizeResult(
                generated,
                chains,
                streams,
                ceilings,
                rebuilt,
                profiled,
                summarize(path),
                path,
            )
        return result, database.server_version


@dataclass
class RebuildReport:
    """Everything a run prints and writes."""

    machine: Machine
    database: str
    batch_size: int
    sizes: list[SizeResult]

    @property
    def passed(self) -> bool:
        """Whether every size's checks passed."""
        return all(size.passed for size in self.sizes)

    def _table(self) -> list[list[str]]:
        rows = [
            [
                "events",
                "items",
                "ceiling ev/s",
                "rebuild ev/s",
                "ratio",
                "rebuild s",
                "rebuild CPU",
                "postgres",
                "ceiling CPU",
                "RSS before",
                "peak RSS",
                "ceiling peak RSS",
            ]
        ]
        for size in self.sizes:
            r = size.rebuild
            rates = " / ".join(f"{c.rate:,.0f}" for c in size.ceilings)
            rows.append(
                [
                    f"{size.log.events:,}",
                    f"{size.streams:,}",
                    f"{size.ceiling_rate:,.0f} ({rates})",
                    f"{r.rate:,.0f}",
                    f"{size.ratio:.2f}",
                    f"{r.seconds:,.1f}",
                    f"{r.cores:.2f}",
                    f"{r.postgres_cores:.2f}",
                    f"{size.ceiling_cores:.2f}",
                    summary.megabytes(r.rss_before),
                    summary.megabytes(r.rss_peak),
                    summary.megabytes(size.ceiling_rss),
                ]
            )
        return rows

    def _targets(self) -> list[str]:
        lines = []
        for size in self.sizes:
            rate, ratio = size.rebuild.rate, size.ratio
            lines.append(
                f"{size.log.events:,} events: {rate:,.0f} events/s "
                f"({'met' if rate >= EVENTS_TARGET else 'below'} the "
                f"{EVENTS_TARGET:,} target), {ratio:.2f} of the ceiling "
                f"({'met' if ratio >= CEILING_TARGET else 'below'} the 1/3 target)"
            )
        growth = self.memory_growth()
        if growth is not None:
            smallest, largest = self.sizes[0], self.sizes[-1]
            lines.append(
                f"peak RSS {summary.megabytes(smallest.rebuild.rss_peak)} at "
                f"{smallest.log.events:,} events, "
                f"{summary.megabytes(largest.rebuild.rss_peak)} at "
                f"{largest.log.events:,}: x{growth:.2f} "
                f"({'flat' if growth <= FLAT_MEMORY else 'GROWS with the log'})"
            )
        return lines

    def memory_growth(self) -> float | None:
        """The largest log's peak RSS over the smallest's, with two sizes or more."""
        if len(self.sizes) < 2 or not self.sizes[0].rebuild.rss_peak:
            return None
        return self.sizes[-1].rebuild.rss_peak / self.sizes[0].rebuild.rss_peak

    def _checks(self) -> list[str]:
        lines = []
        for size in self.sizes:
            chains = "ok" if size.chains.passed else "BROKEN"
            ceiling = size.ceilings[0]
            lines.append(
                f"{size.log.events:,} events: hash chains of "
                f"{size.chains.streams:,} random streams: {chains}; ceiling read "
                f"{ceiling.events:,} events of {ceiling.streams:,} "
                f"streams; rebuild reached {size.rebuild.events:,} events, wrote "
                f"{size.rebuild.streams:,} item rows for {size.streams:,} streams: "
                f"{'ok' if size.passed else 'MISMATCH'}"
            )
            if size.rebuild.failure is not None:
                lines.append(f"  the rebuild stopped at {size.rebuild.failure}")
        return lines

    def _logs(self) -> list[str]:
        return [
            f"{size.log.events:,} events, {size.streams:,} items in "
            f"{size.log.orders:,} orders, {size.log.redeliveries / size.log.events:.1%}"
            f" redeliveries, {size.log.test_events / size.log.events:.1%} test mode,"
            f" {size.log.transactions:,} transactions; generated in "
            f"{size.log.seconds:.1f} s ({size.log.rate:,.0f} events/s)"
            for size in self.sizes
        ]

    def _header(self) -> list[tuple[str, str]]:
        return [
            *machine_lines(self.machine),
            ("database", self.database),
            (
                "ceiling",
                "read every event in position order, keyset batches of "
                f"{self.batch_size:,}, the runner's columns; msgspec-decode each "
                "body; count events per stream in a dict",
            ),
            (
                "rebuild",
                "ordertrail.projections.rebuild.begin + build into a new version "
                f"(batches of {self.batch_size:,}), in its own process",
            ),
        ]

    def _profiles(self) -> list[tuple[str, list[str]]]:
        return [
            (
                f"{size.log.events:,} events, profiled rebuild "
                f"({size.profiled.rate:,.0f} events/s under py-spy; raw stacks in "
                f"{size.profile_path})",
                size.profile.lines(within=_PROFILED_CODE),
            )
            for size in self.sizes
            if size.profile is not None and size.profiled is not None
        ]

    def text(self) -> str:
        """Return the report as aligned plain text."""
        lines = ["ordertrail rebuild benchmark", ""]
        lines += [f"  {name:<9} {value}" for name, value in self._header()]
        lines += ["", "logs", *(f"  {line}" for line in self._logs())]
        lines += ["", *aligned(self._table()), "", _LEGEND, ""]
        lines += ["targets", *(f"  {line}" for line in self._targets())]
        lines += ["", "correctness", *(f"  {line}" for line in self._checks())]
        for title, profile in self._profiles():
            lines += ["", title, *(f"  {line}" for line in profile)]
        return "\n".join(lines)

    def markdown(self) -> str:
        """Return the report as markdown."""
        lines = ["# ordertrail rebuild benchmark", ""]
        lines += [f"- **{name}**: {value}" for name, value in self._header()]
        lines += ["", "## Logs", "", *(f"- {line}" for line in self._logs())]
        lines += ["", *markdown_table(self._table()), "", _LEGEND, ""]
        lines += ["## Targets", "", *(f"- {line}" for line in self._targets())]
        lines += ["", "## Correctness", "", *(f"- {line}" for line in self._checks())]
        for title, profile in self._profiles():
            lines += ["", f"## {title}", "", "```", *profile, "```"]
        return "\n".join(lines) + "\n"

    def summary_rows(self) -> list[summary.SummaryRow]:
        """Return the headline figures for the summary table."""
        rows = [
            summary.SummaryRow(
                figure=f"rebuild, {size.log.events:,} events, events/s",
                value=f"{size.rebuild.rate:,.0f}",
                ceiling="scan + msgspec decode + dict fold",
                ceiling_value=f"{size.ceiling_rate:,.0f}",
                ratio=f"{size.ratio:.2f}",
                target=f">= 0.33 and >= {EVENTS_TARGET:,}/s",
                peak_rss=summary.megabytes(size.rebuild.rss_peak),
            )
            for size in self.sizes
        ]
        growth = self.memory_growth()
        if growth is not None:
            smallest, largest = self.sizes[0], self.sizes[-1]
            rows.append(
                summary.SummaryRow(
                    figure=f"rebuild peak RSS, {largest.log.events:,} events",
                    value=summary.megabytes(largest.rebuild.rss_peak),
                    ceiling=f"the same at {smallest.log.events:,} events",
                    ceiling_value=summary.megabytes(smallest.rebuild.rss_peak),
                    ratio=f"{growth:.2f}",
                    target=f"<= {FLAT_MEMORY:.2f} (flat)",
                    peak_rss=summary.megabytes(largest.rebuild.rss_peak),
                )
            )
        return rows


_LEGEND = "\n".join(
    [
        "ceiling, rebuild ev/s: events read (and, for the rebuild, applied) a "
        "second; the ceiling is the mean of",
        "its runs before and after the rebuild (in brackets). ratio: rebuild over "
        "ceiling.",
        "rebuild CPU, postgres, ceiling CPU: cores used by the rebuilding process, "
        "by all PostgreSQL",
        "processes meanwhile, and by the ceiling's process. RSS before: the "
        "rebuilding process's resident",
        "memory as it started building; peak RSS: its ru_maxrss. The ceiling's "
        "dict holds every stream,",
        "so its memory grows with the log; a rebuild's should not.",
        "The rebuild's first phase reads the log in stream order (mode, order, "
        "UPC, version) through the",
        "unique index, the ceiling in position order: PostgreSQL's side of the "
        "two is not the same work.",
    ]
)


async def benchmark(options: argparse.Namespace) -> RebuildReport:
    """Measure every log size on one server; each size gets its own database."""
    async with find_server() as (server_url, source):
        sizes, version = [], ""
        for events in options.events:
            size, version = await measure_size(server_url, events, options)
            sizes.append(size)
        return RebuildReport(
            machine=describe_machine(version),
            database=(
                f"{describe_url(server_url)} ({source}), one database per log "
                "size, created for it and dropped after it"
            ),
            batch_size=options.batch_size,
            sizes=sizes,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print and write the report.

    Returns 0, 1 if a correctness check failed, or 2 if the run could not be
    set up (no database, a process that failed).
    """
    options = parse_arguments(argv)
    if options.child is not None:
        return child_main(options.child, options.batch_size)
    configure_logging("warning", "console")
    try:
        report = asyncio.run(benchmark(options))
    except (OSError, RuntimeError, asyncpg.PostgresError) as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 2

    summary.publish(
        options,
        "rebuild",
        text=report.text(),
        markdown=report.markdown(),
        machine=report.machine,
        rows=report.summary_rows(),
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
