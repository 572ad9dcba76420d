"""The benchmarks' summary table and the growth benchmark's verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ordertrail.bench import summary
from ordertrail.bench.growth import Comparison


def _write(results: Path, benchmark: str, figure: str) -> None:
    summary.write(
        results / f"{benchmark}.json",
        benchmark,
        "2 cores, test CPU, commit abc1234",
        [
            summary.SummaryRow(
                figure=figure,
                value="1,000",
                ceiling="a ceiling",
                ceiling_value="2,000",
                ratio="0.50",
                peak_rss="90 MB",
            )
        ],
    )


def test_the_summary_lists_growth_when_it_ran_and_misses_nothing_when_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for benchmark in summary.BENCHMARKS:
        _write(tmp_path, benchmark, f"{benchmark} figure")

    assert summary.main(["--results", str(tmp_path)]) == 0
    without = (tmp_path / "summary.md").read_text()
    assert "| growth |" not in without
    assert "- growth:" not in without
    assert "no results" not in without

    _write(tmp_path, "growth", "ingest accepted/s, long log")
    assert summary.main(["--results", str(tmp_path)]) == 0
    table = (tmp_path / "summary.md").read_text()
    assert "| growth | ingest accepted/s, long log |" in table
    assert "90 MB" in table
    assert "2 cores, test CPU, commit abc1234" in table
    capsys.readouterr()


def test_the_summary_names_a_missing_benchmark_and_fails(tmp_path: Path) -> None:
    _write(tmp_path, "ingest", "ingest figure")

    assert summary.main(["--results", str(tmp_path)]) == 1
    table = (tmp_path / "summary.md").read_text()
    assert "read: no results (run it first)" in table
    assert "rebuild: no results (run it first)" in table


@pytest.mark.parametrize(
    ("empty", "long", "higher_is_better", "passed"),
    [
        (1000.0, 800.0, True, True),  # a rate keeping 80%
        (1000.0, 790.0, True, False),
        (1000.0, 1500.0, True, True),  # faster on the long log is no failure
        (40.0, 48.0, False, True),  # a p99 at 120%
        (40.0, 48.5, False, False),
        (40.0, 20.0, False, True),
    ],
)
def test_the_long_log_may_fall_behind_by_a_fifth_at_most(
    empty: float, long: float, *, higher_is_better: bool, passed: bool
) -> None:
    comparison = Comparison("figure", empty, long, higher_is_better)
    assert comparison.passed is passed
