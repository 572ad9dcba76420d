"""Folding stored events into an item, as a projection rebuild does."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from ordertrail.domain.item import ItemState, item_id
from ordertrail.domain.vocabulary import Transition, Vocabulary
from ordertrail.eventstore.hashing import GENESIS
from ordertrail.eventstore.records import EVENT_TYPE, RecordedEvent
from ordertrail.eventstore.store import EventStore
from ordertrail.projections.items import ItemProjection, to_domain_event
from tests.support import UPC, webhook_body

T0 = datetime(2026, 3, 14, 9, tzinfo=UTC)


def recorded(
    version: int, status: str, *, raw_body: bytes | None = None, **fields: object
) -> RecordedEvent:
    body = raw_body if raw_body is not None else webhook_body("QE3QL6", status=status)
    values: dict[str, object] = {
        "position": 100 + 10 * version,
        "transaction_id": 5000 + version,
        "mode": "live",
        "order_id": "QE3QL6",
        "upc": UPC,
        "version": version,
        "event_type": EVENT_TYPE,
        "schema_version": 1,
        "raw_status": status,
        "raw_body": body,
        "body_sha256": hashlib.sha256(body).digest(),
        "received_at": T0 + timedelta(minutes=version),
        "request_id": f"r{version}",
        "client_address": None,
        "token_id": "tok_1a2b3c4d",
        "idempotency_key": None,
        "redelivery_of": None,
        "previous_hash": GENESIS,
        "hash": GENESIS,
    }
    values.update(fields)
    return RecordedEvent(**values)  # type: ignore[arg-type]


def projection(vocabulary: Vocabulary | None = None) -> ItemProjection:
    return ItemProjection(vocabulary or Vocabulary.default(), EventStore())


def test_domain_event_carries_what_was_stored() -> None:
    event = to_domain_event(recorded(3, "confirmed", redelivery_of=120))

    assert event.originator_id == item_id("live", "QE3QL6", UPC)
    assert event.originator_version == 3
    assert event.timestamp == T0 + timedelta(minutes=3)
    assert event.raw_status == "confirmed"
    assert event.order_url == "https://www.locally.com/api/v2/cart/QE3QL6"
    assert event.position == 130
    assert event.redelivery_of == 120
    # Meaning is the projection's to assign, never part of the stored fact.
    assert event.meaning is None


def test_order_url_is_absent_when_the_body_has_none() -> None:
    event = to_domain_event(
        recorded(1, "confirmed", raw_body=b'{"upc":"1","order_id":"Q","status":"x"}')
    )

    assert event.order_url is None


def test_fold_builds_the_item_from_its_stream() -> None:
    item = projection().fold(
        None, [recorded(1, "ordered"), recorded(2, "confirmed"), recorded(3, "ordered")]
    )

    assert item is not None
    assert item.state is ItemState.CONFIRMED
    assert item.version == 3
    assert item.position == 130
    assert item.created_on == T0 + timedelta(minutes=1)
    assert item.modified_on == T0 + timedelta(minutes=3)
    assert [a["kind"] for a in item.anomalies] == ["out_of_order"]


def test_fold_skips_events_the_item_already_holds() -> None:
    fold = projection().fold
    item = fold(None, [recorded(1, "ordered"), recorded(2, "confirmed")])

    again = fold(item, [recorded(1, "ordered"), recorded(2, "confirmed")])

    assert again is item
    assert item is not None
    assert item.event_count == 2


def test_a_new_vocabulary_gives_old_events_a_new_meaning() -> None:
    # The same stored events, rebuilt after an operator taught the vocabulary
    # a status it did not know: no event changes, the item does.
    events = [recorded(1, "ordered"), recorded(2, "Teleported")]
    taught = Vocabulary.parse(
        '[[status]]\ntransition = "ordered"\naliases = ["ordered"]\n'
        '[[status]]\ntransition = "completed"\naliases = ["teleported"]\n',
        source="operator.toml",
    )

    before = projection().fold(None, events)
    after = projection(taught).fold(None, events)

    assert before is not None
    assert after is not None
    assert before.state is ItemState.ORDERED
    assert before.unrecognized_statuses == {"Teleported": 1}
    assert after.state is ItemState.COMPLETED
    assert after.unrecognized_statuses == {}
    assert after.last_transition is Transition.COMPLETED
