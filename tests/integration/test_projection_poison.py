"""Poison events: projection code that raises on one event.

The runner stops on the event and records it, the log keeps taking
deliveries, and an operator either skips the event or retries after a fix.
The projection code is broken here on purpose, in this process, by patching
the item aggregate; the operator's commands run as real processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from ordertrail.auth.credentials import CredentialKind
from ordertrail.domain.item import Item
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.records import Cursor, StreamKey
from ordertrail.eventstore.store import NewEvent
from ordertrail.projections import catalogue, rebuild
from ordertrail.projections.items import PROJECTION_NAME, ItemView
from ordertrail.projections.runner import Batch, ProjectionRunner
from ordertrail.projections.served import ServedProjection
from ordertrail.projections.status import statuses
from tests.integration.api_support import issue, running_app
from tests.integration.helpers import post_webhook
from tests.integration.projection_support import (
    STORE,
    OwnDatabase,
    append_inline,
    append_raw,
    differing,
    elected_runner,
    ordertrail,
    projection_for,
    report,
    rows_of,
    scratch_fold,
    served_version,
    settle,
    until,
)
from tests.support import UPC, new_order_id, webhook_body

POISON = "ready for pickup"
"""The status the broken code cannot fold (for the sick order only)."""


class ProjectionBug(RuntimeError):
    """What the broken projection code raises."""


@pytest.fixture
def break_reports(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """Make the fold raise on reports of ``status`` for ``order_id``."""
    original = Item.take_report

    def install(order_id: str, status: str) -> None:
        def take_report(self: Item, report: Item.StatusReported) -> None:
            if self.order_id == order_id and report.raw_status == status:
                msg = f"cannot fold {status!r}"
                raise ProjectionBug(msg)
            original(self, report)

        monkeypatch.setattr(Item, "take_report", take_report)

    return install


async def one_by_one(pool: asyncpg.Pool, *reports: tuple[str, str, str]) -> list[int]:
    """Append each (mode, order_id, status) in a transaction of its own."""
    positions = []
    for mode, order_id, status in reports:
        (event,) = await append_raw(pool, [report(order_id, status, mode=mode)])
        positions.append(event.position)
    return positions


async def run_served(pool: asyncpg.Pool) -> Batch:
    """Run the served version's runner to the end of the log, as elected."""
    await settle(pool)
    async with pool.acquire() as connection:
        projection = await projection_for(connection, 1)
        runner = ProjectionRunner(STORE, projection, PROJECTION_NAME)
        return await runner.catch_up(connection)


async def served_rows(pool: asyncpg.Pool) -> dict[StreamKey, ItemView]:
    async with pool.acquire() as connection:
        return await rows_of(connection, "item_view_v1")


async def cursor_at(pool: asyncpg.Pool, position: int) -> Cursor:
    xid = await pool.fetchval(
        "SELECT transaction_id::text::bigint FROM events WHERE position = $1", position
    )
    return Cursor(xid, position)


async def deliveries_are_still_accepted(
    own: OwnDatabase, *, healthy: str, sick: str
) -> None:
    """Post to a service while the projection is failed; check what it did.

    The log keeps taking deliveries: each webhook is answered 202 and its
    event is stored; a healthy item moves on inline, only the sick one waits.
    """
    async with running_app(own.url) as client:
        token = await issue(client, own.pool, CredentialKind.WEBHOOK_TOKEN, mode="live")
        for order_id in (healthy, sick):
            answer = await post_webhook(
                client, webhook_body(order_id, status="new message"), token.secret
            )
            assert answer.status_code == 202, answer.text
    stored = await own.pool.fetchval(
        "SELECT count(*) FROM events WHERE raw_status = 'new message'"
    )
    assert stored == 2
    rows = await served_rows(own.pool)
    assert rows[StreamKey("live", healthy, UPC)].message_count == 1
    assert rows[StreamKey("live", healthy, UPC)].state == "confirmed"
    assert rows[StreamKey("live", sick, UPC)].version == 2


