"""The hash chain, checked against its written description byte for byte."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

from ordertrail.eventstore.hashing import (
    GENESIS,
    canonical,
    chain_hash,
    format_received_at,
)
from ordertrail.eventstore.records import EVENT_TYPE
from ordertrail.eventstore.store import NewEvent
from tests.support import delivery

RECEIVED_AT = datetime(2026, 3, 14, 9, 26, 53, 5, tzinfo=UTC)
BODY = b'{"upc":"601842495575","order_id":"QE3QL6","status":"confirmed"}'


def example() -> bytes:
    return canonical(
        mode="live",
        order_id="QE3QL6",
        upc="601842495575",
        version=12,
        event_type="StatusReported",
        raw_status="confirmed",
        raw_body=BODY,
        received_at=RECEIVED_AT,
    )


def test_canonical_encoding_is_exactly_as_documented() -> None:
    # Written out by hand from the module docstring, not from the code.
    expected = (
        b"\x00\x00\x00\x13ordertrail.event.v1"
        b"\x00\x00\x00\x04live"
        b"\x00\x00\x00\x06QE3QL6"
        b"\x00\x00\x00\x0c601842495575"
        b"\x00\x00\x00\x0212"
        b"\x00\x00\x00\x0eStatusReported"
        b"\x00\x00\x00\x09confirmed"
        + len(BODY).to_bytes(4, "big")
        + BODY
        + b"\x00\x00\x00\x1b2026-03-14T09:26:53.000005Z"
    )

    assert example() == expected


def test_lengths_count_utf8_bytes_not_characters() -> None:
    encoded = canonical(
        mode="test",
        order_id="Zoë",
        upc="u",
        version=1,
        event_type="StatusReported",
        raw_status="prêt",
        raw_body=b"",
        received_at=RECEIVED_AT,
    )

    assert b"\x00\x00\x00\x04Zo\xc3\xab" in encoded
    assert b"\x00\x00\x00\x05pr\xc3\xaat" in encoded
    # An empty body is still a field: its length is written as zero.
    assert b"\x00\x00\x00\x00\x00\x00\x00\x1b2026-" in encoded


def test_raw_body_is_hashed_as_received() -> None:
    reformatted = canonical(
        mode="live",
        order_id="QE3QL6",
        upc="601842495575",
        version=12,
        event_type="StatusReported",
        raw_status="confirmed",
        raw_body=BODY.replace(b",", b", "),
        received_at=RECEIVED_AT,
    )

    assert reformatted != example()


def test_received_at_is_written_in_utc_with_six_digits() -> None:
    plus_two = timezone(timedelta(hours=2))

    assert format_received_at(datetime(2026, 1, 1, 2, 0, tzinfo=plus_two)) == (
        "2026-01-01T00:00:00.000000Z"
    )
    assert format_received_at(
        datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    ) == ("2025-12-31T23:59:59.999999Z")


def test_genesis_is_32_zero_bytes() -> None:
    assert GENESIS == b"\x00" * 32


def test_chain_hash_is_sha256_of_previous_then_event() -> None:
    first = chain_hash(GENESIS, example())
    second = chain_hash(first, example())

    assert first == hashlib.sha256(b"\x00" * 32 + example()).digest()
    assert second == hashlib.sha256(first + example()).digest()
    # The same event at another place in a chain hashes differently.
    assert first != second


def test_new_event_hash_chains_its_delivery() -> None:
    first_delivery = delivery("QE3QL6", received_at=RECEIVED_AT)
    body_sha256 = hashlib.sha256(first_delivery.raw_body).digest()

    first = NewEvent(first_delivery, 1, GENESIS, body_sha256)
    second = NewEvent(
        delivery("QE3QL6", status="completed"), 2, first.hash, body_sha256
    )

    assert first.previous_hash == GENESIS
    assert first.hash == chain_hash(
        GENESIS,
        canonical(
            mode="live",
            order_id="QE3QL6",
            upc=first_delivery.upc,
            version=1,
            event_type=EVENT_TYPE,
            raw_status="confirmed",
            raw_body=first_delivery.raw_body,
            received_at=RECEIVED_AT,
        ),
    )
    assert second.previous_hash == first.hash
    assert second.hash != first.hash
