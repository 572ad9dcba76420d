"""Tampering with the events table behind the service's back, and finding it.

Each test builds an order of its own, changes the table as a superuser would
(with the append-only triggers off for one transaction only), and checks
that verification names exactly what was done, narrowed to the test's order.

The damage is done in a database this module makes for itself, not in the
one the suite shares: a rebuild of the projections replays the whole log,
and would trip over the broken streams left behind here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import msgspec
import pytest

from ordertrail.audit.chains import Finding, FindingKind
from ordertrail.audit.checkpoints import Checkpoint, record_checkpoint
from ordertrail.audit.digest import AuditKey
from ordertrail.audit.verify import VerifyReport, verify_log
from ordertrail.auth.credentials import CredentialKind, Role
from ordertrail.db.connection import connect, create_pool
from ordertrail.db.migrate import apply_migrations
from ordertrail.eventstore.hashing import canonical, chain_hash
from ordertrail.eventstore.store import EventStore
from tests.integration.api_support import issue, running_app
from tests.support import bearer, delivery, with_database

KEY_TEXT = "audit-tests-key-0123456789abcdef0123456789"
KEY = AuditKey(KEY_TEXT)
STORE = EventStore()
UPCS = ("601842495575", "601842495582")
STATUSES = ("ordered", "confirmed", "ready for pickup", "picked up")


@pytest.fixture(scope="module")
async def database_url(server_url: str) -> AsyncIterator[str]:
    """This module's own migrated database (shadows the shared one)."""
    async with with_database(server_url) as url:
        connection = await connect(url)
        try:
            await apply_migrations(connection)
        finally:
            await connection.close()
        yield url


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this module's database (shadows the shared one)."""
    opened = await create_pool(database_url, min_size=1, max_size=4)
    try:
        yield opened
    finally:
        await opened.close()


@dataclass(frozen=True)
class Order:
    """An order of two items, each with four events."""

    order_id: str
    upcs: tuple[str, ...] = UPCS


async def build(pool: asyncpg.Pool, order_id: str) -> Order:
    async with pool.acquire() as connection:
        for status in STATUSES:
            for upc in UPCS:
                async with connection.transaction():
                    await STORE.append(
                        connection, [delivery(order_id, upc=upc, status=status)]
                    )
    return Order(order_id)