async def test_a_poison_event_stops_the_runner_on_itself_and_a_skip_passes_it(
    own: OwnDatabase, break_reports: Callable[[str, str], None]
) -> None:
    sick, healthy, sampled = new_order_id(), new_order_id(), new_order_id()
    positions = await one_by_one(
        own.pool,
        ("live", sick, "ordered"),
        ("live", healthy, "ordered"),
        ("live", sick, "confirmed"),
        ("test", sampled, "ordered"),
        ("live", sick, POISON),
        ("live", healthy, "confirmed"),
        ("live", sick, "picked up"),
        ("test", sampled, "confirmed"),
    )
    poison = positions[4]
    break_reports(sick, POISON)

    stopped = await run_served(own.pool)

    assert stopped.failure is not None
    assert stopped.failure.event.position == poison
    assert "cannot fold" in stopped.failure.error
    async with own.pool.acquire() as connection:
        record = await catalogue.served(connection, PROJECTION_NAME)
        (status,) = await statuses(connection, PROJECTION_NAME)
        projection = await projection_for(connection, 1)
        # Everything before the poison event is applied, nothing after it,
        # in this stream or any other.
        expected = await scratch_fold(
            connection, projection, upto=await cursor_at(own.pool, positions[3])
        )
    assert record.failed
    assert record.error_position == poison
    assert record.error is not None
    assert "ProjectionBug" in record.error
    assert record.checkpoint == await cursor_at(own.pool, positions[3])
    assert (status.state, status.error_position) == ("failed", poison)
    rows = await served_rows(own.pool)
    assert differing(rows, expected) == []
    assert rows[StreamKey("live", sick, UPC)].version == 2
    assert rows[StreamKey("live", healthy, UPC)].state == "ordered"
    assert rows[StreamKey("test", sampled, UPC)].state == "ordered"

    await deliveries_are_still_accepted(own, healthy=healthy, sick=sick)

    skipped = await ordertrail(
        own.url,
        "projections",
        "skip",
        "items",
        "--position",
        str(poison),
        "--reason",
        "cannot be folded until the fold is fixed",
    )
    assert skipped.returncode == 0, skipped.stderr
    assert f"will pass over position {poison}" in skipped.stdout

    resumed = await run_served(own.pool)

    assert resumed.failure is None
    async with own.pool.acquire() as connection:
        record = await catalogue.served(connection, PROJECTION_NAME)
        assert await catalogue.skipped_positions(
            connection, PROJECTION_NAME, 1
        ) == frozenset({poison})
        projection = await projection_for(connection, 1)
        expected = await scratch_fold(connection, projection)
    assert not record.failed
    assert record.error is None
    rows = await served_rows(own.pool)
    assert differing(rows, expected) == []
    item = rows[StreamKey("live", sick, UPC)]
    assert item.state == "completed"
    assert item.message_count == 1
    assert [(a.kind, a.position) for a in item.anomalies] == [
        ("skipped_by_operator", poison)
    ]


