"""Checking an export file offline: what each kind of damage looks like."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ordertrail.audit.chains import ChainEvent, FindingKind, content_hash
from ordertrail.audit.digest import HeadsDigest
from ordertrail.audit.export import ENCODING, EXPORT_FORMAT
from ordertrail.audit.verify_export import verify_export
from ordertrail.eventstore.hashing import GENESIS, format_received_at

START = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)

Document = list[dict[str, Any]]


def streams() -> list[ChainEvent]:
    """Three streams of four events, interleaved in position order."""
    events = []
    previous: dict[str, bytes] = {}
    position = 0
    for version in range(1, 5):
        for upc in ("U1", "U2", "U3"):
            position += 1
            body = b'{"upc":"%s","status":"s%d"}' % (upc.encode(), version)
            event = ChainEvent(
                mode="live",
                order_id="O1",
                upc=upc,
                version=version,
                position=position,
                event_type="StatusReported",
                raw_status=f"s{version}",
                raw_body=body,
                body_sha256=hashlib.sha256(body).digest(),
                received_at=START + timedelta(seconds=position),
                previous_hash=previous.get(upc, GENESIS),
                hash=b"",
            )
            event = msgspec.structs.replace(event, hash=content_hash(event))
            previous[upc] = event.hash
            events.append(event)
    return events


def line(event: ChainEvent) -> dict[str, Any]:
    return {
        "position": event.position,
        "transaction_id": 1000 + event.position,
        "mode": event.mode,
        "order_id": event.order_id,
        "upc": event.upc,
        "version": event.version,
        "event_type": event.event_type,
        "schema_version": 1,
        "raw_status": event.raw_status,
        "raw_body": base64.b64encode(event.raw_body).decode(),
        "body_sha256": event.body_sha256.hex(),
        "received_at": format_received_at(event.received_at),
        "request_id": f"r{event.position}",
        "client_address": "127.0.0.1",
        "token_id": "tok_1",
        "idempotency_key": None,
        "redelivery_of": None,
        "previous_hash": event.previous_hash.hex(),
        "hash": event.hash.hex(),
    }


def export_document(events: list[ChainEvent], first: int = 1) -> Document:
    """The lines of an export of ``events``, as ``export_lines`` writes them."""
    heads: dict[tuple[str, str, str], ChainEvent] = {}
    for event in events:
        heads[(event.mode, event.order_id, event.upc)] = event
    digest = HeadsDigest()
    for key in sorted(heads):
        digest.add(*key, heads[key].version, heads[key].hash)
    last = events[-1].position if events else first
    header = {
        "export": {
            "format": EXPORT_FORMAT,
            "mode": None,
            "from_position": first,
            "to_position": last,
            "exported_at": "2025-03-02T00:00:00.000000Z",
            "encoding": ENCODING,
        }
    }
    summary = {
        "summary": {
            "format": EXPORT_FORMAT,
            "count": len(events),
            "first_position": events[0].position if events else None,
            "last_position": events[-1].position if events else None,
            "from_position": first,
            "to_position": last,
            "mode": None,
            "heads": [
                [*key, heads[key].version, heads[key].hash.hex()]
                for key in sorted(heads)
            ],
            "streams": len(heads),
            "heads_digest": digest.digest().hex(),
        }
    }
    return [header, *(line(e) for e in events), summary]


def write(path: Path, lines: Document) -> Path:
    path.write_bytes(b"".join(msgspec.json.encode(item) + b"\n" for item in lines))
    return path


@pytest.fixture
def document() -> Document:
    return export_document(streams())


def found(path: Path) -> list[FindingKind]:
    return [finding.kind for finding in verify_export(path).findings]


def test_an_intact_export_is_clean(tmp_path: Path, document: Document) -> None:
    result = verify_export(write(tmp_path / "e.ndjson", document))

    assert result.clean
    assert (result.events, result.streams, result.summary) == (12, 3, True)
    assert result.heads_digest == document[-1]["summary"]["heads_digest"]


def test_the_expected_checkpoint_digest_is_compared(
    tmp_path: Path, document: Document
) -> None:
    path = write(tmp_path / "e.ndjson", document)
    digest = document[-1]["summary"]["heads_digest"]

    assert verify_export(path, expect_digest=digest.upper()).clean
    assert [f.kind for f in verify_export(path, expect_digest="00" * 32).findings] == [
        FindingKind.HEADS_DIGEST_MISMATCH
    ]


def test_a_changed_body_is_found_on_its_line(
    tmp_path: Path, document: Document
) -> None:
    document[5]["raw_body"] = base64.b64encode(b'{"status":"refunded"}').decode()

    result = verify_export(write(tmp_path / "e.ndjson", document))

    assert [(f.kind, f.line) for f in result.findings] == [
        (FindingKind.CONTENT_CHANGED, 6)
    ]


def test_a_removed_line_is_a_gap_and_a_count_mismatch(
    tmp_path: Path, document: Document
) -> None:
    removed = document.pop(5)

    result = verify_export(write(tmp_path / "e.ndjson", document))

    kinds = [f.kind for f in result.findings]
    assert kinds == [FindingKind.VERSION_GAP, FindingKind.COUNT_MISMATCH]
    assert result.findings[0].upc == removed["upc"]


def test_a_cut_short_export_misses_its_summary(
    tmp_path: Path, document: Document
) -> None:
    assert found(write(tmp_path / "e.ndjson", document[:-4])) == [
        FindingKind.SUMMARY_MISSING
    ]


def test_a_changed_summary_head_is_found(tmp_path: Path, document: Document) -> None:
    document[-1]["summary"]["heads"][1][3] = 3

    kinds = found(write(tmp_path / "e.ndjson", document))

    assert kinds == [FindingKind.HEAD_MISMATCH, FindingKind.HEADS_DIGEST_MISMATCH]


def test_moved_lines_are_out_of_order(tmp_path: Path, document: Document) -> None:
    document[2], document[5] = document[5], document[2]

    kinds = found(write(tmp_path / "e.ndjson", document))

    assert FindingKind.POSITIONS_NOT_ASCENDING in kinds


def test_a_line_that_is_not_json_is_malformed(
    tmp_path: Path, document: Document
) -> None:
    path = write(tmp_path / "e.ndjson", document)
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(3, b"not json\n")
    path.write_bytes(b"".join(lines))

    result = verify_export(path)

    assert [(f.kind, f.line) for f in result.findings] == [
        (FindingKind.MALFORMED_LINE, 4)
    ]


def test_a_partial_range_anchors_streams_that_start_before_it(tmp_path: Path) -> None:
    events = [e for e in streams() if e.position > 4]

    result = verify_export(write(tmp_path / "e.ndjson", export_document(events, 5)))

    assert result.clean


def test_a_full_range_expects_every_stream_from_its_first_version(
    tmp_path: Path,
) -> None:
    events = [e for e in streams() if e.position > 4]

    kinds = found(write(tmp_path / "e.ndjson", export_document(events, 1)))

    assert kinds == [FindingKind.VERSION_GAP] * 3
