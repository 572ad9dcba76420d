"""Figures of a benchmark run, pooled per target, as text and as markdown.

``Report`` is the ingest benchmark's; the table of measurements, its legend
and the text and markdown helpers serve the other benchmarks too.
"""

from __future__ import annotations

import array
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from ordertrail.bench.load import LoadResult
from ordertrail.bench.machine import CpuUsage, Machine

__all__ = [
    "MEASUREMENT_COLUMNS",
    "MEASUREMENT_LEGEND",
    "Check",
    "Measurement",
    "Report",
    "aligned",
    "machine_lines",
    "markdown_row",
    "markdown_table",
    "measurement_rows",
    "percentile",
]


def percentile(ordered: Sequence[int], fraction: float) -> int:
    """Return the nearest-rank percentile of an ascending sequence (0 if empty)."""
    if not ordered:
        return 0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Measurement:
    """One target's figures, pooled over every round it ran."""

    target: str
    window: float
    accepted: int
    p50_ms: float
    p99_ms: float
    errors: int
    rejected: Counter[int]
    client_cores: float
    cpu: CpuUsage

    @classmethod
    def pool(
        cls, target: str, runs: Sequence[tuple[LoadResult, CpuUsage]]
    ) -> Measurement:
        """Pool rounds: counts add up, latencies merge, CPU is time-weighted."""
        window = sum(result.window for result, _ in runs)
        latencies: array.array[int] = array.array("q")
        rejected: Counter[int] = Counter()
        for result, _ in runs:
            latencies.extend(result.latencies_ns)
            rejected.update(result.rejected)
        ordered = sorted(latencies)
        # Rounds of unequal length weigh by their length.
        shares = [(r.window / window, cpu) for r, cpu in runs] if window > 0 else []

        return cls(
            target=target,
            window=window,
            accepted=sum(result.accepted for result, _ in runs),
            p50_ms=percentile(ordered, 0.50) / 1e6,
            p99_ms=percentile(ordered, 0.99) / 1e6,
            errors=sum(result.errors for result, _ in runs),
            rejected=rejected,
            client_cores=(
                sum(result.client_cpu for result, _ in runs) / window if window else 0.0
            ),
            cpu=CpuUsage(
                server=sum(w * cpu.server for w, cpu in shares),
                loop=sum(w * cpu.loop for w, cpu in shares),
                loop_waiting=sum(w * cpu.loop_waiting for w, cpu in shares),
                postgres=sum(w * cpu.postgres for w, cpu in shares),
                machine=sum(w * cpu.machine for w, cpu in shares),
                pressure=sum(w * cpu.pressure for w, cpu in shares),
            ),
        )

    @property
    def throughput(self) -> float:
        """Accepted requests per second."""
        return self.accepted / self.window if self.window > 0 else 0.0

    @property
    def server_us_per_request(self) -> float:
        """Server CPU microseconds spent per accepted request."""
        if self.accepted == 0:
            return 0.0
        return self.cpu.server * self.window / self.accepted * 1e6


@dataclass(frozen=True)
class Check:
    """A correctness check: rows stored against 2xx answers received."""

    target: str
    table: str
    stored: int
    accepted: int
    unanswered: int

    @property
    def passed(self) -> bool:
        """Whether every 2xx is stored and nothing else is.

        A request whose answer never came may or may not have been stored, so
        each one widens the accepted range by one.
        """
        return self.accepted <= self.stored <= self.accepted + self.unanswered


@dataclass(frozen=True)
class Ratio:
    """ordertrail's figures over a reference's."""

    reference: str
    throughput: float
    p99: float


