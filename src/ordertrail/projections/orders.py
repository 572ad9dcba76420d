"""The order view: an order's items and a roll-up of their states.

Orders are few items each, so the roll-up is computed from the item rows at
read time rather than kept as a second table that could drift.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import msgspec

from ordertrail.domain.item import ItemState
from ordertrail.projections.items import ItemView

__all__ = ["OrderView", "roll_up"]

_PROGRESS_ORDER = (
    ItemState.NEW,
    ItemState.ORDERED,
    ItemState.IN_TRANSIT,
    ItemState.CONFIRMED,
    ItemState.OUT_FOR_DELIVERY,
    ItemState.COMPLETED,
)
_ENDED = (ItemState.CANCELLED, ItemState.REFUNDED)


class OrderView(msgspec.Struct, frozen=True, kw_only=True):
    """An order (a Locally cart) with every item it has in one mode."""

    mode: str
    order_id: str
    state: str
    """The state of the least advanced item still in play; if every item has
    ended, ``cancelled`` or ``refunded`` when they all agree, else ``closed``."""
    item_count: int
    item_states: dict[str, int]
    refund: str
    """``full`` when every item was refunded in full, ``partial`` when any
    refund was made, else ``none``."""
    message_count: int
    anomaly_count: int
    unrecognized_status_count: int
    first_event_at: datetime
    last_event_at: datetime
    position: int
    """The highest position applied to any of the order's items."""
    items: list[ItemView]


def roll_up(items: Sequence[ItemView]) -> OrderView:
    """Return the order view of an order's items (at least one)."""
    first = items[0]
    states = Counter(item.state for item in items)
    return OrderView(
        mode=first.mode,
        order_id=first.order_id,
        state=_order_state(items),
        item_count=len(items),
        item_states=dict(sorted(states.items())),
        refund=_order_refund(items),
        message_count=sum(item.message_count for item in items),
        anomaly_count=sum(len(item.anomalies) for item in items),
        unrecognized_status_count=sum(
            sum(item.unrecognized_statuses.values()) for item in items
        ),
        first_event_at=min(item.first_event_at for item in items),
        last_event_at=max(item.last_event_at for item in items),
        position=max(item.position for item in items),
        items=sorted(items, key=lambda item: item.upc),
    )


def _order_state(items: Sequence[ItemView]) -> str:
    active = [ItemState(item.state) for item in items if item.state not in _ENDED]
    if active:
        return min(active, key=_PROGRESS_ORDER.index).value
    ended = {item.state for item in items}
    return ended.pop() if len(ended) == 1 else "closed"


def _order_refund(items: Sequence[ItemView]) -> str:
    refunds = {item.refund for item in items}
    if refunds == {"full"}:
        return "full"
    return "partial" if refunds - {"none"} else "none"
