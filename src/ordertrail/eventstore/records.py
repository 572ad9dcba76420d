"""What goes into the event store and what comes out of it."""

from __future__ import annotations

from datetime import datetime

import msgspec

__all__ = ["Appended", "Cursor", "Delivery", "RecordedEvent", "StreamKey"]

EVENT_TYPE = "StatusReported"
"""The one kind of fact ordertrail records: Locally reported an item status."""


class StreamKey(msgspec.Struct, frozen=True, order=True, array_like=True):
    """One item's stream: a UPC in an order, in a mode."""

    mode: str
    order_id: str
    upc: str


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One authenticated, readable webhook delivery, about to be appended."""

    mode: str
    order_id: str
    upc: str
    raw_status: str
    raw_body: bytes
    received_at: datetime
    request_id: str
    token_id: str
    client_address: str | None = None
    idempotency_key: str | None = None

    @property
    def stream(self) -> StreamKey:
        """The stream this delivery belongs to."""
        return StreamKey(self.mode, self.order_id, self.upc)


class Appended(msgspec.Struct, frozen=True):
    """Where a delivery landed in the log."""

    position: int
    version: int
    redelivery_of: int | None


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event, as read back from the log."""

    position: int
    transaction_id: int
    mode: str
    order_id: str
    upc: str
    version: int
    event_type: str
    schema_version: int
    raw_status: str
    raw_body: bytes
    body_sha256: bytes
    received_at: datetime
    request_id: str
    client_address: str | None
    token_id: str
    idempotency_key: str | None
    redelivery_of: int | None
    previous_hash: bytes
    hash: bytes

    @property
    def stream(self) -> StreamKey:
        """The stream this event belongs to."""
        return StreamKey(self.mode, self.order_id, self.upc)


class Cursor(msgspec.Struct, frozen=True, order=True, array_like=True):
    """A place in the global read order, (transaction_id, position).

    Positions alone are not a safe read order: see ``EventStore.read_after``.
    """

    transaction_id: int = 0
    position: int = 0
