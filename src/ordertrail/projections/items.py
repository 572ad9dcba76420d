"""The item projection: one row per item with its lifecycle state.

The same code serves two callers. The ingest writer applies each committed
batch inline, in the append's own transaction, so a delivery's effect is
readable the moment its 202 goes out. A rebuild replays the whole log through
``ItemProjection.fold`` into a fresh table. Applying is idempotent by stream
version: an event at or below a row's version is already in it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar, cast
from uuid import UUID

import msgspec
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.utils import get_topic

from ordertrail.db.connection import Connection
from ordertrail.domain.item import Item, item_id
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import EVENT_TYPE, RecordedEvent, StreamKey
from ordertrail.eventstore.store import EventStore

__all__ = [
    "PROJECTION_NAME",
    "PROJECTION_VERSION",
    "VIEW_COLUMNS",
    "Applied",
    "Fact",
    "FoldFailure",
    "ItemProjection",
    "ItemView",
    "create_view_indexes",
    "create_view_table",
    "save_arguments",
    "to_domain_event",
]

PROJECTION_NAME = "items"
PROJECTION_VERSION = 1
"""The served version of the item view's table (``item_view_v1``)."""


class Anomaly(msgspec.Struct, frozen=True):
    """A report the lifecycle did not allow, kept and flagged."""

    kind: str
    position: int
    version: int
    raw_status: str
    transition: str | None
    state: str


class ItemView(msgspec.Struct, frozen=True, kw_only=True):
    """The projected state of one cart item."""

    mode: str
    order_id: str
    upc: str
    state: str
    fulfilment: str
    refund: str
    message_count: int
    redelivery_count: int
    event_count: int
    order_url: str | None
    last_status: str
    last_transition: str | None
    first_event_at: datetime
    last_event_at: datetime
    version: int
    position: int
    unrecognized_statuses: dict[str, int]
    anomalies: list[Anomaly]

    @classmethod
    def of(cls, item: Item) -> ItemView:
        """Return the view of an item aggregate."""
        return cls(
            mode=item.mode,
            order_id=item.order_id,
            upc=item.upc,
            state=item.state.value,
            fulfilment=item.fulfilment.value,
            refund=item.refund.value,
            message_count=item.message_count,
            redelivery_count=item.redelivery_count,
            event_count=item.event_count,
            order_url=item.order_url,
            last_status=item.last_status,
            last_transition=item.last_transition.value
            if item.last_transition
            else None,
            first_event_at=item.created_on,
            last_event_at=item.modified_on,
            version=item.version,
            position=item.position,
            unrecognized_statuses=dict(item.unrecognized_statuses),
            anomalies=[msgspec.convert(a, Anomaly) for a in item.anomalies],
        )


VIEW_COLUMNS = tuple(ItemView.__struct_fields__)


class _DecodedState(Transcoder):
    """Hands the mapper a stored event's state that is already decoded.

    asyncpg has already turned the row into Python values, so the state the
    mapper receives is a dict; encoding it to JSON only to decode it again
    cost most of a fold. Bytes (from elsewhere) are still decoded as JSON.
    """

    def encode(self, obj: Any) -> bytes:
        return msgspec.json.encode(obj)

    def decode(self, data: Any) -> Any:
        return data if isinstance(data, dict) else msgspec.json.decode(data)


# Stored events become domain events through the library's mapper, so that
# ``class_version`` and ``upcast_vN_vM`` on the event class work as documented:
# an old row's state is upcast on the way in and the projection sees only the
# current shape.
_TOPICS = {EVENT_TYPE: get_topic(Item.StatusReported)}
_mapper: Mapper[Any] = Mapper(transcoder=_DecodedState())


