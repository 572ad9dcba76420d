"""Reading ``as_of``: a global position or an RFC 3339 timestamp, nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ordertrail.audit.history import InvalidAsOf, parse_as_of


@pytest.mark.parametrize(
    ("text", "position"), [("0", 0), ("1", 1), ("812", 812), (" 42 ", 42)]
)
def test_digits_are_a_position(text: str, position: int) -> None:
    as_of = parse_as_of(text)

    assert as_of.position == position
    assert as_of.moment is None
    assert as_of.text == text


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2025-03-01T12:00:00Z", datetime(2025, 3, 1, 12, tzinfo=UTC)),
        ("2025-03-01t12:00:00z", datetime(2025, 3, 1, 12, tzinfo=UTC)),
        (
            "2025-03-01T12:00:00.250+02:00",
            datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2))),
        ),
        (
            "2025-03-01 12:00:00-05:00",
            datetime(2025, 3, 1, 12, tzinfo=timezone(timedelta(hours=-5))),
        ),
        # A "+" sent unescaped in a query string arrives as a space.
        (
            "2025-03-01T12:00:00 01:00",
            datetime(2025, 3, 1, 12, tzinfo=timezone(timedelta(hours=1))),
        ),
    ],
)
def test_rfc3339_timestamps_are_moments(text: str, moment: datetime) -> None:
    as_of = parse_as_of(text)

    assert as_of.moment == moment
    assert as_of.position is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "-1",
        "1.5",
        "0x10",
        "2025-03-01",
        "2025-03-01T12:00:00",
        "2025-03-01T12:00Z",
        "2025-13-01T12:00:00Z",
        "99999999999999999999",
        "9223372036854775808",
    ],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(InvalidAsOf):
        parse_as_of(text)
