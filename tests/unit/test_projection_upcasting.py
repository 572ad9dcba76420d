"""Stored events on their way into the projection: upcasts and operator skips.

A stored event names the shape it was written in (``schema_version``); the
event class names the shape the code reads (``class_version``) and carries
one ``upcast_vN_vM`` step per version in between, as eventsourcing defines
them. New class versions are installed here by patching, for one test each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ordertrail.domain.item import Item
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.hashing import GENESIS
from ordertrail.eventstore.records import EVENT_TYPE, RecordedEvent
from ordertrail.eventstore.store import EventStore
from ordertrail.projections.items import ItemProjection, ItemView, to_domain_event
from tests.support import UPC, webhook_body

T0 = datetime(2026, 5, 2, 8, tzinfo=UTC)
Upcaster = Callable[[dict[str, Any]], None]


def stored(version: int, status: str, *, schema_version: int = 1) -> RecordedEvent:
    body = webhook_body("QR7T2P", status=status)
    return RecordedEvent(
        position=200 + version,
        transaction_id=9000 + version,
        mode="live",
        order_id="QR7T2P",
        upc=UPC,
        version=version,
        event_type=EVENT_TYPE,
        schema_version=schema_version,
        raw_status=status,
        raw_body=body,
        body_sha256=hashlib.sha256(body).digest(),
        received_at=T0 + timedelta(minutes=version),
        request_id=f"r{version}",
        client_address=None,
        token_id="tok_5e6f7a8b",
        idempotency_key=None,
        redelivery_of=None,
        previous_hash=GENESIS,
        hash=GENESIS,
    )


@pytest.fixture
def class_version(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make StatusReported's current shape ``version``, with these upcasters."""

    def install(version: int, **upcasters: Upcaster) -> None:
        monkeypatch.setattr(Item.StatusReported, "class_version", version)
        for name, upcast in upcasters.items():
            monkeypatch.setattr(
                Item.StatusReported, name, staticmethod(upcast), raising=False
            )

    return install


def words(state: dict[str, Any]) -> None:
    """Shape 2 names statuses in words where shape 1 used codes."""
    codes = {"S1": "ordered", "S3": "confirmed"}
    state["raw_status"] = codes.get(state["raw_status"], state["raw_status"])


def shouted(state: dict[str, Any]) -> None:
    """Shape 3 marks every status it upcast, to show the step ran."""
    state["raw_status"] = state["raw_status"] + " (v3)"


def fold(*events: RecordedEvent, skipped: frozenset[int] = frozenset()) -> ItemView:
    projection = ItemProjection(Vocabulary.default(), EventStore(), skipped=skipped)
    item = projection.fold(None, events)
    assert item is not None
    return ItemView.of(item)


def test_an_old_shape_is_upcast_on_the_way_in(
    class_version: Callable[..., None],
) -> None:
    class_version(2, upcast_v1_v2=words)

    assert to_domain_event(stored(1, "S3")).raw_status == "confirmed"


def test_the_current_shape_passes_as_stored(
    class_version: Callable[..., None],
) -> None:
    class_version(2, upcast_v1_v2=words)

    assert to_domain_event(stored(1, "S3", schema_version=2)).raw_status == "S3"


def test_each_event_takes_only_the_steps_from_its_own_shape(
    class_version: Callable[..., None],
) -> None:
    class_version(3, upcast_v1_v2=words, upcast_v2_v3=shouted)

    assert to_domain_event(stored(1, "S1")).raw_status == "ordered (v3)"
    assert to_domain_event(stored(2, "S1", schema_version=2)).raw_status == "S1 (v3)"
    assert to_domain_event(stored(3, "S1", schema_version=3)).raw_status == "S1"


def test_upcast_reports_fold_into_the_lifecycle_they_describe(
    class_version: Callable[..., None],
) -> None:
    before = fold(stored(1, "S1"), stored(2, "S3"))
    class_version(2, upcast_v1_v2=words)
    after = fold(stored(1, "S1"), stored(2, "S3"))

    assert (before.state, before.unrecognized_statuses) == ("new", {"S1": 1, "S3": 1})
    assert (after.state, after.unrecognized_statuses) == ("confirmed", {})
    assert after.last_transition == "confirmed"


def test_a_newer_shape_than_the_code_reads_is_not_upcast_backwards() -> None:
    # Code one version behind the log (a rollback) still reads what it can.
    assert to_domain_event(stored(1, "confirmed", schema_version=2)).raw_status == (
        "confirmed"
    )


def test_a_skipped_event_is_counted_and_flagged_and_later_ones_still_apply() -> None:
    item = fold(
        stored(1, "ordered"),
        stored(2, "cancelled"),
        stored(3, "confirmed"),
        skipped=frozenset({202}),
    )

    assert item.state == "confirmed"
    assert (item.version, item.event_count, item.position) == (3, 3, 203)
    assert [(a.kind, a.position, a.version) for a in item.anomalies] == [
        ("skipped_by_operator", 202, 2)
    ]
