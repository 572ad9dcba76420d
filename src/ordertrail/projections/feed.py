"""Where the change feed stands: the newest visible change per mode.

Long-polling clients wait for the feed to move past their cursor. Rather than
each of them querying on every commit, one task follows the events channel,
reads the feed's head (one index probe per mode) and wakes only the waiters
the head has passed. Hundreds of idle pollers cost an awaiting coroutine each.
While nobody waits, a commit only marks the head stale, and the next waiter
reads it: under a stream of webhooks and no long poll, following the feed
costs nothing.

With a read replica, the head is read where the pages are, on the replica,
while the notifications still come from the primary (a standby neither sends
nor relays them). A notification can then arrive before the replica shows the
commit it announces; the head waits until the replica has replayed the
primary's WAL up to where it stood after the notification, however long that
takes, and only then looks.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from ordertrail.db.replica import ReadReplica
from ordertrail.eventstore.notifications import PositionSignal

__all__ = ["FeedHead", "FeedPlace"]

log = structlog.get_logger("ordertrail.feed")

FeedPlace = tuple[int, int]
"""A place in the change feed: (change_xid, position) of an item row."""

# Both modes' heads in one round trip, each one probe of the feed's index.
_HEADS = """
    SELECT modes.mode, head.change_xid, head.position
    FROM unnest($1::text[]) AS modes (mode)
    CROSS JOIN LATERAL (
        SELECT change_xid, position FROM item_view
        WHERE mode = modes.mode
          AND change_xid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY change_xid DESC, position DESC
        LIMIT 1
    ) AS head
"""

# After a commit is announced the head may not move at once: a transaction
# still open elsewhere holds the snapshot horizon back. Look again at these
# growing intervals until it moves.
_RETRY_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

# What reading the head raises when its database is out of reach.
# InternalClientError is what asyncpg raises for a query on a connection the
# server has just ended while it sat idle (a fast shutdown): let through, it
# would end the follower, and no long poll would be woken again until the
# process restarts.
_UNREADABLE = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

_REPLAY_PATIENCE = 60.0
"""Seconds a replica may take to replay an announced commit before a warning."""


class FeedHead:
    """Follows the newest visible change of each mode and wakes waiters."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        appended: PositionSignal,
        *,
        replica: ReadReplica | None = None,
    ) -> None:
        """Follow the head in ``pool``: the pool the change feed's pages read.

        ``replica`` is given when that pool is a replica's, so that the head
        waits for the replica to replay what a notification announced.
        """
        self._pool = pool
        self._appended = appended
        self._replica = replica
        self._heads: dict[str, FeedPlace] = {"live": (0, 0), "test": (0, 0)}
        self._moved: dict[str, asyncio.Event] = {
            m: asyncio.Event() for m in self._heads
        }
        self._task: asyncio.Task[None] | None = None
        self._waiting = 0
        self._stale = False

    def head(self, mode: str) -> FeedPlace:
        """Return the newest change of ``mode`` seen so far."""
        return self._heads[mode]

    async def start(self) -> None:
        """Read the heads, then follow the events channel in the background."""
        try:
            await self.refresh()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            # A replica that is down must not keep the service from taking
            # webhooks; the first waiter reads the heads again.
            if self._replica is None:
                raise
            log.warning("feed.refresh_failed", error=str(error))
            self._stale = True
        self._task = asyncio.create_task(self._follow(), name="ordertrail-feed-head")

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_past(self, mode: str, place: FeedPlace, seconds: float) -> bool:
        """Wait until the head of ``mode`` is past ``place``; False on timeout.

        A head left stale while nobody waited is read first; it may then be
        past ``place`` at once, and the caller looks again.
        """
        self._waiting += 1
        try:
            async with asyncio.timeout(seconds):
                if self._stale:
                    await self._refresh_stale()
                while self._heads[mode] <= place:
                    await self._moved[mode].wait()
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1
        return True

    async def refresh(self) -> bool:
        """Read the heads now; return whether any moved."""
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(_HEADS, list(self._heads))
        moved = False
        for row in rows:
            mode, place = row["mode"], (row["change_xid"], row["position"])
            if place > self._heads[mode]:
                self._heads[mode] = place
                self._wake(mode)
                moved = True
        return moved

    async def _refresh_stale(self) -> None:
        # The first waiter looks for all, as the follower would have looked
        # at the commits nobody waited for (waiting for a replica to replay
        # them, retrying while the horizon holds them back); the others wait
        # on the events, which the look sets if the head moves.
        self._stale = False
        try:
            await self._look()
        except _UNREADABLE as error:
            log.warning("feed.refresh_failed", error=str(error))
            self._stale = True
        except BaseException:
            self._stale = True
            raise

    def _wake(self, mode: str) -> None:
        # Waiters hold the old event; a fresh one is ready for the next wait.
        self._moved[mode].set()
        self._moved[mode] = asyncio.Event()

    async def _follow(self) -> None:
        seen = self._appended.count
        while True:
            # The periodic look also covers a notification lost with a
            # dropped listener connection.
            seen = await self._appended.wait_after(seen, 30.0)
            if not self._waiting:
                self._stale = True
                continue
            try:
                await self._look()
            except _UNREADABLE as error:
                log.warning("feed.refresh_failed", error=str(error))
                await asyncio.sleep(1.0)

    async def _look(self) -> None:
        await self._until_replayed()
        await self._refresh_until_moved()

    async def _until_replayed(self) -> None:
        # The horizon retries below cover a transaction held open for a
        # second or two; a replica can lag for longer, and a head read before
        # it replays the commit would leave the waiters asleep until the next
        # notification or the periodic look.
        if self._replica is None:
            return
        target = await self._replica.primary_position()
        waited = 0.0
        while not await self._replica.until_replayed(target, within=_REPLAY_PATIENCE):
            waited += _REPLAY_PATIENCE
            log.warning("feed.replica_behind", wal_position=target, waited=waited)

    async def _refresh_until_moved(self) -> None:
        if await self.refresh():
            return
        for delay in _RETRY_DELAYS:
            await asyncio.sleep(delay)
            if await self.refresh():
                return
