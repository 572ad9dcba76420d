"""The item lifecycle rules, one test per rule of ``domain/item.py``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ordertrail.domain.item import Anomaly, Item, ItemState, Refund, item_id
from ordertrail.domain.vocabulary import Fulfilment, Transition, Vocabulary
from ordertrail.projections.items import ItemView

VOCABULARY = Vocabulary.default()
FIRST_HEARD = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)


class Reports:
    """Feeds status reports to one item, as a projection does."""

    def __init__(self) -> None:
        self.item = Item.unreported(
            "live", "QE3QL6", "601842495575", first_heard=FIRST_HEARD
        )
        self.position = 1000

    def report(
        self,
        raw_status: str,
        *,
        redelivery_of: int | None = None,
        order_url: str | None = None,
    ) -> Item:
        """Apply one report; return the item."""
        self.position += 7  # positions are global: a stream's are not contiguous
        version = self.item.version + 1
        # Event classes become dataclasses at run time, out of the type
        # checker's sight: the fields go by name.
        fields: dict[str, Any] = {
            "originator_id": self.item.id,
            "originator_version": version,
            "timestamp": FIRST_HEARD + timedelta(minutes=version),
            "raw_status": raw_status,
            "order_url": order_url,
            "position": self.position,
            "redelivery_of": redelivery_of,
        }
        event = Item.StatusReported(**fields)
        event.interpreted(VOCABULARY).mutate(self.item)
        return self.item

    def reports(self, *raw_statuses: str) -> Item:
        """Apply reports in order; return the item."""
        for raw_status in raw_statuses:
            self.report(raw_status)
        return self.item


def kinds(item: Item) -> list[str]:
    return [anomaly["kind"] for anomaly in item.anomalies]


def test_unreported_item_is_new_and_empty() -> None:
    item = Reports().item

    assert item.version == 0
    assert item.state is ItemState.NEW
    assert item.fulfilment is Fulfilment.UNKNOWN
    assert item.refund is Refund.NONE
    assert (item.event_count, item.message_count, item.redelivery_count) == (0, 0, 0)
    assert item.anomalies == []
    assert item.unrecognized_statuses == {}


def test_item_id_is_stable_and_separates_modes() -> None:
    live = item_id("live", "QE3QL6", "601842495575")

    assert live == item_id("live", "QE3QL6", "601842495575")
    assert live != item_id("test", "QE3QL6", "601842495575")
    assert live != item_id("live", "QE3QL6", "601842495576")


@pytest.mark.parametrize(
    ("statuses", "state"),
    [
        (["ordered"], ItemState.ORDERED),
        (["ordered", "confirmed"], ItemState.CONFIRMED),
        (["ordered", "confirmed", "completed"], ItemState.COMPLETED),
        (["ship to store", "sts shipped", "sts arrived"], ItemState.CONFIRMED),
        (["same day delivery", "sdd dispatched"], ItemState.OUT_FOR_DELIVERY),
        (["sdd dispatched", "sdd delivered"], ItemState.COMPLETED),
        # Steps may be skipped: Locally need not report every one.
        (["completed"], ItemState.COMPLETED),
    ],
)
def test_progress_runs_forward(statuses: list[str], state: ItemState) -> None:
    item = Reports().reports(*statuses)

    assert item.state is state
    assert item.anomalies == []
    assert item.event_count == len(statuses)
    assert item.version == len(statuses)


def test_earlier_step_after_a_later_one_is_flagged_and_state_stays() -> None:
    reports = Reports()
    reports.reports("ordered", "confirmed")

    item = reports.report("ordered")

    assert item.state is ItemState.CONFIRMED
    assert item.anomalies == [
        {
            "kind": Anomaly.OUT_OF_ORDER.value,
            "position": reports.position,
            "version": 3,
            "raw_status": "ordered",
            "transition": Transition.ORDERED.value,
            "state": ItemState.CONFIRMED.value,
        }
    ]
    # The report is a fact all the same: it is counted and remembered.
    assert item.event_count == 3
    assert item.last_status == "ordered"
    assert item.last_transition is Transition.ORDERED


def test_late_in_transit_report_after_arrival_is_out_of_order() -> None:
    item = Reports().reports("sts arrived", "sts shipped")

    assert item.state is ItemState.CONFIRMED
    assert kinds(item) == [Anomaly.OUT_OF_ORDER.value]


def test_repeated_step_in_a_new_body_neither_moves_nor_flags() -> None:
    item = Reports().reports("confirmed", "Confirmed")

    assert item.state is ItemState.CONFIRMED
    assert item.anomalies == []
    assert item.event_count == 2


@pytest.mark.parametrize("before", [[], ["ordered"], ["ordered", "confirmed"]])
def test_cancellation_ends_the_lifecycle(before: list[str]) -> None:
    item = Reports().reports(*before, "cancelled")

    assert item.state is ItemState.CANCELLED
    assert item.anomalies == []


@pytest.mark.parametrize("before", [["completed"], ["confirmed"], ["ordered"]])
def test_refund_ends_the_lifecycle(before: list[str]) -> None:
    item = Reports().reports(*before, "refunded")

    assert item.state is ItemState.REFUNDED
    assert item.refund is Refund.FULL
    assert item.anomalies == []


def test_refund_after_cancellation_is_allowed() -> None:
    item = Reports().reports("ordered", "cancelled", "refunded")

    assert item.state is ItemState.REFUNDED
    assert item.refund is Refund.FULL
    assert item.anomalies == []


def test_refund_after_completion_is_allowed() -> None:
    item = Reports().reports("ordered", "confirmed", "picked up", "returned")

    assert item.state is ItemState.REFUNDED
    assert item.anomalies == []


@pytest.mark.parametrize(
    ("ending", "later"),
    [
        ("cancelled", "confirmed"),
        ("cancelled", "ordered"),
        ("cancelled", "completed"),
        ("refunded", "confirmed"),
        ("refunded", "completed"),
        ("refunded", "cancelled"),
        ("refunded", "sdd dispatched"),
    ],
)
def test_any_other_step_after_the_end_is_flagged(ending: str, later: str) -> None:
    reports = Reports()
    reports.reports("ordered", ending)
    ended = reports.item.state

    item = reports.report(later)

    assert item.state is ended
    assert kinds(item) == [Anomaly.AFTER_END.value]
    assert item.anomalies[0]["state"] == ended.value
    assert item.anomalies[0]["raw_status"] == later


def test_cancellation_after_completion_is_flagged_and_state_stays() -> None:
    item = Reports().reports("ordered", "completed", "cancelled")

    assert item.state is ItemState.COMPLETED
    assert kinds(item) == [Anomaly.CANCELLED_AFTER_COMPLETION.value]


def test_messages_are_counted_and_do_not_move_the_state() -> None:
    item = Reports().reports("confirmed", "new message", "Store Message", "note")

    assert item.state is ItemState.CONFIRMED
    assert item.message_count == 3
    assert item.event_count == 4
    assert item.anomalies == []
    assert item.last_transition is Transition.MESSAGED


def test_messages_after_the_end_are_counted_not_flagged() -> None:
    item = Reports().reports("completed", "message")

    assert item.state is ItemState.COMPLETED
    assert item.message_count == 1
    assert item.anomalies == []


def test_partial_refunds_are_counted_and_do_not_move_the_state() -> None:
    item = Reports().reports("confirmed", "partial refund", "partially refunded")

    assert item.state is ItemState.CONFIRMED
    assert item.refund is Refund.PARTIAL
    assert item.anomalies == []


def test_full_refund_after_partial_refund_is_full() -> None:
    item = Reports().reports("completed", "partial refund", "refunded")

    assert item.refund is Refund.FULL
    assert item.state is ItemState.REFUNDED


def test_partial_refund_after_full_refund_is_flagged() -> None:
    item = Reports().reports("completed", "refunded", "partial refund")

    assert item.refund is Refund.FULL
    assert item.state is ItemState.REFUNDED
    assert kinds(item) == [Anomaly.PARTIAL_AFTER_FULL_REFUND.value]


def test_redelivery_is_counted_as_a_redelivery_and_nothing_else() -> None:
    reports = Reports()
    reports.report("ordered", order_url="https://www.locally.com/api/v2/cart/QE3QL6")
    original = reports.position

    # Even a status that would be a transition (or an anomaly) is ignored.
    item = reports.report("cancelled", redelivery_of=original, order_url="https://x/")

    assert item.state is ItemState.ORDERED
    assert item.redelivery_count == 1
    assert item.event_count == 2
    assert item.version == 2
    assert item.position == reports.position
    assert item.last_status == "ordered"
    assert item.last_transition is Transition.ORDERED
    assert item.order_url == "https://www.locally.com/api/v2/cart/QE3QL6"
    assert item.anomalies == []


def test_unrecognized_statuses_are_counted_and_shown() -> None:
    item = Reports().reports("confirmed", "Teleported", "Teleported", "beamed up")

    assert item.state is ItemState.CONFIRMED
    assert item.unrecognized_statuses == {"Teleported": 2, "beamed up": 1}
    assert item.last_status == "beamed up"
    # Unrecognized reports carry no transition to remember.
    assert item.last_transition is Transition.CONFIRMED
    assert item.anomalies == []
    assert item.event_count == 4


@pytest.mark.parametrize(
    ("statuses", "fulfilment"),
    [
        (["confirmed"], Fulfilment.UNKNOWN),
        (["ready for pickup"], Fulfilment.PICKUP),
        (["ready for delivery"], Fulfilment.DELIVERY),
        # A ship-to-store item is still picked up: that keeps ship-to-store.
        (["ship to store", "sts arrived", "picked up"], Fulfilment.SHIP_TO_STORE),
        # A plain pickup or delivery is refined by a more specific kind.
        (["ready for pickup", "sts shipped"], Fulfilment.SHIP_TO_STORE),
        (["ready for delivery", "sdd dispatched"], Fulfilment.SAME_DAY_DELIVERY),
        # Between pickup and delivery the first word stands.
        (["ready for pickup", "delivered"], Fulfilment.PICKUP),
        (["ready for delivery", "picked up"], Fulfilment.DELIVERY),
        (["same day delivery", "ship to store"], Fulfilment.SAME_DAY_DELIVERY),
    ],
)
def test_fulfilment_is_refined_never_coarsened(
    statuses: list[str], fulfilment: Fulfilment
) -> None:
    assert Reports().reports(*statuses).fulfilment is fulfilment


def test_order_url_keeps_the_latest_one_given() -> None:
    reports = Reports()
    reports.report("ordered", order_url="https://a/")
    reports.report("confirmed")

    assert reports.item.order_url == "https://a/"
    assert reports.report("completed", order_url="https://b/").order_url == "https://b/"


def test_view_of_an_item_round_trips_through_restore() -> None:
    reports = Reports()
    reports.reports("ordered", "confirmed", "Teleported", "ordered", "message")
    item = reports.item
    view = ItemView.of(item)

    restored = Item.restore(
        {
            **{field: getattr(view, field) for field in ItemView.__struct_fields__},
            "anomalies": item.anomalies,
        }
    )

    assert ItemView.of(restored) == view
    assert view.first_event_at == FIRST_HEARD
    assert view.last_event_at == FIRST_HEARD + timedelta(minutes=5)
    assert view.anomalies[0].kind == Anomaly.OUT_OF_ORDER.value
