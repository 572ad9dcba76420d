"""Past states: an order or item as of a position or a moment, from the log.

The past is not kept anywhere else: a past state is the order's events up to
the point asked for, folded by ``ItemProjection.fold``, the code that keeps
the live view, with the same vocabulary. An answer as of position P holds the
events whose position is at most P; as of a time T, those received at or
before T. A delivery released from quarantine keeps its original receive
time, so it counts as known from then on, although it entered the log later.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import msgspec
from eventsourcing.domain import OriginatorVersionError

from ordertrail.db.connection import Connection
from ordertrail.domain.item import Item
from ordertrail.domain.vocabulary import Meaning
from ordertrail.eventstore.records import RecordedEvent
from ordertrail.projections.items import ItemProjection, ItemView

__all__ = [
    "AsOf",
    "HistoryInconsistent",
    "InvalidAsOf",
    "PastState",
    "ReplayStep",
    "parse_as_of",
    "past_events",
    "past_state",
    "replay",
]

_POSITION = re.compile(r"[0-9]{1,19}", re.ASCII)
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})",
    re.ASCII,
)
# A "+" left unescaped in a query string arrives as a space.
_SPACED_OFFSET = re.compile(r" ([0-9]{2}:[0-9]{2})$", re.ASCII)
_LARGEST_POSITION = 2**63 - 1


class InvalidAsOf(ValueError):
    """An ``as_of`` value is neither a position nor an RFC 3339 timestamp."""


class HistoryInconsistent(RuntimeError):
    """A stream's versions do not follow each other: the log is not intact."""


class AsOf(msgspec.Struct, frozen=True, kw_only=True):
    """A point in the log's past: a global position or a moment."""

    text: str
    """The value as given, echoed in answers."""
    position: int | None = None
    moment: datetime | None = None


def parse_as_of(text: str) -> AsOf:
    """Read a global position (digits) or an RFC 3339 timestamp with offset."""
    value = text.strip()
    if _POSITION.fullmatch(value):
        position = int(value)
        if position > _LARGEST_POSITION:
            raise InvalidAsOf(f"{text!r} is past the largest position")
        return AsOf(text=text, position=position)
    value = _SPACED_OFFSET.sub(r"+\1", value).upper().replace(" ", "T", 1)
    if not _RFC3339.fullmatch(value):
        msg = (
            f"{text!r} is neither a position (digits) nor an RFC 3339 timestamp "
            "such as 2025-03-01T12:00:00Z"
        )
        raise InvalidAsOf(msg)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise InvalidAsOf(f"{text!r} is not a valid timestamp: {error}") from None
    try:
        # Stored times are UTC; an offset can carry a valid local time past
        # the years a timestamp can hold.
        moment.astimezone(UTC)
    except OverflowError:
        msg = f"{text!r} falls outside the years 1 to 9999 in UTC"
        raise InvalidAsOf(msg) from None
    return AsOf(text=text, moment=moment)


_COLUMNS = ", ".join(RecordedEvent.__struct_fields__)

_PAST_EVENTS = f"""
    SELECT {_COLUMNS} FROM events
    WHERE order_id = $1 AND mode = $2
      AND ($3::text IS NULL OR upc = $3)
      AND position <= $4
      AND ($5::timestamptz IS NULL OR received_at <= $5)
    ORDER BY position
"""


async def past_events(
    connection: Connection,
    mode: str,
    order_id: str,
    as_of: AsOf | None = None,
    *,
    upc: str | None = None,
) -> list[RecordedEvent]:
    """Return an order's (or one item's) events up to ``as_of``, by position.

    Without ``as_of``, every event. An order is a handful of items with a few
    reports each, so it is read whole.
    """
    rows = await connection.fetch(
        _PAST_EVENTS,
        order_id,
        mode,
        upc,
        as_of.position
        if as_of is not None and as_of.position is not None
        else _LARGEST_POSITION,
        as_of.moment if as_of is not None else None,
    )
    return [RecordedEvent(**dict(row.items())) for row in rows]


class PastState(msgspec.Struct, frozen=True, kw_only=True):
    """Items as they stood at a past point, and what they were folded from."""

    items: list[ItemView]
    position: int
    """The position of the last event folded in."""
    fingerprint: str
    """Names the exact events folded: equal fingerprints, equal answers."""


def past_state(
    projection: ItemProjection, events: Iterable[RecordedEvent]
) -> PastState | None:
    """Fold events (position order) into item views; ``None`` for no events."""
    streams: dict[str, list[RecordedEvent]] = {}
    fingerprint = hashlib.sha256()
    position = 0
    for event in events:
        streams.setdefault(event.upc, []).append(event)
        fingerprint.update(event.hash)
        position = max(position, event.position)
    if not streams:
        return None
    views = []
    for stream in streams.values():
        # Positions rise with versions in an intact stream; sorting anyway
        # keeps a renumbered log from failing here rather than in verify.
        stream.sort(key=lambda event: event.version)
        try:
            item = projection.fold(None, stream)
        except OriginatorVersionError as error:
            first = stream[0]
            msg = (
                f"{first.mode} order {first.order_id} upc {first.upc}: version "
                f"{error.args[1] if len(error.args) > 1 else '?'} cannot follow "
                f"version {error.args[0] if error.args else '?'}: the log is not "
                "intact (run ordertrail audit verify)"
            )
            raise HistoryInconsistent(msg) from None
        assert item is not None
        views.append(ItemView.of(item))
    return PastState(
        items=views, position=position, fingerprint=fingerprint.hexdigest()[:24]
    )


class ReplayStep(msgspec.Struct, frozen=True, kw_only=True):
    """One event of a replay, with its meaning and the item right after it."""

    event: RecordedEvent
    meaning: Meaning | None
    item: ItemView | None
    """The item after the event; ``None`` while nothing could be applied."""
    anomalies: list[str]
    """Anomaly kinds this event raised (empty for most)."""
    refused: str | None = None
    """Why the lifecycle could not take the event (a broken log), if it could not."""

    @property
    def unrecognized(self) -> bool:
        """Whether the vocabulary has no meaning for the raw status."""
        return self.meaning is None

    @property
    def redelivery(self) -> bool:
        """Whether the event repeats an earlier delivery."""
        return self.event.redelivery_of is not None


def replay(
    projection: ItemProjection, events: Iterable[RecordedEvent]
) -> Iterator[ReplayStep]:
    """Fold events (position order) one at a time, yielding each step."""
    items: dict[tuple[str, str, str], Item] = {}
    for event in events:
        key = (event.mode, event.order_id, event.upc)
        known = items.get(key)
        flagged = len(known.anomalies) if known is not None else 0
        refused = None
        try:
            item = projection.fold(known, [event])
        except OriginatorVersionError:
            # A replay is how an auditor looks at a broken log: show the
            # event that does not fit, and go on from the item as it was.
            item = known
            expected = known.version + 1 if known is not None else 1
            refused = f"version {event.version} where {expected} was due"
        if item is not None:
            items[key] = item
        yield ReplayStep(
            event=event,
            meaning=projection.vocabulary.meaning(event.raw_status),
            item=_snapshot(item) if item is not None else None,
            anomalies=[str(a["kind"]) for a in item.anomalies[flagged:]]
            if item is not None and refused is None
            else [],
            refused=refused,
        )


def _snapshot(item: Item) -> ItemView:
    view = ItemView.of(item)
    # The view shares the item's dict, which later events change.
    return msgspec.structs.replace(
        view, unrecognized_statuses=dict(view.unrecognized_statuses)
    )
