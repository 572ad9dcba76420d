"""Signed checkpoints: the head of every stream at a settled position.

Recording one:

1. find the settled position P (``settle.py``): no event at or below it can
   still appear;
2. under an advisory lock, so two recorders queue, take the heads recorded by
   the previous checkpoint and replace those of the streams that took events
   since its position; every stream's head at P follows;
3. hash them in stream order into the heads digest and sign it with the
   audit key (``digest.py`` gives the exact encoding);
4. store the checkpoint and the heads that moved since the previous one.

The heads come forward from the previous checkpoint rather than from the
events table, so a checkpoint never adopts a stream that lost events since
the one before: verification compares both and reports the difference.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
import structlog

from ordertrail.audit.digest import AuditKey, HeadsDigest
from ordertrail.audit.settle import settled_position
from ordertrail.db.connection import Connection

__all__ = ["Checkpoint", "list_checkpoints", "record_checkpoint", "recorded_heads"]

log = structlog.get_logger("ordertrail.audit")

# Any constant works; it only has to be the same in every process.
_CHECKPOINT_LOCK = 0x61756469_74636B70  # "auditckp"


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A signed statement of every stream's head at a position."""

    id: int
    position: int
    """Every event at or below this position is covered."""
    stream_count: int
    digest: bytes
    key_id: str
    signature: bytes
    created_at: datetime


_CHECKPOINT_COLUMNS = ", ".join(Checkpoint.__struct_fields__)

_DELTA = """
    SELECT DISTINCT ON (order_id, mode, upc) mode, order_id, upc, version, hash
    FROM events WHERE position > $1 AND position <= $2
    ORDER BY order_id, mode, upc, version DESC
"""

_HEADS_AT = f"""
    WITH delta AS ({_DELTA}),
    recorded AS (
        SELECT DISTINCT ON (order_id, mode, upc) mode, order_id, upc, version, hash
        FROM audit_checkpoint_heads
        ORDER BY order_id, mode, upc, checkpoint_id DESC
    )
    SELECT * FROM (
        SELECT mode, order_id, upc, version, hash FROM delta
        UNION ALL
        SELECT r.mode, r.order_id, r.upc, r.version, r.hash FROM recorded r
        WHERE NOT EXISTS (
            SELECT 1 FROM delta d
            WHERE d.order_id = r.order_id AND d.mode = r.mode AND d.upc = r.upc
        )
    ) heads
    ORDER BY mode COLLATE "C", order_id COLLATE "C", upc COLLATE "C"
"""

_INSERT_CHECKPOINT = f"""
    INSERT INTO audit_checkpoints ({_CHECKPOINT_COLUMNS}) OVERRIDING SYSTEM VALUE
    VALUES ($1, $2, $3, $4, $5, $6, $7)
"""

_INSERT_HEADS = f"""
    INSERT INTO audit_checkpoint_heads
        (checkpoint_id, mode, order_id, upc, version, hash)
    SELECT $3::bigint, mode, order_id, upc, version, hash FROM ({_DELTA}) delta
"""


async def record_checkpoint(
    connection: Connection, key: AuditKey, *, settle_within: float = 10.0
) -> Checkpoint | None:
    """Record and return a checkpoint; ``None`` when no event came since the last.

    ``connection`` must not be in a transaction: this waits for the log to
    settle, then commits the checkpoint in a transaction of its own.
    """
    position = await settled_position(connection, within=settle_within)
    # Read committed on purpose: after the lock, each statement must see a
    # checkpoint that another recorder committed while this one waited.
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _CHECKPOINT_LOCK)
        previous = await connection.fetchrow(
            "SELECT id, position FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
        )
        since = int(previous["position"]) if previous is not None else 0
        moved = await connection.fetchval(
            "SELECT EXISTS "
            "(SELECT 1 FROM events WHERE position > $1 AND position <= $2)",
            since,
            position,
        )
        if not moved:
            log.info("audit.checkpoint_skipped", position=position, since=since)
            return None

        digest = HeadsDigest()
        async for row in connection.cursor(_HEADS_AT, since, position, prefetch=5000):
            digest.add(row[0], row[1], row[2], row[3], row[4])
        checkpoint_id = await connection.fetchval(
            "SELECT nextval(pg_get_serial_sequence('audit_checkpoints', 'id'))"
        )
        # Stored to the microsecond, so what is signed is what is read back.
        created_at = datetime.now(UTC)
        checkpoint = Checkpoint(
            id=int(checkpoint_id),
            position=position,
            stream_count=digest.count,
            digest=digest.digest(),
            key_id=key.key_id,
            signature=key.sign(position, digest.count, digest.digest(), created_at),
            created_at=created_at,
        )
        await connection.execute(
            _INSERT_CHECKPOINT,
            *(getattr(checkpoint, name) for name in Checkpoint.__struct_fields__),
        )
        await connection.execute(_INSERT_HEADS, since, position, checkpoint.id)
    log.info(
        "audit.checkpoint_recorded",
        checkpoint=checkpoint.id,
        position=checkpoint.position,
        stream_count=checkpoint.stream_count,
        digest=checkpoint.digest.hex(),
        key_id=checkpoint.key_id,
    )
    return checkpoint


async def list_checkpoints(connection: Connection) -> list[Checkpoint]:
    """Return every checkpoint, oldest first."""
    rows = await connection.fetch(
        f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id"
    )
    return [Checkpoint(**dict(row.items())) for row in rows]


async def recorded_heads(
    connection: Connection,
) -> AsyncIterator[tuple[int, str, str, str, int, bytes]]:
    """Yield every recorded head row in digest order, inside a transaction.

    Rows are ``(checkpoint_id, mode, order_id, upc, version, hash)``, by
    stream in byte order of the key, then by checkpoint.
    """
    query = """
        SELECT checkpoint_id, mode, order_id, upc, version, hash
        FROM audit_checkpoint_heads
        ORDER BY mode COLLATE "C", order_id COLLATE "C", upc COLLATE "C",
                 checkpoint_id
    """
    async for row in connection.cursor(query, prefetch=5000):
        yield (row[0], row[1], row[2], row[3], row[4], row[5])