@contextlib.asynccontextmanager
async def tampering(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A transaction in which the append-only triggers do not fire.

    ``SET LOCAL`` ends with the transaction, committed or not, and the
    ``finally`` puts the session back even if something in between fails:
    no other test ever sees the triggers off.
    """
    async with pool.acquire() as connection:
        try:
            async with connection.transaction():
                await connection.execute("SET LOCAL session_replication_role = replica")
                yield connection
        finally:
            await connection.execute("RESET session_replication_role")


async def assert_still_append_only(pool: asyncpg.Pool, order_id: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("DELETE FROM events WHERE order_id = $1", order_id)


async def verify(pool: asyncpg.Pool, order_id: str) -> VerifyReport:
    async with pool.acquire() as connection:
        return await verify_log(connection, key=KEY, order_id=order_id)


async def checkpoint(pool: asyncpg.Pool) -> Checkpoint:
    async with pool.acquire() as connection:
        recorded = await record_checkpoint(connection, KEY)
    assert recorded is not None
    return recorded


def summary(
    findings: list[Finding],
) -> list[tuple[FindingKind, str | None, int | None]]:
    return [(f.kind, f.upc, f.version) for f in findings]


async def test_an_untouched_order_verifies_clean(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)
    await checkpoint(pool)

    report = await verify(pool, order_id)

    assert report.clean, [f.describe() for f in report.findings]
    assert (report.events, report.streams) == (8, 2)
    assert report.signatures_checked
    assert report.checkpoints >= 1


async def test_a_changed_body_is_named_with_its_stream_and_version(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)

    async with tampering(pool) as connection:
        await connection.execute(
            "UPDATE events SET raw_body = convert_to(replace(convert_from("
            "raw_body, 'UTF8'), 'confirmed', 'cancelled'), 'UTF8') "
            "WHERE order_id = $1 AND upc = $2 AND version = 2",
            order_id,
            UPCS[0],
        )
    report = await verify(pool, order_id)

    assert summary(report.findings) == [(FindingKind.CONTENT_CHANGED, UPCS[0], 2)]
    assert "raw body was changed" in report.findings[0].detail
    await assert_still_append_only(pool, order_id)


async def test_a_changed_status_is_named(pool: asyncpg.Pool, order_id: str) -> None:
    await build(pool, order_id)

    async with tampering(pool) as connection:
        await connection.execute(
            "UPDATE events SET raw_status = 'cancelled' "
            "WHERE order_id = $1 AND upc = $2 AND version = 3",
            order_id,
            UPCS[1],
        )
    report = await verify(pool, order_id)

    assert summary(report.findings) == [(FindingKind.CONTENT_CHANGED, UPCS[1], 3)]
    await assert_still_append_only(pool, order_id)


async def test_an_event_deleted_in_the_middle_is_a_gap(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)

    async with tampering(pool) as connection:
        await connection.execute(
            "DELETE FROM events WHERE order_id = $1 AND upc = $2 AND version = 2",
            order_id,
            UPCS[0],
        )
    report = await verify(pool, order_id)

    assert summary(report.findings) == [(FindingKind.VERSION_GAP, UPCS[0], 3)]
    assert "version 2 is missing" in report.findings[0].detail
    await assert_still_append_only(pool, order_id)


async def test_two_swapped_versions_are_named_as_a_swap(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)

    async with tampering(pool) as connection:
        # Through a free number: the unique key is checked row by row.
        for old, new in ((2, 1000), (3, 2), (1000, 3)):
            await connection.execute(
                "UPDATE events SET version = $3 "
                "WHERE order_id = $1 AND upc = $2 AND version = $4",
                order_id,
                UPCS[1],
                new,
                old,
            )
    report = await verify(pool, order_id)

    assert summary(report.findings) == [(FindingKind.VERSIONS_SWAPPED, UPCS[1], 2)]
    assert "versions 2" in report.findings[0].detail
    await assert_still_append_only(pool, order_id)


async def test_a_tail_deleted_after_a_checkpoint_is_a_head_behind_it(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)
    recorded = await checkpoint(pool)

    async with tampering(pool) as connection:
        await connection.execute(
            "DELETE FROM events WHERE order_id = $1 AND upc = $2 AND version >= 3",
            order_id,
            UPCS[0],
        )
    report = await verify(pool, order_id)

    assert summary(report.findings) == [
        (FindingKind.HEAD_BEHIND_CHECKPOINT, UPCS[0], 2)
    ]
    finding = report.findings[0]
    assert finding.checkpoint == recorded.id
    assert "versions 3 to 4 were deleted from its tail" in finding.detail
    await assert_still_append_only(pool, order_id)


async def test_a_stream_deleted_after_a_checkpoint_is_missing_from_it(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)
    recorded = await checkpoint(pool)

    async with tampering(pool) as connection:
        await connection.execute(
            "DELETE FROM events WHERE order_id = $1 AND upc = $2", order_id, UPCS[1]
        )
    report = await verify(pool, order_id)

    assert summary(report.findings) == [(FindingKind.STREAM_MISSING, UPCS[1], 4)]
    assert report.findings[0].checkpoint == recorded.id
    assert "the whole stream was deleted" in report.findings[0].detail
    await assert_still_append_only(pool, order_id)


async def test_a_stream_rewritten_with_recomputed_hashes_is_caught_by_a_checkpoint(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)
    recorded = await checkpoint(pool)

    # Someone who knows the hash recipe rewrites version 2 and re-chains
    # every event after it: the chain is whole again, the head is not.
    async with tampering(pool) as connection:
        rows = await connection.fetch(
            "SELECT * FROM events WHERE order_id = $1 AND upc = $2 ORDER BY version",
            order_id,
            UPCS[0],
        )
        previous = rows[0]["hash"]
        for row in rows[1:]:
            status = "cancelled" if row["version"] == 2 else row["raw_status"]
            new_hash = chain_hash(
                previous,
                canonical(
                    mode=row["mode"],
                    order_id=row["order_id"],
                    upc=row["upc"],
                    version=row["version"],
                    event_type=row["event_type"],
                    raw_status=status,
                    raw_body=row["raw_body"],
                    received_at=row["received_at"],
                ),
            )
            await connection.execute(
                "UPDATE events SET raw_status = $1, previous_hash = $2, hash = $3 "
                "WHERE order_id = $4 AND position = $5",
                status,
                previous,
                new_hash,
                order_id,
                row["position"],
            )
            previous = new_hash
    report = await verify(pool, order_id)

    assert summary(report.findings) == [(FindingKind.HEAD_REWRITTEN, UPCS[0], 4)]
    assert report.findings[0].checkpoint == recorded.id
    await assert_still_append_only(pool, order_id)


async def test_an_event_slipped_in_below_a_checkpoint_is_unrecorded(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)
    recorded = await checkpoint(pool)
    first_position = await pool.fetchval(
        "SELECT min(position) FROM events WHERE order_id = $1", order_id
    )
    forged = delivery(order_id, upc="000000000000", status="refunded")
    first = chain_hash(
        bytes(32),
        canonical(
            mode="live",
            order_id=order_id,
            upc=forged.upc,
            version=1,
            event_type="StatusReported",
            raw_status=forged.raw_status,
            raw_body=forged.raw_body,
            received_at=forged.received_at,
        ),
    )

    # Positions are unique per order only: another order's number is free.
    await pool.execute(
        """
        INSERT INTO events (position, mode, order_id, upc, version, event_type,
                            raw_status, raw_body, body_sha256, received_at,
                            request_id, token_id, previous_hash, hash)
        OVERRIDING SYSTEM VALUE
        VALUES ($1, 'live', $2, $3, 1, 'StatusReported', $4, $5,
                sha256($5), $6, 'forged', 'tok_forged', $7, $8)
        """,
        first_position - 1,
        order_id,
        forged.upc,
        forged.raw_status,
        forged.raw_body,
        forged.received_at,
        bytes(32),
        first,
    )
    report = await verify(pool, order_id)

    assert summary(report.findings) == [
        (FindingKind.UNRECORDED_EVENT, "000000000000", 1)
    ]
    assert report.findings[0].position == first_position - 1
    assert report.findings[0].checkpoint == recorded.id


async def test_every_kind_at_once_is_reported_stream_by_stream(
    pool: asyncpg.Pool, order_id: str
) -> None:
    await build(pool, order_id)
    await checkpoint(pool)

    async with tampering(pool) as connection:
        await connection.execute(
            "UPDATE events SET raw_status = 'refunded' "
            "WHERE order_id = $1 AND upc = $2 AND version = 1",
            order_id,
            UPCS[0],
        )
        await connection.execute(
            "DELETE FROM events WHERE order_id = $1 AND upc = $2 AND version = 4",
            order_id,
            UPCS[1],
        )
    report = await verify(pool, order_id)

    assert sorted(summary(report.findings)) == sorted(
        [
            (FindingKind.CONTENT_CHANGED, UPCS[0], 1),
            (FindingKind.HEAD_BEHIND_CHECKPOINT, UPCS[1], 3),
        ]
    )


async def test_verification_of_one_order_does_not_report_another(
    pool: asyncpg.Pool, order_id: str
) -> None:
    damaged = f"{order_id}D"
    await build(pool, order_id)
    await build(pool, damaged)
    async with tampering(pool) as connection:
        await connection.execute("DELETE FROM events WHERE order_id = $1", damaged)

    assert (await verify(pool, order_id)).clean
    async with pool.acquire() as connection:
        live_only = await verify_log(
            connection, key=KEY, order_id=order_id, mode="test"
        )
    assert (live_only.events, live_only.clean) == (0, True)


async def run_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    environment = {
        **os.environ,
        "ORDERTRAIL_DATABASE_URL": database_url,
        "ORDERTRAIL_AUDIT_KEY": KEY_TEXT,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordertrail",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_command_exits_non_zero_with_a_line_per_finding(
    pool: asyncpg.Pool, database_url: str, order_id: str
) -> None:
    await build(pool, order_id)
    async with tampering(pool) as connection:
        await connection.execute(
            "DELETE FROM events WHERE order_id = $1 AND upc = $2 AND version = 2",
            order_id,
            UPCS[1],
        )

    code, out, _ = await run_cli(database_url, "audit", "verify", "--order", order_id)

    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(
        f"version_gap: live order {order_id} upc {UPCS[1]}, version 3"
    )
    assert lines[-1].endswith("1 findings")


async def test_the_command_exits_zero_for_a_clean_order(
    pool: asyncpg.Pool, database_url: str, order_id: str
) -> None:
    await build(pool, order_id)

    code, out, _ = await run_cli(
        database_url, "audit", "verify", "--order", order_id, "--mode", "live"
    )

    assert code == 0, out
    assert "8 events in 2 streams" in out
    assert out.rstrip().endswith("clean")


async def test_a_past_state_of_a_broken_stream_says_the_log_is_not_intact(
    pool: asyncpg.Pool, database_url: str, order_id: str
) -> None:
    await build(pool, order_id)
    async with tampering(pool) as connection:
        await connection.execute(
            "DELETE FROM events WHERE order_id = $1 AND upc = $2 AND version = 2",
            order_id,
            UPCS[0],
        )

    async with running_app(database_url) as client:
        reader = await issue(client, pool, CredentialKind.API_KEY, role=Role.READER)
        answer = await client.get(
            f"/v1/orders/{order_id}",
            headers=bearer(reader.secret),
            params={"as_of": str(2**62)},
        )

    assert answer.status_code == 500
    assert answer.json()["type"] == "urn:ordertrail:problem:history-inconsistent"
    assert "audit verify" in answer.json()["detail"]


async def test_a_replay_shows_where_a_broken_stream_breaks(
    pool: asyncpg.Pool, database_url: str, order_id: str
) -> None:
    await build(pool, order_id)
    async with tampering(pool) as connection:
        await connection.execute(
            "DELETE FROM events WHERE order_id = $1 AND upc = $2 AND version = 2",
            order_id,
            UPCS[0],
        )

    code, out, _ = await run_cli(
        database_url, "replay", order_id, "--upc", UPCS[0], "--json"
    )
    rows = [msgspec.json.decode(line) for line in out.splitlines()]

    assert code == 0
    assert [(row["version"], row["refused"]) for row in rows] == [
        (1, None),
        (3, "version 3 where 2 was due"),
        (4, "version 4 where 2 was due"),
    ]
    assert rows[1]["tampering"] == ["version_gap"]
    assert rows[2]["state"] == "ordered"
