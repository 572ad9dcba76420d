"""Item stamps for revalidation, read for many concurrent requests at once.

Point-of-sale systems revalidate the items they watch all day, and nearly
every revalidation finds its item unchanged. What it needs from the database
is the item's stamp (the transaction that last changed its row, and its
version): two columns of one index lookup. Read one request at a time, the
lookup's own cost is small beside the fixed cost of a statement (a pooled
connection, a round trip, a result to decode), so a 304 cost as much as a
200.

The reader shares statements the way the ingest writer shares commits. A
request that finds a reader free reads its own stamp at once, so a lone
poller waits for nobody; the requests that arrive while every reader is
busy form a batch, and one statement reads the stamps of the whole batch as
soon as a reader is free. Every statement starts after the
requests it answers arrived, so it sees every commit acknowledged before
them: a 304 never hides a change that was already acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

from ordertrail.eventstore.records import StreamKey

__all__ = ["Stamp", "StampReader"]

Stamp = tuple[int, int]
"""An item row's ``change_xid`` and ``version``."""

_STAMPS = """
    SELECT wanted.n, item.change_xid, item.version
    FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
         AS wanted (mode, order_id, upc, n)
    JOIN item_view AS item
      ON item.order_id = wanted.order_id
     AND item.mode = wanted.mode
     AND item.upc = wanted.upc
"""
_STAMP = (
    "SELECT change_xid, version FROM item_view "
    "WHERE order_id = $1 AND mode = $2 AND upc = $3"
)


class _Wanted:
    __slots__ = ("future", "item")

    def __init__(self, item: StreamKey, future: asyncio.Future[Stamp | None]) -> None:
        self.item = item
        self.future = future


class StampReader:
    """Reads item stamps from ``pool``, many requests to a statement.

    At most ``readers`` statements are in flight at once, each for at most
    ``batch_size`` items. A request that finds a reader free and nobody
    waiting reads its own stamp at once; the others wait for the next batch.
    """

    def __init__(
        self, pool: asyncpg.Pool, *, readers: int = 2, batch_size: int = 256
    ) -> None:
        self._pool = pool
        self._readers = readers
        self._batch_size = batch_size
        self._busy = 0
        self._waiting: list[_Wanted] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def stamp(self, item: StreamKey) -> Stamp | None:
        """Return the item's stamp, or None if it has no row.

        Raises what the database raised for this item's statement: a value
        no stored one can equal (``asyncpg.DataError``), or the database
        being out of reach.
        """
        if self._busy < self._readers and not self._waiting:
            self._busy += 1
            try:
                return await self._read_one(item)
            finally:
                self._busy -= 1
                self._start_reading()
        future: asyncio.Future[Stamp | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting.append(_Wanted(item, future))
        self._start_reading()
        return await future

    def _start_reading(self) -> None:
        if self._waiting and self._busy < self._readers:
            self._busy += 1
            task = asyncio.create_task(self._read_waiting())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._batch_size]
                del self._waiting[: self._batch_size]
                try:
                    await self._answer(batch)
                except BaseException as error:
                    _fail(batch, error)
                    if not isinstance(error, Exception):
                        raise
        finally:
            self._busy -= 1

    async def _answer(self, batch: Sequence[_Wanted]) -> None:
        if len(batch) == 1:
            await self._answer_alone(batch[0])
            return
        try:
            stamps = await self._read_batch([wanted.item for wanted in batch])
        except asyncpg.DataError:
            # One item's value cannot be compared with stored text (a NUL):
            # read each alone, so only its own request gets the error.
            for wanted in batch:
                await self._answer_alone(wanted)
            return
        for wanted, stamp in zip(batch, stamps, strict=True):
            if not wanted.future.done():
                wanted.future.set_result(stamp)

    async def _answer_alone(self, wanted: _Wanted) -> None:
        try:
            stamp = await self._read_one(wanted.item)
        except asyncpg.DataError as error:
            if not wanted.future.done():
                wanted.future.set_exception(error)
            return
        if not wanted.future.done():
            wanted.future.set_result(stamp)

    async def _read_one(self, item: StreamKey) -> Stamp | None:
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(_STAMP, item.order_id, item.mode, item.upc)
        return None if row is None else (row[0], row[1])

    async def _read_batch(self, items: Sequence[StreamKey]) -> list[Stamp | None]:
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(
                _STAMPS,
                [item.mode for item in items],
                [item.order_id for item in items],
                [item.upc for item in items],
            )
        stamps: list[Stamp | None] = [None] * len(items)
        for number, change_xid, version in rows:
            stamps[number - 1] = (change_xid, version)
        return stamps


def _fail(batch: Sequence[_Wanted], error: BaseException) -> None:
    for wanted in batch:
        if not wanted.future.done():
            if isinstance(error, Exception):
                wanted.future.set_exception(error)
            else:
                wanted.future.cancel()
