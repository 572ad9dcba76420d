"""The projection the ingest writer updates inline: always the served version.

A swap can change the served version (its table and its vocabulary) between
two appends. Every append learns the served version inside its own
transaction, under the shared side of the swap lock, and this holder makes
sure the projection it applies is that version, reloading it when a swap or
an operator's skip made the one in hand stale.
"""

from __future__ import annotations

from ordertrail.db.connection import Connection
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.store import EventStore
from ordertrail.projections import catalogue
from ordertrail.projections.items import PROJECTION_NAME, ItemProjection

__all__ = ["ServedProjection", "enter_projection"]


async def enter_projection(connection: Connection, name: str = PROJECTION_NAME) -> int:
    """Take the shared side of ``name``'s swap lock; return the served version.

    Call it first in a transaction that updates the projection inline.
    """
    served = await connection.fetchval("SELECT enter_projection($1)", name)
    if served is None:
        msg = f"no version of projection {name!r} is being served"
        raise LookupError(msg)
    return int(served)


class ServedProjection:
    """Holds the item projection of the served version, reloaded on change."""

    def __init__(
        self, store: EventStore, configured: Vocabulary, name: str = PROJECTION_NAME
    ) -> None:
        self._store = store
        self._configured = configured
        self._name = name
        self._current: ItemProjection | None = None
        self._stale = True

    @property
    def current(self) -> ItemProjection | None:
        """The projection last loaded, if any (for tags and diagnostics)."""
        return self._current

    def invalidate(self, _payload: str | None = None) -> None:
        """Reload before the next append (the catalogue announced a change)."""
        self._stale = True

    async def refresh(self, connection: Connection) -> ItemProjection:
        """Load whatever version is served now."""
        record = await catalogue.served(connection, self._name)
        return await self.load(connection, record.version)

    async def load(self, connection: Connection, version: int) -> ItemProjection:
        """Return the projection of ``version``, reading the catalogue if needed."""
        current = self._current
        if current is not None and not self._stale and current.version == version:
            return current
        record = await catalogue.find(connection, self._name, version)
        if record is None:
            msg = f"projection {self._name!r} has no version {version}"
            raise LookupError(msg)
        skipped = await catalogue.skipped_positions(connection, self._name, version)
        self._current = ItemProjection(
            record.vocabulary_or(self._configured),
            self._store,
            version=version,
            table=record.table_name,
            skipped=skipped,
        )
        self._stale = False
        return self._current
