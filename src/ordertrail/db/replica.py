"""A streaming replica that answers reads, and how far behind the primary it is.

A hot standby shows a commit only once it has replayed the commit's WAL
record. Whatever learns of a commit on the primary (a notification, a
settled position) and then reads on the replica must first wait until the
replica has replayed up to the primary's WAL position taken after that
commit, or it reads a past the primary has already left.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import msgspec

__all__ = ["ReadReplica", "ReplicaStatus"]

_PRIMARY_POSITION = "SELECT pg_current_wal_lsn()::text"

# A server that is not in recovery has nothing to replay: it shows every
# commit it will ever show.
_REPLAYED = "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, true)"

_BEHIND = """
    SELECT pg_is_in_recovery() AS standby,
           coalesce(pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()), 0)
               ::bigint AS behind
"""

# Whether a commit acknowledged on the primary is already applied by its
# synchronous standbys, and at least one of them is connected.
_APPLIES_BEFORE_ACKNOWLEDGING = """
    SELECT current_setting('synchronous_commit') = 'remote_apply'
       AND current_setting('synchronous_standby_names') <> ''
       AND EXISTS (
           SELECT FROM pg_stat_replication
           WHERE sync_state IN ('sync', 'quorum') AND state = 'streaming'
       )
"""


class ReplicaStatus(msgspec.Struct, frozen=True, kw_only=True):
    """How the replica stands against the primary, at one moment."""

    standby: bool
    """Whether the replica is in recovery (a standby), as it must be."""
    lag_bytes: int
    """WAL the primary has written that the replica has not replayed yet."""
    read_your_writes: bool
    """Whether the primary acknowledges a commit only once standbys applied it."""


class ReadReplica:
    """The primary's pool and the replica's, for what must compare them."""

    def __init__(self, primary: asyncpg.Pool, reads: asyncpg.Pool) -> None:
        self._primary = primary
        self._reads = reads

    async def primary_position(self) -> str:
        """The primary's WAL position now, past every commit made so far."""
        async with self._primary.acquire() as connection:
            position: str = await connection.fetchval(_PRIMARY_POSITION)
        return position

    async def replayed(self, position: str) -> bool:
        """Whether the replica has replayed the primary's WAL up to ``position``."""
        async with self._reads.acquire() as connection:
            return bool(await connection.fetchval(_REPLAYED, position))

    async def until_replayed(
        self, position: str, *, within: float, poll: float = 0.002
    ) -> bool:
        """Wait until the replica has replayed up to ``position``; False on timeout.

        The first looks come quickly (a synchronous or nearby replica is
        there within milliseconds), later ones at most every quarter second.
        """
        deadline = time.monotonic() + within
        while not await self.replayed(position):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll)
            poll = min(poll * 2, 0.25)
        return True

    async def caught_up(self, *, within: float) -> bool:
        """Wait until the replica shows every commit made on the primary so far."""
        return await self.until_replayed(await self.primary_position(), within=within)

    async def status(self) -> ReplicaStatus:
        """Measure the replica's lag and whether reads follow acknowledged writes."""
        async with self._primary.acquire() as connection:
            position: str = await connection.fetchval(_PRIMARY_POSITION)
            applies = bool(await connection.fetchval(_APPLIES_BEFORE_ACKNOWLEDGING))
        async with self._reads.acquire() as connection:
            row = await connection.fetchrow(_BEHIND, position)
        assert row is not None
        return ReplicaStatus(
            standby=bool(row["standby"]),
            lag_bytes=max(0, int(row["behind"])),
            read_your_writes=applies,
        )
