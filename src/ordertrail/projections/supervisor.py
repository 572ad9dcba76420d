"""Electing the one runner that follows the log for a served projection.

Any number of ``ordertrail serve`` processes may run; each tries to take a
session advisory lock on a connection of its own. The holder runs the served
version's runner; when it dies, PostgreSQL drops its connection and its lock,
and another process takes over at its next attempt, within seconds.

The inline writer keeps the served view current as deliveries commit; this
runner moves the checkpoint behind it, fills in anything the inline path
left (a failed fold, a swap), and is where a poison event stops.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from ordertrail.db.connection import Connection, connect
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.notifications import PositionSignal
from ordertrail.eventstore.store import EventStore
from ordertrail.projections import catalogue
from ordertrail.projections.items import PROJECTION_NAME, ItemProjection
from ordertrail.projections.runner import ProjectionRunner

__all__ = ["RunnerSupervisor", "runner_lock_sql"]

log = structlog.get_logger("ordertrail.projections")

# What a lost or refused connection raises. InternalClientError is among them:
# when the server ends a session while it is idle (a fast shutdown, a
# terminated backend), asyncpg takes the unexpected error into a state that
# refuses the next query with it, until it notices the socket closed. Any of
# these leaves the loop to reconnect; letting one through would end the
# election for good in this process.
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def runner_lock_sql(function: str = "pg_try_advisory_lock") -> str:
    """Return the statement taking the lock that elects a projection's runner."""
    return f"SELECT {function}(hashtext('ordertrail.runner'), hashtext($1))"


class RunnerSupervisor:
    """Competes for a projection's runner role and runs it while elected."""

    def __init__(
        self,
        dsn: str,
        store: EventStore,
        configured: Vocabulary,
        appended: PositionSignal,
        changed: PositionSignal,
        *,
        name: str = PROJECTION_NAME,
        retry_interval: float = 2.0,
        poll_interval: float = 5.0,
        catch_up_interval: float = 0.05,
        batch_size: int = 5000,
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._configured = configured
        self._appended = appended
        self._changed = changed
        self._name = name
        self._retry_interval = retry_interval
        self._poll_interval = poll_interval
        self._catch_up_interval = catch_up_interval
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self.elected = asyncio.Event()
        """Set while this process runs the projection."""

    async def start(self) -> None:
        """Compete for the role in the background."""
        self._task = asyncio.create_task(self._compete(), name="ordertrail-runner")

    async def stop(self) -> None:
        """Stop running (the lock goes with the connection)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _compete(self) -> None:
        while True:
            try:
                connection = await connect(self._dsn)
            except _UNAVAILABLE as error:
                log.warning("projection.runner_unavailable", error=str(error))
                await asyncio.sleep(self._retry_interval)
                continue
            try:
                if await connection.fetchval(runner_lock_sql(), self._name):
                    await self._lead(connection)
            except _UNAVAILABLE as error:
                log.warning("projection.runner_lost", error=str(error))
            finally:
                self.elected.clear()
                with contextlib.suppress(Exception):
                    await connection.close(timeout=1)
            await asyncio.sleep(self._retry_interval)

    async def _lead(self, connection: Connection) -> None:
        self.elected.set()
        log.info("projection.runner_elected", projection=self._name)
        seen = self._appended.count
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self._follow_served(connection)
            # The inline writer has already applied what commits; the runner
            # only moves the checkpoint behind it. Catching up after every
            # commit cost the ingest path a tenth of its CPU: while commits
            # stream in, gather them for a moment and catch up on many at once.
            await asyncio.sleep(started + self._catch_up_interval - loop.time())
            # Wake on the next commit or catalogue change, or poll: a commit
            # behind a held-back horizon announces nothing when it settles.
            waiters = {
                asyncio.create_task(
                    self._appended.wait_after(seen, self._poll_interval)
                ),
                asyncio.create_task(self._changed.wait(self._poll_interval)),
            }
            _done, pending = await asyncio.wait(
                waiters, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            seen = self._appended.count

    async def _follow_served(self, connection: Connection) -> None:
        record = await catalogue.served(connection, self._name)
        if record.failed:
            return
        skipped = await catalogue.skipped_positions(
            connection, self._name, record.version
        )
        projection = ItemProjection(
            record.vocabulary_or(self._configured),
            self._store,
            version=record.version,
            table=record.table_name,
            skipped=skipped,
        )
        runner = ProjectionRunner(
            self._store,
            projection,
            self._name,
            batch_size=self._batch_size,
            behind_writer=True,
        )
        await runner.catch_up(connection)
