"""Webhook ingest throughput and latency, against ceilings measured alongside.

Run with ``python -m ordertrail.bench.ingest`` (``make bench``). In one run,
on one fresh database, the same requests go to three targets served the same
way:

- ceiling, HTTP only: litestar and granian reading the body, no database;
- baseline, one INSERT: a minimal receiver committing each body on its own;
- ordertrail: ``POST /webhooks/locally`` with authentication, the hash chain,
  the item projection and group commit.

The machine is small and shared, so the report leads with ratios between
targets measured one after the other, rather than with absolute figures, and
shows where the CPU went. Afterwards, the rows stored are checked against the 2xx
answers received: a benchmark that lost acknowledged deliveries would only
be measuring a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from ordertrail.bench import summary
from ordertrail.bench.baseline import BASELINE_TABLE
from ordertrail.bench.database import (
    BenchDatabase,
    bench_database,
    count_rows,
    count_transactions,
    describe_url,
    find_server,
)
from ordertrail.bench.load import LoadResult, run_load
from ordertrail.bench.log import LogShape, build_served_view, generate_log
from ordertrail.bench.machine import (
    CpuSample,
    CpuUsage,
    cpu_usage,
    describe_machine,
    peak_memory,
    sample_cpu,
)
from ordertrail.bench.report import Check, Measurement, Report
from ordertrail.bench.servers import (
    GRANIAN_OPTIONS,
    HOST,
    Server,
    ServerFailed,
    serve,
    wait_ready,
)
from ordertrail.bench.workload import (
    ITEMS,
    STATUSES,
    UPCS_PER_ORDER,
    build_requests,
    webhook_bodies,
)
from ordertrail.db.connection import connect
from ordertrail.lib.logging import configure_logging

__all__ = ["Target", "benchmark", "main"]

SUBJECT = "ordertrail"
BASELINE = "baseline: one INSERT"
THROUGHPUT_TARGET = ">= 1.00"
"""ordertrail, with everything on, should accept as many as the one INSERT."""
P99_TARGET = "< 50 ms"
ORDERTRAIL_APP = "ordertrail.api.app:create_app"
BASELINE_APP = "ordertrail.bench.baseline:create_app"


@dataclass(frozen=True)
class Target:
    """One thing to load: a server and the path that receives the deliveries."""

    name: str
    server: Server
    path: str
    table: str | None
    """Where its accepted deliveries end up, to check the count against."""
    preloaded: int = 0
    """Rows the table held before the run."""


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m ordertrail.bench.ingest",
        description="Measure webhook ingest against ceilings measured in the same run.",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="measured seconds per target and round (default 10)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=64,
        help="concurrent keep-alive connections (default 64)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="unmeasured seconds before each measurement (default 2)",
    )
    parser.add_argument(
        "--log-events",
        type=int,
        default=100_000,
        help="events of a generated log in the service's database before the run "
        "(default 100,000; 0 for an empty database)",
    )
    # Three interleaved rounds by default: on this shared machine the ratio to
    # the one-INSERT handler moved between 0.79 and 0.99 from one run of a few
    # rounds to the next, and a single round catches a neighbour's burst whole.
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over all targets, interleaved to spread out noise (default 3)",
    )
    summary.add_outputs(parser, "ingest")
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.warmup < 0:
        parser.error("--seconds must be positive and --warmup not negative")
    if options.connections < 1 or options.rounds < 1:
        parser.error("--connections and --rounds must be at least 1")
    return options


def _progress(message: str) -> None:
    # Progress goes to stderr so that stdout holds the report alone.
    print(message, file=sys.stderr, flush=True)


async def measure(
    target: Target,
    requests: Sequence[bytes],
    options: argparse.Namespace,
    database: str | None = None,
    *,
    first: int = 0,
) -> tuple[LoadResult, CpuUsage]:
    """Load one target for one round; return its figures and the CPU it took.

    With ``database``, PostgreSQL's CPU is that of its backends (and of the
    server's shared processes) alone, not that of other databases' tests.
    The round sends ``requests`` from index ``first`` on (``LoadResult.sent``
    says how many it sent).
    """
    samples: list[tuple[float, CpuSample]] = []

    def sample() -> None:
        pid = target.server.process.pid
        samples.append((time.perf_counter(), sample_cpu(pid, database)))

    result = await run_load(
        HOST,
        target.server.port,
        requests,
        connections=options.connections,
        warmup=options.warmup,
        seconds=options.seconds,
        on_window_open=sample,
        on_window_close=sample,
        first=first,
    )
    (opened, before), (closed, after) = samples
    return result, cpu_usage(before, after, closed - opened)


async def _check(
    database: BenchDatabase, target: Target, runs: list[tuple[LoadResult, CpuUsage]]
) -> Check:
    assert target.table is not None
    return Check(
        target=target.name,
        table=target.table,
        stored=await count_rows(database.url, target.table) - target.preloaded,
        accepted=sum(result.total_accepted for result, _ in runs),
        unanswered=sum(result.unanswered for result, _ in runs),
    )


async def _preload(database: BenchDatabase, events: int) -> tuple[int, int]:
    """Give the service's database a log, as a database in service has.

    A fresh database has empty tables and no statistics: PostgreSQL's plans
    for the service's joins, made and kept by the prepared statements while
    the tables are empty, go on scanning them whole as they grow, until the
    autovacuum analyses them a minute later. Measuring that first minute
    would measure the planner's guess, not the service. The generated log is
    analysed, and its item view built as a rebuild builds it.

    Returns the events and the transactions that wrote them.
    """
    if events <= 0:
        return 0, 0
    _progress(f"loading a generated log of {events:,} events")
    connection = await connect(database.url)
    reader = await connect(database.url)
    try:
        generated = await generate_log(connection, LogShape(events=events))
        await build_served_view(connection, reader)
    finally:
        await reader.close()
        await connection.close()
    return generated.events, generated.transactions


async def benchmark(options: argparse.Namespace) -> Report:
    """Set up, measure every target, check what was stored, and tear down."""
    async with contextlib.AsyncExitStack() as stack:
        server_url, source = await stack.enter_async_context(find_server())
        database = await stack.enter_async_context(bench_database(server_url))
        _progress(f"database {describe_url(database.url)} ({source})")
        preloaded, preloading = await _preload(database, options.log_events)

        environment = {
            "ORDERTRAIL_DATABASE_URL": database.url,
            # As in service: every accepted delivery writes its log line (to
            # the server's log file), and the figures include its cost.
            "ORDERTRAIL_LOG_LEVEL": "info",
        }
        ordertrail = stack.enter_context(
            serve("ordertrail", ORDERTRAIL_APP, environment)
        )
        baseline = stack.enter_context(serve("baseline", BASELINE_APP, environment))
        await asyncio.gather(
            wait_ready(ordertrail, "/health/ready"),
            wait_ready(baseline, "/health/live"),
        )

        targets = [
            Target("ceiling: HTTP only", baseline, "/http-only", None),
            Target(BASELINE, baseline, "/webhooks/locally", BASELINE_TABLE),
            Target(SUBJECT, ordertrail, "/webhooks/locally", "events", preloaded),
        ]
        bodies = webhook_bodies()
        requests = {
            target.name: build_requests(
                bodies, host=HOST, port=target.server.port, path=target.path,
                token=database.token,
            )
            for target in targets
        }  # fmt: skip
        runs: dict[str, list[tuple[LoadResult, CpuUsage]]] = {
            target.name: [] for target in targets
        }
        # Each round takes up where the target's last one stopped: starting
        # over would send the same bodies again within the redelivery window,
        # and measure retries instead of the new deliveries that most are.
        sent = dict.fromkeys(runs, 0)
        for round_number in range(1, options.rounds + 1):
            for target in targets:
                _progress(f"round {round_number}/{options.rounds}: {target.name}")
                result, usage = await measure(
                    target,
                    requests[target.name],
                    options,
                    database.name,
                    first=sent[target.name],
                )
                sent[target.name] += result.sent
                runs[target.name].append((result, usage))

        checks = [
            await _check(database, target, runs[target.name])
            for target in targets
            if target.table is not None
        ]
        return Report(
            machine=describe_machine(database.server_version),
            database=(
                f"{describe_url(database.url)} ({source}), created for this run "
                f"and dropped after it; it held a generated log of {preloaded:,} "
                "events, analysed, with its item view, before the first delivery"
            ),
            server_command=f"granian {' '.join(GRANIAN_OPTIONS)}",
            applications=f"{SUBJECT}: {ORDERTRAIL_APP}, the others: {BASELINE_APP}",
            connections=options.connections,
            warmup=options.warmup,
            seconds=options.seconds,
            rounds=options.rounds,
            workload=(
                f"{ITEMS:,} items in carts of {UPCS_PER_ORDER}, statuses "
                f"{', '.join(STATUSES)} in turn; the same bodies for every target"
            ),
            measurements=[
                Measurement.pool(target.name, runs[target.name]) for target in targets
            ],
            subject=SUBJECT,
            checks=checks,
            commits=await count_transactions(database.url) - preloading,
            peak_rss={
                SUBJECT: peak_memory(ordertrail.process.pid),
                "baseline": peak_memory(baseline.process.pid),
            },
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print and write the report.

    Returns 0, 1 if a correctness check failed, or 2 if the run could not be
    set up (no database, a server that would not start).
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
        "ingest",
        text=report.text(),
        markdown=report.markdown(),
        machine=report.machine,
        rows=summary_rows(report),
    )
    return 0 if report.passed else 1


def summary_rows(report: Report) -> list[summary.SummaryRow]:
    """Return the headline figures for the summary table.

    Throughput stands beside each ceiling; the p99 to the 202 beside the
    one-INSERT handler's, whose rate ordertrail is to match.
    """
    subject = next(m for m in report.measurements if m.target == report.subject)
    references = [m for m in report.measurements if m is not subject]
    rss = report.peak_rss.get(report.subject)
    peak = summary.megabytes(rss) if rss else ""
    rows = [
        summary.SummaryRow(
            figure=f"{report.subject} webhooks accepted/s",
            value=f"{subject.throughput:,.0f}",
            ceiling=ratio.reference,
            ceiling_value=f"{reference.throughput:,.0f}",
            ratio=f"{ratio.throughput:.2f}",
            target=THROUGHPUT_TARGET if reference.target == BASELINE else "",
            peak_rss=peak,
        )
        for ratio, reference in zip(report.ratios(), references, strict=True)
    ]
    baseline = next((m for m in references if m.target == BASELINE), None)
    if baseline is not None:
        rows.append(
            summary.SummaryRow(
                figure=f"{report.subject} p99 to the 202, ms",
                value=f"{subject.p99_ms:.1f}",
                ceiling=BASELINE,
                ceiling_value=f"{baseline.p99_ms:.1f}",
                ratio=f"{subject.p99_ms / baseline.p99_ms:.2f}"
                if baseline.p99_ms > 0
                else "",
                target=P99_TARGET,
                peak_rss=peak,
            )
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
