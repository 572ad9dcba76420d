"""The projection runner: catch-up in batches, crash safety, live following.

Each test runs on a database of its own: runners move the served version's
checkpoint, which the catalogue keeps once per database.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import pytest

from ordertrail.db.connection import Connection, connect
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import Cursor, RecordedEvent, StreamKey
from ordertrail.eventstore.store import EVENTS_CHANNEL
from ordertrail.projections import catalogue
from ordertrail.projections.items import PROJECTION_NAME, Applied, ItemProjection
from ordertrail.projections.runner import Batch, ProjectionRunner
from ordertrail.projections.served import ServedProjection
from tests.integration.projection_support import (
    STORE,
    OwnDatabase,
    append_inline,
    append_raw,
    differing,
    elected_runner,
    projection_for,
    report,
    rows_of,
    scratch_fold,
    settle,
    until,
    whole_log,
)
from tests.support import UPC, new_order_id

SERVED_TABLE = "item_view_v1"
_STATUSES = ("ordered", "confirmed", "new message", "ready for pickup", "picked up")


async def seed(own: OwnDatabase, transactions: int, per_transaction: int) -> int:
    """Append a log spread over several items and transactions; return its size.

    Nothing is projected inline, so every row must come from the runner.
    """
    orders = [new_order_id() for _ in range(3)]
    streams = [(order_id, upc) for order_id in orders for upc in ("U1", "U2")]
    appended = 0
    for transaction in range(transactions):
        deliveries = []
        for index in range(per_transaction):
            order_id, upc = streams[(transaction + index) % len(streams)]
            status = _STATUSES[(transaction * per_transaction + index) % 5]
            deliveries.append(report(order_id, status, upc=upc))
        appended += len(await append_raw(own.pool, deliveries))
    await settle(own.pool)
    return appended


async def checkpoint_of(pool: asyncpg.Pool) -> tuple[Cursor, int]:
    """The served version's checkpoint and count of events applied, as stored."""
    async with pool.acquire() as connection:
        record = await catalogue.served(connection, PROJECTION_NAME)
    return record.checkpoint, record.events_applied


async def table_matches_fold(
    pool: asyncpg.Pool, projection: ItemProjection, upto: Cursor | None = None
) -> list[str]:
    """How the served table differs from a fold from scratch (up to ``upto``)."""
    async with pool.acquire() as connection:
        return differing(
            await rows_of(connection, SERVED_TABLE),
            await scratch_fold(connection, projection, upto=upto),
        )


@pytest.mark.parametrize("behind_writer", [False, True])
async def test_catch_up_commits_rows_and_checkpoint_together_batch_by_batch(
    own: OwnDatabase, *, behind_writer: bool
) -> None:
    total = await seed(own, transactions=12, per_transaction=5)
    async with own.pool.acquire() as connection:
        log = await whole_log(connection)
        projection = await projection_for(connection, 1)
    runner = ProjectionRunner(
        STORE, projection, PROJECTION_NAME, batch_size=7, behind_writer=behind_writer
    )

    steps: list[Batch] = []
    async with own.pool.acquire() as connection:
        while (batch := await runner.step(connection)).applied:
            steps.append(batch)
            # Seen from another connection, each batch has committed on its
            # own, with its checkpoint, and the table holds exactly the
            # events up to that checkpoint.
            stored, applied = await checkpoint_of(own.pool)
            assert stored == batch.checkpoint
            assert applied == sum(step.applied for step in steps)
            assert await table_matches_fold(own.pool, projection, stored) == []

    assert [step.applied for step in steps] == [7] * 8 + [4]
    assert [step.checkpoint for step in steps] == [
        Cursor(e.transaction_id, e.position) for e in log[6::7] + log[-1:]
    ]
    assert (await checkpoint_of(own.pool))[1] == total


class _StallingProjection(ItemProjection):
    """Writes a batch's rows, then never returns from one chosen batch."""

    def __init__(self, base: ItemProjection, stall_on_call: int) -> None:
        super().__init__(
            base.vocabulary,
            base.store,
            version=base.version,
            table=base.table,
            skipped=base.skipped,
        )
        self.calls = 0
        self.stall_on_call = stall_on_call
        self.stalled = asyncio.Event()

    async def apply(
        self, connection: Connection, events: Sequence[RecordedEvent]
    ) -> Applied:
        applied = await super().apply(connection, events)
        self.calls += 1
        if self.calls == self.stall_on_call:
            # The rows of this batch are written but not committed: the
            # moment a crash costs the most.
            self.stalled.set()
            await asyncio.Event().wait()
        return applied


async def test_a_catch_up_cancelled_mid_batch_resumes_and_loses_or_repeats_nothing(
    own: OwnDatabase,
) -> None:
    total = await seed(own, transactions=12, per_transaction=5)
    async with own.pool.acquire() as connection:
        projection = await projection_for(connection, 1)
        log = await whole_log(connection)
    stalling = _StallingProjection(projection, stall_on_call=3)
    crashing = await connect(own.url)
    runner = ProjectionRunner(STORE, stalling, PROJECTION_NAME, batch_size=7)
    work = asyncio.create_task(runner.catch_up(crashing))

    await asyncio.wait_for(stalling.stalled.wait(), 10)
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, asyncpg.InterfaceError):
        await work
    crashing.terminate()

    # Two batches committed; the third went with its transaction.
    stored, applied = await checkpoint_of(own.pool)
    assert applied == 14
    assert stored == Cursor(log[13].transaction_id, log[13].position)
    assert await table_matches_fold(own.pool, projection, stored) == []

    resumed = ProjectionRunner(STORE, projection, PROJECTION_NAME, batch_size=7)
    async with own.pool.acquire() as connection:
        last = await resumed.catch_up(connection)
    head = log[-1]

    assert last.failure is None
    stored, applied = await checkpoint_of(own.pool)
    assert stored == Cursor(head.transaction_id, head.position)
    # Counted once each: the resumed runner started at the stored checkpoint,
    # not at the beginning and not after the lost batch.
    assert applied == total
    assert await table_matches_fold(own.pool, projection) == []


