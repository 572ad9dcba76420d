"""The order view: a roll-up of an order's item views."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ordertrail.projections.items import Anomaly, ItemView
from ordertrail.projections.orders import roll_up

T0 = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)


def item(upc: str, state: str, **fields: Any) -> ItemView:
    values: dict[str, Any] = {
        "mode": "live",
        "order_id": "QE3QL6",
        "upc": upc,
        "state": state,
        "fulfilment": "unknown",
        "refund": "none",
        "message_count": 0,
        "redelivery_count": 0,
        "event_count": 1,
        "order_url": None,
        "last_status": state,
        "last_transition": state,
        "first_event_at": T0,
        "last_event_at": T0,
        "version": 1,
        "position": 1,
        "unrecognized_statuses": {},
        "anomalies": [],
    }
    values.update(fields)
    return ItemView(**values)


@pytest.mark.parametrize(
    ("states", "order_state"),
    [
        (["confirmed"], "confirmed"),
        (["completed", "confirmed", "ordered"], "ordered"),
        (["completed", "out_for_delivery"], "out_for_delivery"),
        (["new", "completed"], "new"),
        # Ended items no longer hold the order back.
        (["cancelled", "confirmed", "refunded"], "confirmed"),
        (["cancelled", "cancelled"], "cancelled"),
        (["refunded"], "refunded"),
        (["cancelled", "refunded"], "closed"),
    ],
)
def test_order_state_is_the_least_advanced_item_in_play(
    states: list[str], order_state: str
) -> None:
    items = [item(f"u{index}", state) for index, state in enumerate(states)]

    assert roll_up(items).state == order_state


@pytest.mark.parametrize(
    ("refunds", "order_refund"),
    [
        (["none", "none"], "none"),
        (["full", "full"], "full"),
        (["full", "none"], "partial"),
        (["partial", "none"], "partial"),
        (["partial", "full"], "partial"),
    ],
)
def test_order_refund(refunds: list[str], order_refund: str) -> None:
    items = [item(f"u{i}", "completed", refund=r) for i, r in enumerate(refunds)]

    assert roll_up(items).refund == order_refund


def test_counts_times_and_position_are_rolled_up() -> None:
    anomaly = Anomaly("out_of_order", 9, 3, "ordered", "ordered", "confirmed")
    items = [
        item(
            "b",
            "confirmed",
            message_count=2,
            anomalies=[anomaly],
            unrecognized_statuses={"Teleported": 2, "beamed": 1},
            first_event_at=T0 + timedelta(minutes=5),
            last_event_at=T0 + timedelta(hours=2),
            position=40,
        ),
        item(
            "a",
            "completed",
            message_count=1,
            first_event_at=T0,
            last_event_at=T0 + timedelta(hours=1),
            position=41,
        ),
        item("c", "confirmed", anomalies=[anomaly, anomaly], position=7),
    ]

    order = roll_up(items)

    assert (order.mode, order.order_id) == ("live", "QE3QL6")
    assert order.item_count == 3
    assert order.item_states == {"completed": 1, "confirmed": 2}
    assert order.message_count == 3
    assert order.anomaly_count == 3
    assert order.unrecognized_status_count == 3
    assert order.first_event_at == T0
    assert order.last_event_at == T0 + timedelta(hours=2)
    assert order.position == 41
    assert [i.upc for i in order.items] == ["a", "b", "c"]
