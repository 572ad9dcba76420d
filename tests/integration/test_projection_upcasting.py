"""Upcasting end to end: a new event class version, a rebuild, the new view.

The stored log never changes. A report stored in an older shape is upcast on
its way into the projection by the ``upcast_vN_vM`` methods of the event
class, as the eventsourcing library defines them; a report stored in the
current shape passes as it is. Here the new class version is installed for
the length of a test by patching the event class, in this process, where the
rebuild runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from ordertrail.domain.item import Item
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.hashing import GENESIS
from ordertrail.eventstore.records import EVENT_TYPE, StreamKey
from ordertrail.eventstore.store import NewEvent
from ordertrail.projections import rebuild
from ordertrail.projections.items import PROJECTION_NAME
from ordertrail.projections.runner import ProjectionRunner
from ordertrail.projections.served import ServedProjection
from tests.integration.projection_support import (
    STORE,
    OwnDatabase,
    append_inline,
    differing,
    projection_for,
    report,
    rows_of,
    scratch_fold,
    served_version,
    settle,
)
from tests.support import UPC, new_order_id

# Version 1 reports of an old integration carried status codes; version 2
# carries the words Locally uses.
CODES = {"S1": "ordered", "S3": "confirmed", "S5": "picked up"}


@pytest.fixture
def new_class_version(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[dict[str, str]], None]:
    """Install StatusReported version 2, whose upcaster maps ``codes``."""

    def install(codes: dict[str, str]) -> None:
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["raw_status"] = codes.get(state["raw_status"], state["raw_status"])

        monkeypatch.setattr(Item.StatusReported, "class_version", 2)
        monkeypatch.setattr(
            Item.StatusReported,
            "upcast_v1_v2",
            staticmethod(upcast_v1_v2),
            raising=False,
        )

    return install


async def store_in_current_shape(
    pool: asyncpg.Pool, order_id: str, statuses: list[str]
) -> None:
    """Store reports already in shape 2, straight into the log, hash-chained."""
    previous = GENESIS
    for version, status in enumerate(statuses, start=1):
        delivered = report(order_id, status)
        event = NewEvent(
            delivered, version, previous, hashlib.sha256(delivered.raw_body).digest()
        )
        await pool.execute(
            """
            INSERT INTO events (mode, order_id, upc, version, event_type,
                schema_version, raw_status, raw_body, body_sha256, received_at,
                request_id, client_address, token_id, previous_hash, hash)
            VALUES ($1, $2, $3, $4, $5, 2, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            """,
            delivered.mode,
            delivered.order_id,
            delivered.upc,
            version,
            EVENT_TYPE,
            delivered.raw_status,
            delivered.raw_body,
            event.body_sha256,
            delivered.received_at,
            delivered.request_id,
            delivered.client_address,
            delivered.token_id,
            event.previous_hash,
            event.hash,
        )
        previous = event.hash


async def rebuild_and_swap(pool: asyncpg.Pool) -> int:
    """Rebuild with the shipped vocabulary and swap; return items that changed."""
    await settle(pool)
    async with pool.acquire() as connection:
        await rebuild.rebuild_lock(connection)
        try:
            building = await rebuild.begin(connection, Vocabulary.default())
            assert (await rebuild.build(connection, building, STORE)).failure is None
            await rebuild.prepare(connection, building)
            changed = (await rebuild.differences(connection, building)).differing
            await rebuild.swap(connection, building, STORE)
        finally:
            await connection.execute("SELECT pg_advisory_unlock_all()")
    return changed


async def current_rows(pool: asyncpg.Pool) -> dict[StreamKey, Any]:
    async with pool.acquire() as connection:
        table = (await served_version(pool)).table_name
        return await rows_of(connection, table)


async def test_a_rebuild_upcasts_old_reports_and_leaves_current_ones_as_stored(
    own: OwnDatabase,
    new_class_version: Callable[[dict[str, str]], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = ServedProjection(STORE, Vocabulary.default())
    legacy, current = new_order_id(), new_order_id()
    for code in ("S1", "S3"):
        await append_inline(own.pool, served, [report(legacy, code)])
    await store_in_current_shape(own.pool, current, ["ordered", "S3"])
    await settle(own.pool)
    async with own.pool.acquire() as connection:
        runner = ProjectionRunner(
            STORE, await projection_for(connection, 1), PROJECTION_NAME
        )
        await runner.catch_up(connection)
    before = await current_rows(own.pool)
    assert before[StreamKey("live", legacy, UPC)].unrecognized_statuses == {
        "S1": 1,
        "S3": 1,
    }

    new_class_version(CODES)
    changed = await rebuild_and_swap(own.pool)

    assert changed == 1
    assert (await served_version(own.pool)).version == 2
    after = await current_rows(own.pool)
    upcast = after[StreamKey("live", legacy, UPC)]
    assert (upcast.state, upcast.last_status) == ("confirmed", "confirmed")
    assert upcast.unrecognized_statuses == {}
    # Stored in shape 2: no upcaster runs, a code in it stays a code.
    as_stored = after[StreamKey("live", current, UPC)]
    assert as_stored == before[StreamKey("live", current, UPC)]
    assert as_stored.unrecognized_statuses == {"S3": 1}

    # The writer upcasts what it applies inline too.
    await append_inline(own.pool, served, [report(legacy, "S5")])
    completed = (await current_rows(own.pool))[StreamKey("live", legacy, UPC)]
    assert (completed.state, completed.version) == ("completed", 3)
    async with own.pool.acquire() as connection:
        expected = await scratch_fold(connection, await projection_for(connection, 2))
        stored = await connection.fetch(
            "SELECT raw_status FROM events WHERE order_id = $1 ORDER BY version",
            legacy,
        )
    assert differing(await current_rows(own.pool), expected) == []
    # The log itself was never rewritten.
    assert [row["raw_status"] for row in stored] == ["S1", "S3", "S5"]

    monkeypatch.undo()
    assert Item.StatusReported.class_version == 1
    assert not hasattr(Item.StatusReported, "upcast_v1_v2")


async def test_a_rebuild_after_a_code_fix_does_not_keep_rows_of_the_code_before(
    own: OwnDatabase, new_class_version: Callable[[dict[str, str]], None]
) -> None:
    served = ServedProjection(STORE, Vocabulary.default())
    legacy = new_order_id()
    for code in ("S1", "S3"):
        await append_inline(own.pool, served, [report(legacy, code)])

    # A first upcaster, tried with a dry run (built, compared, not swapped),
    # maps a code wrongly.
    new_class_version({"S1": "ordered", "S3": "ordered"})
    await settle(own.pool)
    async with own.pool.acquire() as connection:
        await rebuild.rebuild_lock(connection)
        tried = await rebuild.begin(connection, Vocabulary.default())
        await rebuild.build(connection, tried, STORE)
        await rebuild.prepare(connection, tried)
        await rebuild.differences(connection, tried)
        await connection.execute("SELECT pg_advisory_unlock_all()")

    # The corrected upcaster is deployed and the rebuild run for real.
    new_class_version(CODES)
    await rebuild_and_swap(own.pool)

    async with own.pool.acquire() as connection:
        fixed = await projection_for(connection, 2)
        expected = await scratch_fold(connection, fixed)
    item = (await current_rows(own.pool))[StreamKey("live", legacy, UPC)]
    assert item.state == "confirmed", (
        "the rebuild resumed the build made by the code before the fix"
    )
    assert differing(await current_rows(own.pool), expected) == []