@pytest.mark.parametrize("behind_writer", [False, True])
async def test_events_already_applied_inline_are_passed_over_not_written_again(
    own: OwnDatabase, *, behind_writer: bool
) -> None:
    served = ServedProjection(STORE, Vocabulary.default())
    order_id = new_order_id()
    for status in ("ordered", "confirmed", "note"):
        await append_inline(own.pool, served, [report(order_id, status)])
    before = await own.pool.fetch(
        f"SELECT order_id, change_xid, updated_at FROM {SERVED_TABLE}"
    )
    # One item the inline path never saw: its row must come from the runner.
    behind = new_order_id()
    await append_raw(own.pool, [report(behind, "ordered")])
    await settle(own.pool)

    async with own.pool.acquire() as connection:
        projection = await projection_for(connection, 1)
        runner = ProjectionRunner(
            STORE, projection, PROJECTION_NAME, behind_writer=behind_writer
        )
        last = await runner.catch_up(connection)

    assert last.failure is None
    stored, applied = await checkpoint_of(own.pool)
    assert applied == 4
    assert stored == last.checkpoint
    after = await own.pool.fetch(
        f"SELECT order_id, change_xid, updated_at FROM {SERVED_TABLE} "
        "WHERE order_id = $1",
        order_id,
    )
    # Untouched: not rewritten, so not announced again in the change feed.
    assert [tuple(row) for row in after] == [tuple(row) for row in before]
    assert await table_matches_fold(own.pool, projection) == []
    async with own.pool.acquire() as connection:
        rows = await rows_of(connection, SERVED_TABLE)
    assert rows[StreamKey("live", behind, UPC)].state == "ordered"


async def test_a_scan_reads_whole_only_the_events_the_rows_do_not_hold(
    own: OwnDatabase,
) -> None:
    served = ServedProjection(STORE, Vocabulary.default())
    current, lagging = new_order_id(), new_order_id()
    await append_inline(own.pool, served, [report(current, "ordered")])
    await append_inline(own.pool, served, [report(lagging, "ordered")])
    await append_raw(own.pool, [report(lagging, "confirmed")])
    await append_inline(own.pool, served, [report(current, "confirmed")])
    await settle(own.pool)

    async with own.pool.acquire() as connection:
        log = await whole_log(connection)
        scan = await STORE.scan_after(
            connection, Cursor(), 100, unreflected_in=SERVED_TABLE
        )
        after_first = await STORE.scan_after(
            connection, scan.cursors[0], 100, unreflected_in=SERVED_TABLE
        )

    assert scan.cursors == [Cursor(e.transaction_id, e.position) for e in log]
    # The one event its row lacks comes back whole, exactly as stored.
    assert scan.unreflected == [e for e in log if e.raw_status == "confirmed"][:1]
    assert scan.unreflected[0].order_id == lagging
    assert after_first.cursors == scan.cursors[1:]


@pytest.mark.slow
async def test_the_elected_runner_catches_up_then_follows_each_commit(
    own: OwnDatabase,
) -> None:
    await seed(own, transactions=4, per_transaction=5)
    served = ServedProjection(STORE, Vocabulary.default())
    # Far longer than any wait below: only notifications can explain how
    # quickly the runner moves.
    poll_interval = 60.0

    async def reached(position: int) -> bool:
        stored, _ = await checkpoint_of(own.pool)
        return stored.position >= position

    async with elected_runner(own, poll_interval=poll_interval):
        async with own.pool.acquire() as connection:
            head = (await whole_log(connection))[-1].position
        await until(lambda: reached(head), "the catch-up")

        for round_ in range(4):
            order_id = new_order_id()
            if round_ % 2:
                appended = await append_inline(
                    own.pool, served, [report(order_id, "ordered")]
                )
            else:
                appended = await append_raw(
                    own.pool, [report(order_id, "confirmed")], announce=True
                )
            position = appended[-1].position
            waited = await _followed(own, functools.partial(reached, position))
            assert waited < poll_interval / 4

    async with own.pool.acquire() as connection:
        projection = await projection_for(connection, 1)
    assert await table_matches_fold(own.pool, projection) == []
    assert (await checkpoint_of(own.pool))[1] == 24


async def _followed(own: OwnDatabase, reached: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until the runner applied an append it was told about.

    An append's notification finds its event unsettled when a transaction
    elsewhere on the server outlives its commit; the runner then sees it on
    the next notification. Once settled, announce it again, as the next
    commit would.
    """
    started = time.monotonic()
    with contextlib.suppress(pytest.fail.Exception):
        await until(reached, "following an append", within=2)
        return time.monotonic() - started
    await settle(own.pool)
    await own.pool.execute("SELECT pg_notify($1, '0')", EVENTS_CHANNEL)
    await until(reached, "following an announced append", within=10)
    return time.monotonic() - started
