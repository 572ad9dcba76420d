"""One table of every benchmark's headline figures beside their ceilings.

Each benchmark writes, next to its markdown report, a small JSON file of
summary rows: a figure, the ceiling it was measured against in the same run,
their ratio, the target where there is one, and the peak resident memory of
the process measured. ``python -m ordertrail.bench.summary`` (the last step
of ``make bench``) gathers those files into ``bench-results/summary.md``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from ordertrail.bench.machine import Machine
from ordertrail.bench.report import aligned, markdown_table

__all__ = [
    "BENCHMARKS",
    "OPTIONAL",
    "SummaryFile",
    "SummaryRow",
    "add_outputs",
    "describe",
    "main",
    "megabytes",
    "publish",
    "write",
]

BENCHMARKS = ("ingest", "read", "rebuild")
"""The benchmarks ``make bench`` runs, in the order the summary lists them."""

OPTIONAL = ("growth",)
"""Benchmarks run on their own (``make bench-growth``), listed when present."""

# The columns of text; the others hold figures.
_TEXT_COLUMNS = (0, 1, 3, 6)
_COLUMNS = [
    "benchmark",
    "figure",
    "value",
    "same-run ceiling",
    "ceiling value",
    "ratio",
    "target",
    "peak RSS",
]


class SummaryRow(msgspec.Struct, frozen=True, kw_only=True):
    """One headline figure, formatted for reading."""

    figure: str
    value: str
    ceiling: str
    """What the figure is measured against, in the same run."""
    ceiling_value: str
    ratio: str
    target: str = ""
    peak_rss: str = ""
    """Peak resident memory of the process the figure is about."""


class SummaryFile(msgspec.Struct, frozen=True, kw_only=True):
    """The summary rows of one benchmark run."""

    benchmark: str
    finished_at: datetime
    machine: str
    rows: list[SummaryRow]


def megabytes(size: int) -> str:
    """Return a byte count as megabytes, fit for the peak RSS column."""
    return f"{size / 1e6:,.0f} MB"


def describe(machine: Machine) -> str:
    """Return where a run measured, in a few words: machine and commit."""
    return f"{machine.cores} cores, {machine.cpu_model}, commit {machine.code}"


def write(path: Path, benchmark: str, machine: str, rows: list[SummaryRow]) -> None:
    """Write one benchmark's summary rows as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = SummaryFile(
        benchmark=benchmark, finished_at=datetime.now(UTC), machine=machine, rows=rows
    )
    path.write_bytes(msgspec.json.format(msgspec.json.encode(summary)) + b"\n")


def add_outputs(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """Add the options naming where a benchmark writes its report and rows."""
    markdown = Path(f"bench-results/{benchmark}.md")
    rows = Path(f"bench-results/{benchmark}.json")
    parser.add_argument(
        "--markdown",
        type=Path,
        default=markdown,
        help=f"where to write the markdown report (default {markdown})",
    )
    parser.add_argument(
        "--summary",
        type=Path,
        default=rows,
        help=f"where to write the summary rows (default {rows})",
    )


def publish(
    options: argparse.Namespace,
    benchmark: str,
    *,
    text: str,
    markdown: str,
    machine: Machine,
    rows: list[SummaryRow],
) -> None:
    """Print a finished run, and write its markdown report and summary rows."""
    print(text)
    options.markdown.parent.mkdir(parents=True, exist_ok=True)
    options.markdown.write_text(markdown)
    write(options.summary, benchmark, describe(machine), rows)
    print(f"\nmarkdown written to {options.markdown}")


def _read(path: Path) -> SummaryFile | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=SummaryFile)
    except (OSError, msgspec.DecodeError):
        return None


def _table(files: list[SummaryFile]) -> list[list[str]]:
    return [
        [
            found.benchmark,
            row.figure,
            row.value,
            row.ceiling,
            row.ceiling_value,
            row.ratio,
            row.target,
            row.peak_rss,
        ]
        for found in files
        for row in found.rows
    ]


def render(files: list[SummaryFile], missing: list[str]) -> tuple[str, str]:
    """Return the summary as text and as markdown."""
    rows = [_COLUMNS, *_table(files)]
    runs = [
        f"{found.benchmark}: {found.finished_at:%Y-%m-%d %H:%M} UTC on {found.machine}"
        for found in files
    ]
    absent = [f"{name}: no results (run it first)" for name in missing]
    legend = (
        "Each ratio compares two figures measured one after the other in the same "
        "run, on the same machine; the absolute figures move with the machine's "
        "load, the ratios much less. Peak RSS is that of the process measured: "
        "the granian server tree of the service under test for HTTP figures "
        "(ingest, read, growth), the rebuilding process for a rebuild."
    )
    text = "\n".join(
        [
            "ordertrail benchmarks: summary",
            "",
            *aligned(rows, left=_TEXT_COLUMNS),
            "",
            *textwrap.wrap(legend, 88),
            "",
            *runs,
            *absent,
        ]
    )
    markdown = "\n".join(
        [
            "# ordertrail benchmarks: summary",
            "",
            *markdown_table(rows, left=_TEXT_COLUMNS),
            "",
            legend,
            "",
            *(f"- {line}" for line in [*runs, *absent]),
        ]
    )
    return text, markdown + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Gather the benchmarks' summary files into one markdown table.

    Returns 0, or 1 if a benchmark's results are missing.
    """
    parser = argparse.ArgumentParser(
        prog="python -m ordertrail.bench.summary",
        description="Gather the benchmarks' headline figures into one table.",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("bench-results"),
        help="where the benchmarks wrote their results (default bench-results)",
    )
    options = parser.parse_args(argv)

    files, missing = [], []
    for name in (*BENCHMARKS, *OPTIONAL):
        found = _read(options.results / f"{name}.json")
        if found is not None:
            files.append(found)
        elif name in BENCHMARKS:
            missing.append(name)
    text, markdown = render(files, missing)
    print(text)
    target = options.results / "summary.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(markdown)
    print(f"\nmarkdown written to {target}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