async def test_retry_after_a_fix_applies_the_event_the_runner_stopped_on(
    own: OwnDatabase,
    break_reports: Callable[[str, str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sick, healthy = new_order_id(), new_order_id()
    positions = await one_by_one(
        own.pool,
        ("live", sick, "ordered"),
        ("live", healthy, "ordered"),
        ("live", sick, POISON),
        ("live", healthy, "confirmed"),
    )
    break_reports(sick, POISON)
    assert (await run_served(own.pool)).failure is not None

    # Retrying unchanged code stops on the same event again.
    retried = await ordertrail(own.url, "projections", "retry", "items")
    assert retried.returncode == 0, retried.stderr
    assert "will try again" in retried.stdout
    again = await run_served(own.pool)
    assert again.failure is not None
    assert again.failure.event.position == positions[2]

    monkeypatch.undo()  # the fix is deployed
    retried = await ordertrail(own.url, "projections", "retry", "items")
    assert "will try again" in retried.stdout
    resumed = await run_served(own.pool)

    assert resumed.failure is None
    async with own.pool.acquire() as connection:
        record = await catalogue.served(connection, PROJECTION_NAME)
        expected = await scratch_fold(connection, await projection_for(connection, 1))
    assert not record.failed
    rows = await served_rows(own.pool)
    assert differing(rows, expected) == []
    item = rows[StreamKey("live", sick, UPC)]
    assert (item.state, item.fulfilment, item.anomalies) == (
        "confirmed",
        "pickup",
        [],
    )
    nothing = await ordertrail(own.url, "projections", "retry", "items")
    assert "had not failed" in nothing.stdout


async def test_an_event_that_breaks_an_upcaster_can_be_skipped(
    own: OwnDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upcasters are projection code too: a stored shape the new code cannot
    # read is as much a poison event as a fold that raises.
    order_id = new_order_id()
    positions = await one_by_one(
        own.pool,
        ("live", order_id, "ordered"),
        ("live", order_id, "garbled \ufffd status"),
        ("live", order_id, "confirmed"),
    )

    def upcast_v1_v2(state: dict[str, Any]) -> None:
        if "\ufffd" in state["raw_status"]:
            msg = "unreadable status"
            raise ProjectionBug(msg)

    monkeypatch.setattr(Item.StatusReported, "class_version", 2)
    monkeypatch.setattr(
        Item.StatusReported, "upcast_v1_v2", staticmethod(upcast_v1_v2), raising=False
    )
    stopped = await run_served(own.pool)
    assert stopped.failure is not None
    assert stopped.failure.event.position == positions[1]

    skipped = await ordertrail(
        own.url, "projections", "skip", "items", "--position", str(positions[1])
    )
    assert skipped.returncode == 0, skipped.stderr
    resumed = await run_served(own.pool)

    assert resumed.failure is None, (
        f"skipped, yet the event at position {resumed.failure.event.position} "
        f"stopped the runner again: {resumed.failure.error}"
    )
    item = (await served_rows(own.pool))[StreamKey("live", order_id, UPC)]
    assert item.state == "confirmed"
    assert [a.kind for a in item.anomalies] == ["skipped_by_operator"]


async def test_a_rebuild_stopped_by_a_poison_event_leaves_the_served_version_alone(
    own: OwnDatabase, break_reports: Callable[[str, str], None]
) -> None:
    sick, healthy = new_order_id(), new_order_id()
    served = ServedProjection(STORE, Vocabulary.default())
    appended: list[NewEvent] = []
    for order_id, status in (
        (sick, "ordered"),
        (healthy, "ordered"),
        (sick, POISON),
        (healthy, "confirmed"),
        (sick, "picked up"),
    ):
        appended += await append_inline(own.pool, served, [report(order_id, status)])
    poison = appended[2].position
    before = await served_rows(own.pool)
    # New projection code, broken for one event, reaches only the rebuild.
    break_reports(sick, POISON)
    await settle(own.pool)

    async with own.pool.acquire() as connection:
        await rebuild.rebuild_lock(connection)
        building = await rebuild.begin(connection, Vocabulary.default())
        stopped = await rebuild.build(connection, building, STORE, batch_size=2)
        versions = {
            v.version: v for v in await catalogue.versions(connection, PROJECTION_NAME)
        }
        states = {s.version: s.state for s in await statuses(connection)}

    assert stopped.failure is not None
    assert stopped.failure.event.position == poison
    assert versions[2].error_position == poison
    assert not versions[1].failed
    assert states == {1: "live", 2: "failed"}
    assert await served_rows(own.pool) == before
    assert await own.pool.fetchval(
        "SELECT state FROM item_view WHERE order_id = $1", sick
    ) == ("completed")

    # With no version named, the skip goes to the version that stopped there.
    skipped = await ordertrail(
        own.url, "projections", "skip", "items", "--position", str(poison)
    )
    assert f"items version 2 will pass over position {poison}" in skipped.stdout
    async with own.pool.acquire() as connection:
        assert await catalogue.skipped_positions(connection, "items", 1) == set()
        resumed = await rebuild.begin(connection, Vocabulary.default())
        assert resumed.version == 2
        finished = await rebuild.build(connection, resumed, STORE, batch_size=2)
        assert finished.failure is None
        await rebuild.prepare(connection, resumed)
        await rebuild.swap(connection, resumed, STORE)

    item = await own.pool.fetchrow(
        "SELECT state, anomalies FROM item_view WHERE order_id = $1", sick
    )
    assert item is not None
    assert item["state"] == "completed"
    assert [a["kind"] for a in item["anomalies"]] == ["skipped_by_operator"]


async def test_a_rebuild_run_again_after_a_fix_swaps_in_a_version_that_runs(
    own: OwnDatabase, break_reports: Callable[[str, str], None]
) -> None:
    sick = new_order_id()
    served = ServedProjection(STORE, Vocabulary.default())
    for status in ("ordered", POISON, "picked up"):
        await append_inline(own.pool, served, [report(sick, status)])
    break_reports(sick, POISON)
    await settle(own.pool)
    async with own.pool.acquire() as connection:
        await rebuild.rebuild_lock(connection)
        building = await rebuild.begin(connection, Vocabulary.default())
        assert (await rebuild.build(connection, building, STORE)).failure is not None
        await connection.execute("SELECT pg_advisory_unlock_all()")

    # The command's own advice: fix the projection and run again. The fixed
    # code is what a new process runs.
    again = await ordertrail(own.url, "projections", "rebuild", "items")

    assert again.returncode == 0, again.stderr
    async with own.pool.acquire() as connection:
        record = await catalogue.served(connection, PROJECTION_NAME)
        state = {s.version: s.state for s in await statuses(connection)}[2]
    assert record.version == 2
    # A failed version is one its runner leaves alone; the one serving now
    # applied every event.
    assert (record.failed, record.error, state) == (False, None, "live")


@pytest.mark.slow
async def test_the_elected_runner_waits_on_a_poison_event_and_resumes_after_a_skip(
    own: OwnDatabase, break_reports: Callable[[str, str], None]
) -> None:
    sick, healthy = new_order_id(), new_order_id()
    positions = await one_by_one(
        own.pool,
        ("live", sick, "ordered"),
        ("live", sick, POISON),
        ("live", healthy, "ordered"),
    )
    break_reports(sick, POISON)
    await settle(own.pool)

    async def failed() -> bool:
        return (await served_version(own.pool)).failed

    # Far longer than the waits below: the runner must act on the
    # catalogue's notification, not on its next look.
    async with elected_runner(own, poll_interval=60.0):
        await until(failed, "the runner stopping on the poison event")
        stopped = await served_version(own.pool)
        # Announced appends do not move a failed version.
        await append_raw(own.pool, [report(healthy, "confirmed")], announce=True)
        await asyncio.sleep(1.0)
        assert (await served_version(own.pool)).checkpoint == stopped.checkpoint

        skipped = await ordertrail(
            own.url, "projections", "skip", "items", "--position", str(positions[1])
        )
        assert skipped.returncode == 0, skipped.stderr
        await settle(own.pool)
        head: int = await own.pool.fetchval("SELECT max(position) FROM events")

        async def resumed() -> bool:
            return (await served_version(own.pool)).checkpoint_position == head

        await until(resumed, "the runner resuming after the skip", within=15)

    assert stopped.error_position == positions[1]
    rows = await served_rows(own.pool)
    assert rows[StreamKey("live", healthy, UPC)].state == "confirmed"
    sick_item = rows[StreamKey("live", sick, UPC)]
    assert [a.kind for a in sick_item.anomalies] == ["skipped_by_operator"]