class Fact(Protocol):
    """What folding needs of a stored event (a RecordedEvent has it all)."""

    @property
    def mode(self) -> str: ...
    @property
    def order_id(self) -> str: ...
    @property
    def upc(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def position(self) -> int: ...
    @property
    def event_type(self) -> str: ...
    @property
    def schema_version(self) -> int: ...
    @property
    def raw_status(self) -> str: ...
    @property
    def raw_body(self) -> bytes: ...
    @property
    def received_at(self) -> datetime: ...
    @property
    def redelivery_of(self) -> int | None: ...


AnyFact = TypeVar("AnyFact", bound=Fact)


def to_domain_event(
    event: Fact, originator_id: UUID | None = None
) -> Item.StatusReported:
    """Return the item domain event a stored event records.

    ``originator_id`` saves recomputing the item id for every event of a
    stream; it must be ``item_id(event.mode, event.order_id, event.upc)``.
    """
    state: dict[str, Any] = {
        "timestamp": event.received_at,
        "raw_status": event.raw_status,
        "order_url": _order_url(event.raw_body),
        "position": event.position,
        "redelivery_of": event.redelivery_of,
    }
    if event.schema_version != 1:
        state["class_version"] = event.schema_version
    domain_event = _mapper.to_domain_event(
        StoredEvent(
            originator_id=originator_id
            or item_id(event.mode, event.order_id, event.upc),
            originator_version=event.version,
            topic=_TOPICS[event.event_type],
            state=cast(bytes, state),
        )
    )
    assert isinstance(domain_event, Item.StatusReported)
    return domain_event


def _report(
    event: Fact, originator_id: UUID, vocabulary: Vocabulary
) -> Item.StatusReported:
    """Return the domain event of a stored event, with its meaning.

    A stored event already in the event class's current shape needs no
    upcasting: it is materialized here the way the library's mapper does it
    (the state becomes the event's attributes), with its meaning included,
    which spares a rebuild the mapper's round trip and a copy per event.
    Older shapes go through the mapper and its upcasters.
    """
    if event.schema_version != Item.StatusReported.class_version:
        return to_domain_event(event, originator_id).interpreted(vocabulary)
    report = object.__new__(Item.StatusReported)
    object.__setattr__(
        report,
        "__dict__",
        {
            "originator_id": originator_id,
            "originator_version": event.version,
            "timestamp": event.received_at,
            "raw_status": event.raw_status,
            "order_url": _order_url(event.raw_body),
            "position": event.position,
            "redelivery_of": event.redelivery_of,
            "meaning": vocabulary.meaning(event.raw_status),
        },
    )
    return report


class _OrderUrl(msgspec.Struct):
    order_url: str | None = None


_order_url_decoder = msgspec.json.Decoder(_OrderUrl)


def _order_url(raw_body: bytes) -> str | None:
    try:
        return _order_url_decoder.decode(raw_body).order_url
    except msgspec.DecodeError:
        return None


class FoldFailure(msgspec.Struct, frozen=True):
    """The projection code raised on an event: a poison event."""

    event: RecordedEvent
    error: str


class Applied(msgspec.Struct, frozen=True):
    """What applying a batch of events did."""

    views: list[ItemView]
    """The rows written."""
    failures: list[FoldFailure]
    """Streams left as they were because their code raised (a poison event)."""


class ItemProjection:
    """Folds item streams into one version's item view table."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        store: EventStore,
        *,
        version: int = PROJECTION_VERSION,
        table: str = "item_view",
        skipped: frozenset[int] = frozenset(),
    ) -> None:
        self.vocabulary = vocabulary
        self.store = store
        self.version = version
        """The projection version whose table this writes."""
        self.table = table
        self.skipped = skipped
        """Positions an operator told this version to pass over."""

    @property
    def tag(self) -> str:
        """Names what the view's content depends on besides the events.

        The same stream version renders differently under another projection
        version or vocabulary, so entity tags of views include this.
        """
        return f"{self.version}.{self.vocabulary.digest[:12]}"

    def fold(self, item: Item | None, events: Iterable[Fact]) -> Item | None:
        """Apply ``events`` (one stream, in version order) to ``item``."""
        for event in events:
            if item is None:
                item = Item.unreported(
                    event.mode, event.order_id, event.upc, first_heard=event.received_at
                )
            if event.version <= item.version:
                continue
            if event.position in self.skipped:
                # Not even converted: the event may be the one whose upcasting
                # or reading fails.
                item.pass_over(
                    version=event.version,
                    position=event.position,
                    received_at=event.received_at,
                    raw_status=event.raw_status,
                )
                continue
            _report(event, item.id, self.vocabulary).mutate(item)
        return item

    async def apply(
        self, connection: Connection, events: Sequence[RecordedEvent]
    ) -> Applied:
        """Apply ``events`` to their item rows, in the caller's transaction.

        A stream whose fold raises is left untouched and reported, with the
        event that raised; the other streams are written.
        """
        newest: dict[StreamKey, int] = {}
        for event in events:
            newest[event.stream] = max(event.version, newest.get(event.stream, 0))
        current = await self.load(connection, list(newest), newest=newest)
        applied = await self.project(connection, events, current)
        if applied.views:
            await self.save(connection, applied.views)
        return applied

    async def project(
        self,
        connection: Connection,
        events: Sequence[RecordedEvent],
        current: dict[StreamKey, dict[str, Any]],
    ) -> Applied:
        """Fold ``events`` onto the saved rows ``current``; return what to save.

        Writes nothing: the caller saves ``Applied.views`` (``save``, or
        ``save_statement`` inside a larger statement).
        """
        by_stream: dict[StreamKey, list[RecordedEvent]] = {}
        for event in events:
            by_stream.setdefault(event.stream, []).append(event)
        views: list[ItemView] = []
        failures: list[FoldFailure] = []
        for stream, fresh in by_stream.items():
            known = current.get(stream)
            # A row already holding every event (the inline writer got there
            # first) needs neither a fold nor a write.
            if known is not None and known["version"] >= fresh[-1].version:
                continue
            item = Item.restore(known) if known else None
            applied = item.version if item is not None else 0
            pending = await self._with_missing(connection, stream, item, fresh)
            try:
                folded = self.fold(item, pending)
            except Exception as error:  # noqa: BLE001 - projection code is fallible
                poison = self.failing_event(known, pending)
                failures.append(FoldFailure(poison, repr(error)))
                continue
            if folded is not None and folded.version > applied:
                views.append(ItemView.of(folded))
        return Applied(views, failures)

    def failing_event(
        self, known: dict[str, Any] | None, pending: Sequence[AnyFact]
    ) -> AnyFact:
        """Return the event of ``pending`` whose fold raises.

        Folds again from the saved row (``known``), one event at a time.
        """
        item = Item.restore(known) if known else None
        for event in pending:
            try:
                item = self.fold(item, [event])
            except Exception:  # noqa: BLE001 - this is the one
                return event
        return pending[-1]

    async def _with_missing(
        self,
        connection: Connection,
        stream: StreamKey,
        item: Item | None,
        fresh: list[RecordedEvent],
    ) -> list[RecordedEvent]:
        applied = item.version if item is not None else 0
        if fresh[0].version <= applied + 1:
            return fresh
        # The row lags its stream (an earlier fold failed, or the row was
        # written by another version): catch up from the log first.
        missing = await self.store.read_stream(
            connection, stream, after_version=applied
        )
        return [e for e in missing if e.version < fresh[0].version] + fresh

    async def load(
        self,
        connection: Connection,
        streams: list[StreamKey],
        *,
        newest: dict[StreamKey, int] | None = None,
    ) -> dict[StreamKey, dict[str, Any]]:
        """Return the saved rows of ``streams`` that exist, by stream.

        With ``newest`` (a version per stream), a row already at or past its
        stream's version comes back as its version alone: the runner reads
        every event the inline writer has applied already, and decoding whole
        rows only to find them current is most of what its batches cost.
        """
        versions = [newest[s] for s in streams] if newest is not None else None
        rows = await connection.fetch(
            _load_statement(self.table),
            [s.mode for s in streams],
            [s.order_id for s in streams],
            [s.upc for s in streams],
            versions,
        )
        return {
            StreamKey(r[0], r[1], r[2]): (
                {"version": r[3]}
                if r["whole"] is None
                else dict(zip(VIEW_COLUMNS, r[_LOADED:], strict=True))
            )
            for r in rows
        }

    async def save(self, connection: Connection, views: Sequence[ItemView]) -> None:
        """Insert or replace the rows of ``views``; never move a row back."""
        await connection.execute(self.save_statement(), *save_arguments(views))

    def save_statement(self, first_parameter: int = 1) -> str:
        """Return the statement ``save`` runs, its parameters numbered from
        ``first_parameter`` (to stand inside a larger statement)."""
        return _upsert_statement(self.table, first_parameter)


async def create_view_table(connection: Connection, table: str) -> None:
    """Create an item view table (as the first was created by migration 0002).

    Only the primary key comes with it: a rebuild fills the table faster
    without the read indexes, which ``create_view_indexes`` adds afterwards.
    """
    await connection.execute(
        f"""
        CREATE TABLE "{table}" (
            mode                  text        NOT NULL,
            order_id              text        NOT NULL,
            upc                   text        NOT NULL,
            state                 text        NOT NULL,
            fulfilment            text        NOT NULL,
            refund                text        NOT NULL,
            message_count         integer     NOT NULL,
            redelivery_count      integer     NOT NULL,
            event_count           integer     NOT NULL,
            order_url             text,
            last_status           text        NOT NULL,
            last_transition       text,
            first_event_at        timestamptz NOT NULL,
            last_event_at         timestamptz NOT NULL,
            version               integer     NOT NULL,
            position              bigint      NOT NULL,
            unrecognized_statuses jsonb       NOT NULL,
            anomalies             jsonb       NOT NULL,
            updated_at            timestamptz NOT NULL DEFAULT now(),
            change_xid            xid8        NOT NULL DEFAULT pg_current_xact_id(),
            PRIMARY KEY (mode, order_id, upc)
        )
        """
    )


async def create_view_indexes(connection: Connection, table: str) -> None:
    """Add the indexes the read API and the change feed use."""
    await connection.execute(
        f'CREATE INDEX IF NOT EXISTS "{table}_state" ON "{table}" (mode, state)'
    )
    await connection.execute(
        f'CREATE INDEX IF NOT EXISTS "{table}_changes" '
        f'ON "{table}" (mode, change_xid, position)'
    )


@functools.lru_cache(maxsize=16)
def _load_statement(table: str) -> str:
    # $4 is NULL for every row whole, or the version each stream reads up to.
    return f"""
        SELECT k.mode, k.order_id, k.upc, v.version, w.mode AS whole, {_WHOLE}
        FROM unnest($1::text[], $2::text[], $3::text[], $4::int[])
             AS k(mode, order_id, upc, newest)
        JOIN {table} v
          ON v.mode = k.mode AND v.order_id = k.order_id AND v.upc = k.upc
        LEFT JOIN LATERAL (
            SELECT v.* WHERE k.newest IS NULL OR v.version < k.newest
        ) w ON true
    """


# The whole row's columns follow the fixed ones, from this index on.
_LOADED = 5


@functools.lru_cache(maxsize=16)
def _upsert_statement(table: str, first_parameter: int) -> str:
    columns = ", ".join(VIEW_COLUMNS)
    # The rows travel as one JSON document, each view an object named by
    # column: asyncpg would inspect every element of a parameter array.
    record = ", ".join(f"{c} {_SQL_TYPES[c]}" for c in VIEW_COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in VIEW_COLUMNS[3:])
    return f"""
        INSERT INTO {table} ({columns})
        SELECT {columns} FROM jsonb_to_recordset(${first_parameter}::jsonb)
             AS u({record})
        ON CONFLICT (mode, order_id, upc) DO UPDATE
        SET {updates}, updated_at = now(), change_xid = pg_current_xact_id()
        WHERE {table}.version < excluded.version
    """


def save_arguments(views: Sequence[ItemView]) -> list[Any]:
    """Return the parameters of ``save_statement``."""
    return [list(views)]


_SQL_TYPES = {
    "mode": "text",
    "order_id": "text",
    "upc": "text",
    "state": "text",
    "fulfilment": "text",
    "refund": "text",
    "message_count": "int",
    "redelivery_count": "int",
    "event_count": "int",
    "order_url": "text",
    "last_status": "text",
    "last_transition": "text",
    "first_event_at": "timestamptz",
    "last_event_at": "timestamptz",
    "version": "int",
    "position": "bigint",
    "unrecognized_statuses": "jsonb",
    "anomalies": "jsonb",
}
_WHOLE = ", ".join(f"w.{column}" for column in VIEW_COLUMNS)
