"""Group commit: many deliveries, one transaction, each answered after commit.

Requests hand their delivery to the writer and wait. A committer takes what
is queued (waiting up to ``commit_delay`` for more, at most ``batch_size``),
appends it in one transaction that also updates the served item view,
commits, and only then resolves each request; two committers work at once,
so one batch gathers while another waits on the database. A failure before the commit
fails every request of the batch, so each answers 503 and Locally retries;
nothing is acknowledged that is not durable. (The projection's checkpoint is
moved by its runner, which reads the log below the snapshot horizon.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import asyncpg
import structlog

from ordertrail.db.connection import Connection
from ordertrail.eventstore.records import Appended, Delivery
from ordertrail.eventstore.store import (
    EVENTS_CHANNEL,
    INSERT,
    EventStore,
    NewEvent,
    insert_arguments,
    stream_lock_keys,
)
from ordertrail.lib.metrics import APPEND_SECONDS, BATCH_SIZE
from ordertrail.projections.items import (
    PROJECTION_NAME,
    VIEW_COLUMNS,
    ItemProjection,
    save_arguments,
)
from ordertrail.projections.served import ServedProjection

__all__ = ["AppendFailed", "GroupCommitWriter", "append_and_project"]

log = structlog.get_logger("ordertrail.ingest")

# Errors that mean the database is out of reach, not that a delivery is bad:
# retrying the batch one by one would only fail again, more slowly.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)


class AppendFailed(Exception):
    """The delivery was not committed; the sender should retry."""


async def append_and_project(
    connection: Connection,
    store: EventStore,
    served: ServedProjection,
    deliveries: Sequence[Delivery],
) -> list[NewEvent]:
    """Append ``deliveries`` and apply them to the served item view, together.

    Opens a transaction (a savepoint if the caller has one open) and commits
    it before returning. If the projection code raises on an item, that item's
    row is left behind and the failure logged: the events still commit, and
    the projection's runner stops on the event so an operator can look.

    Each statement costs a round trip to the server, and on a small machine a
    round trip costs more of the service's CPU than all the Python around it,
    so the batch takes three besides the transaction's own: the locks, the
    streams' heads with the item rows, and one write of events, rows and the
    notification.
    """
    streams = sorted({delivery.stream for delivery in deliveries})
    async with connection.transaction():
        version = await connection.fetchval(
            _ENTER_AND_LOCK, PROJECTION_NAME, stream_lock_keys(streams)
        )
        if version is None:
            msg = f"no version of projection {PROJECTION_NAME!r} is being served"
            raise LookupError(msg)
        projection = await served.load(connection, version)
        events, rows = await store.place(
            connection,
            deliveries,
            streams,
            rows_of=projection.table,
            row_columns=VIEW_COLUMNS,
        )
        applied = await projection.project(
            connection, [event.recorded() for event in events], rows
        )
        for failure in applied.failures:
            log.error(
                "projection.apply_failed",
                projection=PROJECTION_NAME,
                version=version,
                position=failure.event.position,
                order_id=failure.event.order_id,
                upc=failure.event.upc,
                error=failure.error,
            )
        # One notification per commit, naming the highest position appended.
        last = max(event.position for event in events)
        appending = insert_arguments(events)
        saving = save_arguments(applied.views)
        await connection.execute(
            _write_statement(projection, len(appending), len(saving)),
            *appending,
            *saving,
            EVENTS_CHANNEL,
            str(last),
        )
    return events


# The shared side of the projection's swap lock first (as ``enter_projection``
# in ordertrail.projections.served takes it), then the streams' locks: the
# subquery names the served version, so it runs once that lock is held.
_ENTER_AND_LOCK = """
    SELECT entered.served, (
        SELECT count(*) FROM unnest($2::bigint[]) AS key,
             LATERAL pg_advisory_xact_lock(key)
        WHERE entered.served IS NOT NULL
    ) AS locked
    FROM (SELECT enter_projection($1) AS served OFFSET 0) AS entered
"""


def _write_statement(projection: ItemProjection, appending: int, saving: int) -> str:
    # The insert's parameters come first, then the save's, then the notice's.
    first = appending + 1
    channel = first + saving
    return f"""
        WITH appended AS ({INSERT}),
        projected AS ({projection.save_statement(first)})
        SELECT pg_notify(${channel}, ${channel + 1})
    """


class _Pending:
    __slots__ = ("delivery", "future")

    def __init__(self, delivery: Delivery, future: asyncio.Future[Appended]) -> None:
        self.delivery = delivery
        self.future = future


class GroupCommitWriter:
    """Shares transactions among concurrent appends.

    ``committers`` batches may be committing at once, each on its own
    connection: a commit spends most of its time waiting for the server (the
    statements, the WAL flush), and meanwhile another batch can gather and
    go. Batches that share a stream take its lock in turn, so a stream's
    events still follow each other in one order.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: EventStore,
        served: ServedProjection,
        *,
        commit_delay: float = 0.002,
        batch_size: int = 256,
        committers: int = 2,
    ) -> None:
        self._pool = pool
        self._store = store
        self._served = served
        self._commit_delay = commit_delay
        self._batch_size = batch_size
        self._committers = committers
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start committing in the background."""
        self._tasks = [
            asyncio.create_task(self._run(), name=f"ordertrail-writer-{n}")
            for n in range(1, self._committers + 1)
        ]

    async def stop(self, grace: float = 10.0) -> None:
        """Commit what is queued (for up to ``grace`` seconds), then stop."""
        if not self._tasks:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._queue.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def append(self, delivery: Delivery) -> Appended:
        """Append one delivery; return once it is committed.

        Raises ``AppendFailed`` if it was not committed.
        """
        if not self._tasks or all(task.done() for task in self._tasks):
            msg = "the writer is not running"
            raise AppendFailed(msg)
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(delivery, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _gather(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self._commit_delay
        while len(batch) < self._batch_size:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            else:
                batch.append(self._queue.get_nowait())
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            events = await self._write([p.delivery for p in batch])
        except _UNAVAILABLE as error:
            log.error(  # noqa: TRY400 - the database is down; no traceback needed
                "writer.unavailable", error=str(error), batch=len(batch)
            )
            _fail(batch, error)
        except Exception as error:
            if len(batch) == 1:
                log.exception("writer.failed", batch=1)
                _fail(batch, error)
                return
            # Something in the batch made the transaction fail. Commit each
            # delivery on its own so one bad delivery cannot sink the others.
            log.warning("writer.batch_failed", error=str(error), batch=len(batch))
            for pending in batch:
                await self._commit([pending])
        else:
            APPEND_SECONDS.observe(time.perf_counter() - started)
            BATCH_SIZE.observe(len(batch))
            for pending, event in zip(batch, events, strict=True):
                if not pending.future.done():
                    pending.future.set_result(event.appended)

    async def _write(self, deliveries: list[Delivery]) -> list[NewEvent]:
        async with self._pool.acquire() as connection:
            return await append_and_project(
                connection, self._store, self._served, deliveries
            )


def _fail(batch: list[_Pending], error: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            failure = AppendFailed(str(error))
            failure.__cause__ = error
            pending.future.set_exception(failure)
