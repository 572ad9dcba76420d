"""The item aggregate: the lifecycle of one cart item, as Locally reports it.

An item is one UPC in one order, in one mode (live or test); its stream holds
every status report Locally delivered for it. The aggregate folds those
reports into a lifecycle state with the rules below. The rules never move an
item backwards and never drop a fact: a report that the lifecycle does not
allow is kept, and flagged as an anomaly.

- Progress runs new, ordered, in transit, confirmed, out for delivery,
  completed. A report of an earlier step than the item has reached (a late
  or out-of-order delivery) leaves the state where it is.
- Cancelled and refunded end the lifecycle. A refund may follow a
  cancellation or a completion; repeating the ending changes nothing; any
  other step after the end is an anomaly.
- Messages and partial refunds are counted and do not move the state.
- A redelivery (the same body again, or a repeated idempotency key) counts
  as a redelivery and nothing else.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from datetime import datetime
from typing import Any, ClassVar

from eventsourcing.domain import Aggregate

from ordertrail.domain.vocabulary import Fulfilment, Meaning, Transition, Vocabulary

__all__ = ["Anomaly", "Item", "ItemState", "Refund", "item_id"]

_ITEM_NAMESPACE = uuid.UUID("6f7f8a4e-5b57-4d0e-9c55-2f1d0a6f3b11")
_NAMESPACE_BYTES = _ITEM_NAMESPACE.bytes


def item_id(mode: str, order_id: str, upc: str) -> uuid.UUID:
    """Return the aggregate id of the item ``upc`` of ``order_id`` in ``mode``.

    A version 5 UUID, as ``uuid.uuid5`` makes it, without its per-call set-up
    (a rebuild asks for one per item).
    """
    name = f"{mode}\x1f{order_id}\x1f{upc}".encode()
    digest = hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest[:16], version=5)


class ItemState(enum.StrEnum):
    """Where an item stands in its lifecycle."""

    NEW = "new"
    ORDERED = "ordered"
    IN_TRANSIT = "in_transit"
    CONFIRMED = "confirmed"
    OUT_FOR_DELIVERY = "out_for_delivery"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"


class Refund(enum.StrEnum):
    """How much of the item was refunded."""

    NONE = "none"
    PARTIAL = "partial"
    FULL = "full"


class Anomaly(enum.StrEnum):
    """Why a report did not move the item the way its status says."""

    OUT_OF_ORDER = "out_of_order"
    AFTER_END = "after_end"
    CANCELLED_AFTER_COMPLETION = "cancelled_after_completion"
    PARTIAL_AFTER_FULL_REFUND = "partial_refund_after_full_refund"
    SKIPPED = "skipped_by_operator"


_PROGRESS = {
    ItemState.NEW: 0,
    ItemState.ORDERED: 1,
    ItemState.IN_TRANSIT: 2,
    ItemState.CONFIRMED: 3,
    ItemState.OUT_FOR_DELIVERY: 4,
    ItemState.COMPLETED: 5,
}

_TARGET = {
    Transition.ORDERED: ItemState.ORDERED,
    Transition.CONFIRMED: ItemState.CONFIRMED,
    Transition.SHIP_TO_STORE_REQUESTED: ItemState.ORDERED,
    Transition.SHIP_TO_STORE_SHIPPED: ItemState.IN_TRANSIT,
    Transition.SHIP_TO_STORE_ARRIVED: ItemState.CONFIRMED,
    Transition.SAME_DAY_DELIVERY_REQUESTED: ItemState.ORDERED,
    Transition.SAME_DAY_DELIVERY_DISPATCHED: ItemState.OUT_FOR_DELIVERY,
    Transition.SAME_DAY_DELIVERY_DELIVERED: ItemState.COMPLETED,
    Transition.COMPLETED: ItemState.COMPLETED,
}

# A fulfilment a later report may replace: a ship-to-store item is still
# picked up, and that does not make it a plain pickup.
_REFINABLE = {Fulfilment.UNKNOWN, Fulfilment.PICKUP, Fulfilment.DELIVERY}


class Item(Aggregate):
    """One cart item's lifecycle, folded from its status reports."""

    class StatusReported(Aggregate.Event):
        """Locally reported a status for the item (one webhook delivery).

        ``timestamp`` is when the delivery was received. ``transition`` and
        ``fulfilment`` are not part of the stored fact: a projection fills
        them in from its vocabulary before applying the event.
        """

        class_version: ClassVar[int] = 1

        raw_status: str
        order_url: str | None
        position: int
        redelivery_of: int | None
        meaning: Meaning | None = None

        def interpreted(self, vocabulary: Vocabulary) -> Item.StatusReported:
            """Return this report with the meaning ``vocabulary`` gives it."""
            # Events are frozen; build the copy the way the library's mapper
            # materializes stored events, without a second pass through
            # __init__, which a rebuild would pay for every event.
            state = dict(self.__dict__)
            state["meaning"] = vocabulary.meaning(self.raw_status)
            copy = object.__new__(type(self))
            object.__setattr__(copy, "__dict__", state)
            return copy

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Item)
            aggregate.take_report(self)

    mode: str
    order_id: str
    upc: str
    state: ItemState
    fulfilment: Fulfilment
    refund: Refund
    message_count: int
    redelivery_count: int
    event_count: int
    order_url: str | None
    last_status: str
    last_transition: Transition | None
    position: int
    unrecognized_statuses: dict[str, int]
    anomalies: list[dict[str, Any]]

    @classmethod
    def unreported(
        cls, mode: str, order_id: str, upc: str, *, first_heard: datetime
    ) -> Item:
        """Return the item as it stands before its first report (version 0)."""
        item = cls.__new__(cls)
        item.__base_init__(
            originator_id=item_id(mode, order_id, upc),
            originator_version=0,
            timestamp=first_heard,
        )
        item.mode = mode
        item.order_id = order_id
        item.upc = upc
        item.state = ItemState.NEW
        item.fulfilment = Fulfilment.UNKNOWN
        item.refund = Refund.NONE
        item.message_count = 0
        item.redelivery_count = 0
        item.event_count = 0
        item.order_url = None
        item.last_status = ""
        item.last_transition = None
        item.position = 0
        item.unrecognized_statuses = {}
        item.anomalies = []
        return item

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Item:
        """Rebuild an item from a saved state (a row of the item view)."""
        item = cls.unreported(
            state["mode"],
            state["order_id"],
            state["upc"],
            first_heard=state["first_event_at"],
        )
        item.version = state["version"]
        item.modified_on = state["last_event_at"]
        item.state = ItemState(state["state"])
        item.fulfilment = Fulfilment(state["fulfilment"])
        item.refund = Refund(state["refund"])
        item.message_count = state["message_count"]
        item.redelivery_count = state["redelivery_count"]
        item.event_count = state["event_count"]
        item.order_url = state["order_url"]
        item.last_status = state["last_status"]
        last = state["last_transition"]
        item.last_transition = Transition(last) if last is not None else None
        item.position = state["position"]
        item.unrecognized_statuses = dict(state["unrecognized_statuses"])
        item.anomalies = list(state["anomalies"])
        return item

    def take_report(self, report: Item.StatusReported) -> None:
        """Fold one status report into the lifecycle."""
        self.event_count += 1
        self.position = report.position
        if report.redelivery_of is not None:
            self.redelivery_count += 1
            return
        self.last_status = report.raw_status
        if report.order_url:
            self.order_url = report.order_url
        meaning = report.meaning
        if meaning is None:
            raw = report.raw_status
            self.unrecognized_statuses[raw] = self.unrecognized_statuses.get(raw, 0) + 1
            return
        self.last_transition = meaning.transition
        self._refine_fulfilment(meaning.fulfilment)
        self._step(meaning.transition, report)

    def pass_over(
        self, *, version: int, position: int, received_at: datetime, raw_status: str
    ) -> None:
        """Count a report an operator chose to leave out of the lifecycle.

        The item's version moves past it, so later reports still apply, and
        the skip stays visible as an anomaly. The report is not read at all:
        it may be the very one the code cannot read.
        """
        self.version = version
        self.modified_on = received_at
        self.position = position
        self.event_count += 1
        self._note(Anomaly.SKIPPED, position, version, raw_status, None)

    def _refine_fulfilment(self, hint: Fulfilment | None) -> None:
        if hint is None or self.fulfilment not in _REFINABLE:
            return
        if self.fulfilment is Fulfilment.UNKNOWN or hint not in _REFINABLE:
            self.fulfilment = hint

    def _step(self, transition: Transition, report: Item.StatusReported) -> None:
        if transition is Transition.MESSAGED:
            self.message_count += 1
        elif transition is Transition.PARTIALLY_REFUNDED:
            self._refund_partially(report)
        elif transition is Transition.REFUNDED:
            self.refund = Refund.FULL
            self.state = ItemState.REFUNDED
        elif transition is Transition.CANCELLED:
            self._cancel(report)
        else:
            self._progress(_TARGET[transition], report)

    def _refund_partially(self, report: Item.StatusReported) -> None:
        if self.refund is Refund.FULL:
            self._flag(Anomaly.PARTIAL_AFTER_FULL_REFUND, report)
        else:
            self.refund = Refund.PARTIAL

    def _cancel(self, report: Item.StatusReported) -> None:
        if self.state is ItemState.CANCELLED:
            return
        if self.state is ItemState.REFUNDED:
            self._flag(Anomaly.AFTER_END, report)
        elif self.state is ItemState.COMPLETED:
            self._flag(Anomaly.CANCELLED_AFTER_COMPLETION, report)
        else:
            self.state = ItemState.CANCELLED

    def _progress(self, target: ItemState, report: Item.StatusReported) -> None:
        current = _PROGRESS.get(self.state)
        if current is None:
            self._flag(Anomaly.AFTER_END, report)
        elif _PROGRESS[target] > current:
            self.state = target
        elif _PROGRESS[target] < current:
            self._flag(Anomaly.OUT_OF_ORDER, report)

    def _flag(self, kind: Anomaly, report: Item.StatusReported) -> None:
        meaning = report.meaning
        self._note(
            kind,
            report.position,
            report.originator_version,
            report.raw_status,
            meaning.transition.value if meaning else None,
        )

    def _note(
        self,
        kind: Anomaly,
        position: int,
        version: int,
        raw_status: str,
        transition: str | None,
    ) -> None:
        self.anomalies.append(
            {
                "kind": kind.value,
                "position": position,
                "version": version,
                "raw_status": raw_status,
                "transition": transition,
                "state": self.state.value,
            }
        )
