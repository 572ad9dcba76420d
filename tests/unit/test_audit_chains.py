"""Naming what happened to a stream: each kind of tampering, found precisely."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from msgspec.structs import replace

from ordertrail.audit.chains import (
    ChainEvent,
    Finding,
    FindingKind,
    check_stream,
    content_hash,
)
from ordertrail.eventstore.hashing import GENESIS

START = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


def intact(versions: int = 5, *, first: int = 1) -> list[ChainEvent]:
    """A valid stream of ``versions`` events, positions rising by three."""
    events = []
    previous = GENESIS
    for version in range(first, first + versions):
        body = b'{"upc":"U1","order_id":"O1","status":"s%d"}' % version
        event = ChainEvent(
            mode="live",
            order_id="O1",
            upc="U1",
            version=version,
            position=100 + 3 * version,
            event_type="StatusReported",
            raw_status=f"s{version}",
            raw_body=body,
            body_sha256=hashlib.sha256(body).digest(),
            received_at=START + timedelta(minutes=version),
            previous_hash=previous,
            hash=b"",
        )
        event = replace(event, hash=content_hash(event))
        events.append(event)
        previous = event.hash
    return events


def kinds(findings: list[Finding]) -> list[tuple[FindingKind, int | None]]:
    return [(finding.kind, finding.version) for finding in findings]


def test_an_intact_stream_has_no_findings() -> None:
    assert check_stream(intact()) == []


def test_a_changed_body_is_a_hash_mismatch_that_names_the_body() -> None:
    events = intact()
    events[1] = replace(events[1], raw_body=events[1].raw_body.replace(b"s2", b"s9"))

    findings = check_stream(events)

    assert kinds(findings) == [(FindingKind.CONTENT_CHANGED, 2)]
    assert "raw body was changed" in findings[0].detail
    assert findings[0].position == events[1].position


def test_a_changed_status_is_a_hash_mismatch_of_a_hashed_field() -> None:
    events = intact()
    events[2] = replace(events[2], raw_status="refunded")

    findings = check_stream(events)

    assert kinds(findings) == [(FindingKind.CONTENT_CHANGED, 3)]
    assert "hashed field" in findings[0].detail


def test_a_changed_receive_time_is_caught() -> None:
    events = intact()
    events[0] = replace(events[0], received_at=START - timedelta(days=1))

    assert kinds(check_stream(events)) == [(FindingKind.CONTENT_CHANGED, 1)]


def test_an_event_deleted_in_the_middle_is_one_gap() -> None:
    events = intact()
    del events[2]

    findings = check_stream(events)

    # The link from 4 back to 3 is broken too; the gap already says why.
    assert kinds(findings) == [(FindingKind.VERSION_GAP, 4)]
    assert "version 3 is missing after version 2" in findings[0].detail


def test_two_events_deleted_in_the_middle_are_one_gap_naming_both() -> None:
    events = intact(6)
    del events[2:4]

    findings = check_stream(events)

    assert kinds(findings) == [(FindingKind.VERSION_GAP, 5)]
    assert "versions 3 to 4 are missing" in findings[0].detail


def test_a_deleted_first_event_is_a_gap_at_the_start() -> None:
    events = intact()[1:]

    findings = check_stream(events)

    assert kinds(findings) == [(FindingKind.VERSION_GAP, 2)]
    assert "at the start" in findings[0].detail


def test_two_swapped_versions_are_one_swap() -> None:
    events = intact()
    second, third = events[1], events[2]
    events[1] = replace(third, version=2)
    events[2] = replace(second, version=3)

    findings = check_stream(events)

    assert kinds(findings) == [(FindingKind.VERSIONS_SWAPPED, 2)]
    assert findings[0].position == third.position
    assert findings[0].other_position == second.position


def test_swapped_versions_far_apart_are_one_swap() -> None:
    events = intact(6)
    second, fifth = events[1], events[4]
    events[1] = replace(fifth, version=2)
    events[4] = replace(second, version=5)

    assert kinds(check_stream(events)) == [(FindingKind.VERSIONS_SWAPPED, 2)]


def test_a_renumbered_event_is_named_with_its_true_version() -> None:
    events = intact()
    events[4] = replace(events[4], version=9)

    findings = check_stream(events)

    assert kinds(findings) == [(FindingKind.VERSION_RENUMBERED, 9)]
    assert "hashes as version 5" in findings[0].detail


def test_an_event_rewritten_with_a_recomputed_hash_breaks_the_next_link() -> None:
    events = intact()
    forged = replace(events[1], raw_status="cancelled")
    events[1] = replace(forged, hash=content_hash(forged))

    findings = check_stream(events)

    assert kinds(findings) == [(FindingKind.CHAIN_BROKEN, 3)]
    assert "hash of version 2" in findings[0].detail


def test_a_first_event_that_does_not_start_from_genesis_is_a_broken_chain() -> None:
    events = intact()
    forged = replace(events[0], previous_hash=b"\x01" * 32)
    events[0] = replace(forged, hash=content_hash(forged))

    findings = check_stream(events)

    assert (FindingKind.CHAIN_BROKEN, 1) in kinds(findings)
    assert "genesis" in findings[0].detail


def test_a_changed_body_digest_alone_is_named_as_such() -> None:
    events = intact()
    events[3] = replace(events[3], body_sha256=bytes(32))

    assert kinds(check_stream(events)) == [(FindingKind.BODY_DIGEST_MISMATCH, 4)]


def test_events_exchanged_whole_show_as_reordered_positions() -> None:
    events = intact()
    second, third = events[1], events[2]
    events[1] = replace(second, position=third.position)
    events[2] = replace(third, position=second.position)

    findings = check_stream(events)

    assert kinds(findings) == [(FindingKind.POSITION_ORDER, 3)]


def test_a_second_event_with_the_same_version_is_a_duplicate() -> None:
    events = intact(3)
    copy = replace(events[1], position=events[2].position + 50)
    events.insert(2, copy)

    assert (FindingKind.DUPLICATE_VERSION, 2) in kinds(check_stream(events))


def test_a_stream_seen_from_the_middle_is_intact_when_anchored() -> None:
    events = intact(6)[2:]

    assert check_stream(events, anchored=True) == []
    assert kinds(check_stream(events)) == [(FindingKind.VERSION_GAP, 3)]


def test_a_finding_describes_where_it_is() -> None:
    events = intact()
    events[1] = replace(events[1], raw_status="x")

    (finding,) = check_stream(events)

    text = finding.describe()
    assert text.startswith("content_changed: live order O1 upc U1, version 2")
    assert f"position {events[1].position}" in text
