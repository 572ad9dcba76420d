"""The settled position: the highest position below which the log is final.

Positions come from the events table's identity sequence, which hands them
out in call order, not commit order: position 120 may still belong to an
open transaction when 121 is already committed. A checkpoint or an export
that covered "everything up to 121" at that moment would miss 120 once it
commits, and the next look at the same range would disagree with the first.

PostgreSQL takes a ROW EXCLUSIVE lock on a sequence in every transaction that
draws from it, and keeps it until the transaction ends. So: read the
sequence's last value L, list the transactions holding that lock, and wait
until each has ended. Every position up to L was drawn before L was read, by
a transaction that then held the lock, so it was listed and has now committed
or rolled back. Past that point no event at or below L can appear (short of
an insert by hand with an explicit position, which verification reports).

Nothing here blocks a writer: the wait only watches ``pg_locks``. It lasts as
long as the appends already in flight, a few milliseconds, unless some
transaction holds the sequence for long; then it gives up.

It needs the primary. A standby's ``pg_locks`` does not list the primary's
transactions, and its copy of the sequence runs up to 32 values ahead of the
numbers handed out (the primary logs sequences ahead), so a standby is
refused rather than answered wrongly.
"""

from __future__ import annotations

import asyncio
import time

from ordertrail.db.connection import Connection

__all__ = ["LogNotSettled", "settled_position"]


class LogNotSettled(RuntimeError):
    """Transactions holding positions did not end in time, or none can be seen."""


_SEQUENCE = "SELECT pg_get_serial_sequence('events', 'position')"

_HOLDERS = """
    SELECT coalesce(array_agg(virtualtransaction), '{}') FROM pg_locks
    WHERE locktype = 'relation' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND relation = $1::regclass
      AND pid <> pg_backend_pid()
"""

_STILL_HOLDING = """
    SELECT count(*) FROM pg_locks
    WHERE locktype = 'relation' AND relation = $1::regclass
      AND virtualtransaction = ANY($2::text[])
"""


async def settled_position(
    connection: Connection, *, within: float = 10.0, poll: float = 0.002
) -> int:
    """Return the highest position at or below which no event can still appear.

    ``connection`` must not be inside a transaction that drew a position.
    Raises ``LogNotSettled`` if the transactions in flight outlast ``within``
    seconds: an error that names them says more than a cancelled wait; and
    on a standby, which cannot see them.
    """
    if await connection.fetchval("SELECT pg_is_in_recovery()"):
        msg = "the settled position can only be read on the primary, not a standby"
        raise LogNotSettled(msg)
    sequence = await connection.fetchval(_SEQUENCE)
    cache = await connection.fetchval(
        "SELECT seqcache FROM pg_sequence WHERE seqrelid = $1::regclass", sequence
    )
    if cache != 1:
        # A session could later hand out a number below L from its cache,
        # without drawing again: the lock would no longer tell.
        msg = f"{sequence} caches {cache} values; settling needs CACHE 1"
        raise LogNotSettled(msg)

    # The name comes from the catalogue, already quoted, never from input.
    row = await connection.fetchrow(f"SELECT last_value, is_called FROM {sequence}")
    assert row is not None
    last = int(row["last_value"]) if row["is_called"] else 0
    holders = list(await connection.fetchval(_HOLDERS, sequence))

    deadline = time.monotonic() + within
    while holders:
        if not await connection.fetchval(_STILL_HOLDING, sequence, holders):
            break
        if time.monotonic() > deadline:
            msg = (
                f"transactions {', '.join(holders)} still hold positions after "
                f"{within:g} s; the log up to position {last} is not final yet"
            )
            raise LogNotSettled(msg)
        await asyncio.sleep(poll)
        poll = min(poll * 2, 0.05)
    return last