@dataclass
class Report:
    """Everything a run prints and writes."""

    machine: Machine
    database: str
    server_command: str
    applications: str
    connections: int
    warmup: float
    seconds: float
    rounds: int
    workload: str
    measurements: list[Measurement]
    subject: str
    checks: list[Check] = field(default_factory=list)
    commits: int = 0
    """Transactions that appended the subject's events (0: not counted)."""
    peak_rss: dict[str, int] = field(default_factory=dict)
    """Peak resident memory of each server's process tree, in bytes."""

    @property
    def passed(self) -> bool:
        """Whether every check passed and every target accepted something."""
        return all(check.passed for check in self.checks) and all(
            m.accepted > 0 for m in self.measurements
        )

    def ratios(self) -> list[Ratio]:
        """Return the subject's throughput and p99 over each other target's."""
        subject = next(m for m in self.measurements if m.target == self.subject)
        return [
            Ratio(
                reference.target,
                _ratio(subject.throughput, reference.throughput),
                _ratio(subject.p99_ms, reference.p99_ms),
            )
            for reference in self.measurements
            if reference is not subject
        ]

    def _header(self) -> list[tuple[str, str]]:
        rounds = f", {self.rounds} rounds interleaved" if self.rounds > 1 else ""
        return [
            *machine_lines(self.machine),
            ("servers", f"{self.server_command}, the same for every target"),
            ("apps", self.applications),
            ("database", self.database),
            (
                "load",
                f"{self.connections} keep-alive connections, one request in flight "
                f"on each, {self.warmup:g} s warm-up, then {self.seconds:g} s per "
                f"target{rounds}",
            ),
            ("workload", self.workload),
        ]

    def _rows(self) -> list[list[str]]:
        return measurement_rows(self.measurements)

    def _notes(self) -> list[str]:
        notes = []
        stored = next((c.stored for c in self.checks if c.target == self.subject), 0)
        if self.commits:
            notes.append(
                f"group commit: {stored:,} events in {self.commits:,} transactions, "
                f"{stored / self.commits:.1f} deliveries per commit on average"
            )
        if self.peak_rss:
            sizes = ", ".join(
                f"{name} {size / 1e6:,.0f} MB" for name, size in self.peak_rss.items()
            )
            notes.append(f"peak RSS of the server process trees: {sizes}")
        for m in self.measurements:
            if m.rejected:
                statuses = ", ".join(
                    f"{count:,} x {status}"
                    for status, count in sorted(m.rejected.items())
                )
                notes.append(f"{m.target} answered {statuses}")
            if m.client_cores > _CLIENT_CORES_WARNING:
                notes.append(
                    f"the load generator used {m.client_cores:.2f} cores during "
                    f"{m.target}; it may have held that target back"
                )
        return notes

    def text(self) -> str:
        """Return the report as aligned plain text."""
        lines = ["ordertrail ingest benchmark", ""]
        lines += [f"  {name:<9} {value}" for name, value in self._header()]
        lines += ["", *aligned([_COLUMNS, *self._rows()]), ""]
        lines.append(_LEGEND)
        lines += ["", f"ratios ({_RATIO_LEGEND})"]
        for ratio in self.ratios():
            lines.append(
                f"  {self.subject} / {ratio.reference:<26} "
                f"throughput {ratio.throughput:5.2f}   p99 {ratio.p99:5.2f}"
            )
        lines += ["", "correctness"]
        lines += [f"  {_describe(check)}" for check in self.checks]
        notes = self._notes()
        if notes:
            lines += ["", "notes", *(f"  {note}" for note in notes)]
        return "\n".join(lines)

    def markdown(self) -> str:
        """Return the report as markdown."""
        lines = ["# ordertrail ingest benchmark", ""]
        lines += [f"- **{name}**: {value}" for name, value in self._header()]
        lines += ["", *markdown_table([_COLUMNS, *self._rows()])]
        lines += ["", _LEGEND, "", "## Ratios", "", _RATIO_LEGEND, ""]
        lines.append(markdown_row(["ratio", "throughput", "p99"]))
        lines.append(markdown_row(["---", "--:", "--:"]))
        for ratio in self.ratios():
            lines.append(
                markdown_row(
                    [
                        f"{self.subject} / {ratio.reference}",
                        f"{ratio.throughput:.2f}",
                        f"{ratio.p99:.2f}",
                    ]
                )
            )
        lines += ["", "## Correctness", ""]
        lines += [f"- {_describe(check)}" for check in self.checks]
        notes = self._notes()
        if notes:
            lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
        return "\n".join(lines) + "\n"


