"""What operators see of each projection version: command line and admin API.

One database of this test's own is taken through every state a version can
be in (live, catching-up, rebuilding, failed, retired), and the status is
read at each step as an operator would read it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ordertrail.auth.credentials import CredentialKind, Role
from ordertrail.domain.item import Item
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.projections import rebuild
from ordertrail.projections.items import PROJECTION_NAME
from ordertrail.projections.runner import Batch, ProjectionRunner
from ordertrail.projections.served import ServedProjection
from tests.integration.api_support import issue, problem, running_app
from tests.integration.projection_support import (
    STORE,
    OwnDatabase,
    append_inline,
    append_raw,
    ordertrail,
    projection_for,
    report,
    settle,
)
from tests.support import bearer, new_order_id

POISON = "ready for pickup"


class ProjectionBug(RuntimeError):
    """What the broken projection code raises."""


async def head(pool: asyncpg.Pool) -> int:
    position = await pool.fetchval("SELECT max(position) FROM events")
    assert isinstance(position, int)
    return position


async def shown(own: OwnDatabase) -> dict[int, dict[str, Any]]:
    """``ordertrail projections status --json``, by version."""
    done = await ordertrail(own.url, "projections", "status", "items", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.json_lines()
    assert all(line["name"] == PROJECTION_NAME for line in lines)
    return {int(str(line["version"])): line for line in lines}


async def run_version(pool: asyncpg.Pool, version: int) -> Batch:
    await settle(pool)
    async with pool.acquire() as connection:
        projection = await projection_for(connection, version)
        runner = ProjectionRunner(STORE, projection, PROJECTION_NAME)
        return await runner.catch_up(connection)


async def retire_the_first_version(own: OwnDatabase) -> None:
    """Rebuild and swap: version 2 serves, version 1 is retired."""
    await settle(own.pool)
    async with own.pool.acquire() as connection:
        await rebuild.rebuild_lock(connection)
        building = await rebuild.begin(connection, Vocabulary.default())
        await rebuild.build(connection, building, STORE)
        await rebuild.prepare(connection, building)
        await rebuild.swap(connection, building, STORE)
        # A rebuild with another vocabulary, begun and not built yet.
        other = Vocabulary.parse(
            Vocabulary.default().text + "\n# another vocabulary\n", source="test"
        )
        await rebuild.begin(connection, other)
        await connection.execute("SELECT pg_advisory_unlock_all()")


@pytest.mark.slow
async def test_status_follows_a_version_through_every_state(
    own: OwnDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = ServedProjection(STORE, Vocabulary.default())
    for said in ("ordered", "confirmed", "note"):
        await append_inline(own.pool, served, [report(new_order_id(), said)])
    await run_version(own.pool, 1)
    await retire_the_first_version(own)
    top = await head(own.pool)

    status = await shown(own)

    assert {v: s["state"] for v, s in status.items()} == {
        1: "retired",
        2: "live",
        3: "rebuilding",
    }
    assert (status[2]["checkpoint_position"], status[2]["lag_events"]) == (top, 0)
    assert status[2]["head_position"] == top
    assert status[2]["swapped_at"] is not None
    assert (status[3]["checkpoint_position"], status[3]["lag_events"]) == (0, 3)
    assert status[3]["vocabulary_digest"] != status[2]["vocabulary_digest"]

    # More than a thousand events the runner has not reached, an hour old.
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    behind = [
        report(new_order_id(), "ordered", received_at=an_hour_ago) for _ in range(1001)
    ]
    await append_raw(own.pool, behind)
    status = await shown(own)
    assert status[2]["state"] == "catching-up"
    assert status[2]["lag_events"] == 1001
    assert status[2]["head_position"] == await head(own.pool)
    assert 3600 <= status[2]["lag_seconds"] < 3600 + 120

    # A poison event stops the runner; its position and error are shown.
    sick = new_order_id()
    (poisoned,) = await append_raw(own.pool, [report(sick, POISON)])
    original = Item.take_report

    def take_report(self: Item, report: Item.StatusReported) -> None:
        if self.order_id == sick:
            msg = "cannot fold this report"
            raise ProjectionBug(msg)
        original(self, report)

    monkeypatch.setattr(Item, "take_report", take_report)
    assert (await run_version(own.pool, 2)).failure is not None
    status = await shown(own)
    failed = status[2]
    assert failed["state"] == "failed"
    assert failed["error_position"] == poisoned.position
    assert "ProjectionBug" in str(failed["error"])
    assert failed["failed_at"] is not None
    assert failed["checkpoint_position"] == poisoned.position - 1
    assert failed["lag_events"] == 1
    assert failed["events_applied"] == 3 + 1001

    table = await ordertrail(own.url, "projections", "status")
    assert table.returncode == 0, table.stderr
    assert "failed" in table.stdout
    assert f"at position {poisoned.position}" in table.stdout

    await the_admin_api_shows_the_same(own, status)


async def the_admin_api_shows_the_same(
    own: OwnDatabase, status: dict[int, dict[str, Any]]
) -> None:
    """GET /v1/admin/projections agrees with the command, for admins only."""
    async with running_app(own.url) as client:
        admin = await issue(client, own.pool, CredentialKind.API_KEY, role=Role.ADMIN)
        reader = await issue(client, own.pool, CredentialKind.API_KEY, role=Role.READER)
        auditor = await issue(
            client, own.pool, CredentialKind.API_KEY, role=Role.AUDITOR
        )
        answer = await client.get("/v1/admin/projections", headers=bearer(admin.secret))
        assert answer.status_code == 200, answer.text
        listed = {p["version"]: p for p in answer.json()["projections"]}
        for key in (reader, auditor):
            refused = await client.get(
                "/v1/admin/projections", headers=bearer(key.secret)
            )
            problem(refused, 403)
        problem(await client.get("/v1/admin/projections"), 401)

    compared = (
        "name",
        "table_name",
        "state",
        "checkpoint_position",
        "head_position",
        "lag_events",
        "events_applied",
        "vocabulary_digest",
        "error",
        "error_position",
    )
    assert {v: {k: p[k] for k in compared} for v, p in listed.items()} == {
        v: {k: s[k] for k in compared} for v, s in status.items()
    }
    assert listed[2]["lag_seconds"] >= 0