MEASUREMENT_COLUMNS = [
    "target",
    "accepted/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "µs/req",
    "server",
    "loop run",
    "loop wait",
    "postgres",
    "client",
    "machine",
    "pressure",
]

MEASUREMENT_LEGEND = "\n".join(
    [
        "accepted/s: 2xx answers per second. p50, p99: send-to-response latency of "
        "2xx answers.",
        "errors: non-2xx answers and failed requests. µs/req: server CPU time per "
        "accepted request.",
        "server, postgres, client, machine: CPU cores in use (1.00 is one core "
        "busy) by the granian",
        "process tree, PostgreSQL (for webhooks: the run's own database's "
        "backends and the server's",
        "shared processes; otherwise every postgres process), this load "
        "generator, everything.",
        "loop run, loop wait: share of the time the server's busiest thread (its "
        "event loop) ran,",
        "and was ready to run but had no CPU; the nearer 100% together, the more "
        "the loop limits.",
        "pressure: share of the time some task waited for a CPU, whether a "
        "neighbour's or the",
        "target's own (its server, PostgreSQL backends and this generator share "
        "the cores).",
    ]
)

_COLUMNS = MEASUREMENT_COLUMNS
_LEGEND = MEASUREMENT_LEGEND

# Past half a core, on a two-core machine, the generator competes with the
# server for CPU enough to move the figures.
_CLIENT_CORES_WARNING = 0.5

_RATIO_LEGEND = "throughput above 1 and p99 below 1 mean ordertrail is ahead"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def machine_lines(machine: Machine) -> list[tuple[str, str]]:
    """Return the machine and software a run measured, as (name, value) lines."""
    return [
        ("machine", f"{machine.cores} cores (nproc), {machine.cpu_model}"),
        (
            "software",
            f"Python {machine.python}, PostgreSQL {machine.postgresql}, "
            f"granian {machine.granian}, litestar {machine.litestar}, "
            f"asyncpg {machine.asyncpg}",
        ),
        ("code", f"ordertrail at commit {machine.code}"),
    ]


def measurement_rows(measurements: Sequence[Measurement]) -> list[list[str]]:
    """Return one table row per measurement, under ``MEASUREMENT_COLUMNS``."""
    return [
        [
            m.target,
            f"{m.throughput:,.0f}",
            f"{m.p50_ms:.2f}",
            f"{m.p99_ms:.2f}",
            f"{m.errors:,}",
            f"{m.server_us_per_request:,.0f}",
            f"{m.cpu.server:.2f}",
            f"{m.cpu.loop:.0%}",
            f"{m.cpu.loop_waiting:.0%}",
            f"{m.cpu.postgres:.2f}",
            f"{m.client_cores:.2f}",
            f"{m.cpu.machine:.2f}",
            f"{m.cpu.pressure:.0%}",
        ]
        for m in measurements
    ]


def markdown_table(
    rows: Sequence[Sequence[str]], left: Collection[int] = (0,)
) -> list[str]:
    """Return a markdown table headed by the first row.

    Columns numbered in ``left`` (text) align left, the others (figures) right.
    """
    header, *body = rows
    return [
        markdown_row(header),
        markdown_row(["---" if i in left else "--:" for i in range(len(header))]),
        *(markdown_row(row) for row in body),
    ]


def aligned(rows: Sequence[Sequence[str]], left: Collection[int] = (0,)) -> list[str]:
    """Return rows as text columns; those numbered in ``left`` align left."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def markdown_row(cells: Sequence[str]) -> str:
    """Return one markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _describe(check: Check) -> str:
    verdict = "ok" if check.passed else "MISMATCH"
    unanswered = (
        f" ({check.unanswered:,} requests unanswered)" if check.unanswered else ""
    )
    return (
        f"{check.target}: {check.stored:,} rows in {check.table}, "
        f"{check.accepted:,} deliveries answered 2xx{unanswered}: {verdict}"
    )
