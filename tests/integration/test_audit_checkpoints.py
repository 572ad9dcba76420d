"""Signed checkpoints: recording, settling, forging, and the command around them.

Tests that forge or break checkpoints do it in a database of their own:
every verification checks every checkpoint, so a forged one in the shared
database would be found by every later test.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from ordertrail.audit.chains import FindingKind
from ordertrail.audit.checkpoints import list_checkpoints, record_checkpoint
from ordertrail.audit.digest import AuditKey
from ordertrail.audit.export import export_lines
from ordertrail.audit.settle import LogNotSettled, settled_position
from ordertrail.audit.verify import verify_log
from ordertrail.audit.verify_export import verify_export
from ordertrail.db.connection import connect
from ordertrail.db.migrate import apply_migrations
from ordertrail.eventstore.store import EventStore
from tests.support import delivery, with_database

KEY_TEXT = "checkpoint-tests-key-0123456789abcdefghijk"
KEY = AuditKey(KEY_TEXT)
STORE = EventStore()


@pytest.fixture
async def fresh(server_url: str) -> AsyncIterator[str]:
    """A migrated database of this test's own."""
    async with with_database(server_url) as url:
        connection = await connect(url)
        try:
            await apply_migrations(connection)
        finally:
            await connection.close()
        yield url


@pytest.fixture
async def connection(fresh: str) -> AsyncIterator[asyncpg.Connection]:
    opened = await connect(fresh)
    try:
        yield opened
    finally:
        await opened.close()


async def append(
    connection: asyncpg.Connection, order_id: str, *statuses: str, mode: str = "live"
) -> int:
    """Append one event per status to two items; return the last position."""
    position = 0
    for status in statuses:
        for upc in ("111", "222"):
            async with connection.transaction():
                (event,) = await STORE.append(
                    connection, [delivery(order_id, upc=upc, status=status, mode=mode)]
                )
            position = event.position
    return position


async def test_a_checkpoint_signs_every_stream_at_the_settled_position(
    connection: asyncpg.Connection,
) -> None:
    await append(connection, "A", "ordered", "confirmed")
    last = await append(connection, "B", "ordered", mode="test")

    recorded = await record_checkpoint(connection, KEY)

    assert recorded is not None
    assert (recorded.position, recorded.stream_count) == (last, 4)
    assert recorded.key_id == KEY.key_id
    assert KEY.signed(
        recorded.signature,
        recorded.position,
        recorded.stream_count,
        recorded.digest,
        recorded.created_at,
    )
    assert await list_checkpoints(connection) == [recorded]


async def test_nothing_new_records_nothing(connection: asyncpg.Connection) -> None:
    assert await record_checkpoint(connection, KEY) is None
    await append(connection, "A", "ordered")
    assert await record_checkpoint(connection, KEY) is not None

    assert await record_checkpoint(connection, KEY) is None
    assert len(await list_checkpoints(connection)) == 1


async def test_checkpoints_store_only_the_heads_that_moved(
    connection: asyncpg.Connection,
) -> None:
    await append(connection, "A", "ordered")
    await append(connection, "B", "ordered")
    first = await record_checkpoint(connection, KEY)
    await append(connection, "B", "confirmed")
    second = await record_checkpoint(connection, KEY)
    assert first is not None
    assert second is not None

    rows = await connection.fetch(
        "SELECT checkpoint_id, order_id, version FROM audit_checkpoint_heads "
        "ORDER BY checkpoint_id, order_id, upc"
    )

    assert [tuple(row) for row in rows] == [
        (first.id, "A", 1),
        (first.id, "A", 1),
        (first.id, "B", 1),
        (first.id, "B", 1),
        (second.id, "B", 2),
        (second.id, "B", 2),
    ]
    assert second.stream_count == 4
    report = await verify_log(connection, key=KEY)
    assert report.clean, [f.describe() for f in report.findings]


async def test_a_full_export_carries_the_checkpoints_digest(
    connection: asyncpg.Connection, tmp_path: Path
) -> None:
    await append(connection, "A", "ordered", "confirmed")
    await append(connection, "B", "ordered", mode="test")
    recorded = await record_checkpoint(connection, KEY)
    assert recorded is not None
    path = tmp_path / "export.ndjson"

    with path.open("wb") as file:
        async for chunk in export_lines(
            connection, mode=None, from_position=1, to_position=recorded.position
        ):
            file.write(chunk)
    result = verify_export(path, expect_digest=recorded.digest.hex())

    assert result.clean, [f.describe() for f in result.findings]
    assert result.heads_digest == recorded.digest.hex()


async def test_a_forged_checkpoint_has_a_bad_signature(
    connection: asyncpg.Connection,
) -> None:
    await append(connection, "A", "ordered")
    genuine = await record_checkpoint(connection, KEY)
    assert genuine is not None

    # A forger copies the genuine one's digest to claim a later position.
    forged_id = await connection.fetchval(
        "INSERT INTO audit_checkpoints (position, stream_count, digest, key_id, "
        "signature, created_at) VALUES ($1, $2, $3, $4, $5, now()) RETURNING id",
        genuine.position + 10,
        genuine.stream_count,
        genuine.digest,
        genuine.key_id,
        b"\x00" * 32,
    )
    report = await verify_log(connection, key=KEY)

    assert [(f.kind, f.checkpoint) for f in report.findings] == [
        (FindingKind.BAD_SIGNATURE, forged_id)
    ]


async def test_a_checkpoint_signed_with_another_key_cannot_be_trusted(
    connection: asyncpg.Connection,
) -> None:
    await append(connection, "A", "ordered")
    recorded = await record_checkpoint(connection, AuditKey("x" * 40))
    assert recorded is not None

    report = await verify_log(connection, key=KEY)
    unchecked = await verify_log(connection, key=None)

    assert [(f.kind, f.checkpoint) for f in report.findings] == [
        (FindingKind.UNKNOWN_SIGNING_KEY, recorded.id)
    ]
    assert unchecked.clean
    assert not unchecked.signatures_checked


async def test_altered_recorded_heads_no_longer_match_the_digest(
    connection: asyncpg.Connection,
) -> None:
    await append(connection, "A", "ordered", "confirmed")
    recorded = await record_checkpoint(connection, KEY)
    assert recorded is not None

    # Hiding a deleted tail would take lowering the recorded head too.
    async with connection.transaction():
        await connection.execute("SET LOCAL session_replication_role = replica")
        await connection.execute(
            "UPDATE audit_checkpoint_heads SET version = 1 WHERE upc = '111'"
        )
        await connection.execute(
            "DELETE FROM events WHERE order_id = 'A' AND upc = '111' AND version = 2"
        )
    report = await verify_log(connection, key=KEY)

    assert [(f.kind, f.checkpoint) for f in report.findings] == [
        (FindingKind.CHECKPOINT_HEADS_ALTERED, recorded.id)
    ]
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await connection.execute("DELETE FROM audit_checkpoint_heads")


async def test_checkpoints_refuse_changes(connection: asyncpg.Connection) -> None:
    await append(connection, "A", "ordered")
    await record_checkpoint(connection, KEY)

    for statement in (
        "UPDATE audit_checkpoints SET position = position + 1",
        "DELETE FROM audit_checkpoints",
        "TRUNCATE audit_checkpoints CASCADE",
        "UPDATE audit_checkpoint_heads SET version = version + 1",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute(statement)


async def test_settling_waits_for_a_transaction_holding_a_position(
    fresh: str, connection: asyncpg.Connection
) -> None:
    writer = await connect(fresh)
    try:
        transaction = writer.transaction()
        await transaction.start()
        (held,) = await STORE.append(writer, [delivery("late", status="ordered")])
        later = await append(connection, "early", "ordered")
        assert later > held.position

        async def commit_soon() -> None:
            await asyncio.sleep(0.3)
            await transaction.commit()

        started = time.monotonic()
        settled, _ = await asyncio.gather(settled_position(connection), commit_soon())
        waited = time.monotonic() - started
    finally:
        await writer.close()

    assert settled == later
    assert waited >= 0.3
    recorded = await record_checkpoint(connection, KEY)
    assert recorded is not None
    assert recorded.stream_count == 3


async def test_settling_gives_up_on_a_transaction_that_does_not_end(
    fresh: str, connection: asyncpg.Connection
) -> None:
    writer = await connect(fresh)
    try:
        async with writer.transaction():
            await STORE.append(writer, [delivery("stuck", status="ordered")])
            with pytest.raises(LogNotSettled, match="still hold positions"):
                await settled_position(connection, within=0.2)
    finally:
        await writer.close()


async def run_cli(
    database_url: str, *args: str, key: str | None = KEY_TEXT
) -> tuple[int, str, str]:
    environment = {**os.environ, "ORDERTRAIL_DATABASE_URL": database_url}
    environment.pop("ORDERTRAIL_AUDIT_KEY", None)
    if key is not None:
        environment["ORDERTRAIL_AUDIT_KEY"] = key
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


async def test_the_command_refuses_to_sign_without_a_key(fresh: str) -> None:
    code, _, err = await run_cli(fresh, "audit", "checkpoint", key=None)
    short_code, _, short_err = await run_cli(fresh, "audit", "checkpoint", key="short")

    assert code == 2
    assert "ORDERTRAIL_AUDIT_KEY is not set" in err
    assert short_code == 2
    assert "at least 32" in short_err


async def test_the_commands_record_list_and_verify(
    fresh: str, connection: asyncpg.Connection
) -> None:
    await append(connection, "A", "ordered")

    recorded = await run_cli(fresh, "audit", "checkpoint")
    listed = await run_cli(fresh, "audit", "checkpoints", "--json")
    verified = await run_cli(fresh, "audit", "verify")
    unsigned = await run_cli(fresh, "audit", "verify", key=None)

    assert recorded[0] == 0
    assert recorded[1].startswith("checkpoint 1 at position 2: 2 streams")
    (document,) = [msgspec.json.decode(line) for line in listed[1].splitlines()]
    assert (document["id"], document["stream_count"]) == (1, 2)
    assert document["digest"] in recorded[1]
    assert KEY_TEXT not in recorded[1] + recorded[2] + listed[1] + verified[2]
    assert verified[0] == 0
    assert verified[1].rstrip().endswith("clean")
    assert unsigned[0] == 0
    assert "signatures were not checked" in unsigned[2]


async def test_the_checkpointer_runs_every_interval_and_logs_each(
    fresh: str, connection: asyncpg.Connection
) -> None:
    environment = {
        **os.environ,
        "ORDERTRAIL_DATABASE_URL": fresh,
        "ORDERTRAIL_AUDIT_KEY": KEY_TEXT,
        "ORDERTRAIL_LOG_FORMAT": "json",
    }
    await append(connection, "A", "ordered")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordertrail",
        "audit",
        "checkpoint",
        "--every",
        "1s",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    try:
        deadline = time.monotonic() + 20
        while len(await list_checkpoints(connection)) < 1:
            assert time.monotonic() < deadline, "no first checkpoint"
            await asyncio.sleep(0.1)
        await append(connection, "B", "ordered")
        while len(await list_checkpoints(connection)) < 2:
            assert time.monotonic() < deadline, "no second checkpoint"
            await asyncio.sleep(0.1)
    finally:
        process.terminate()
        _, err = await asyncio.wait_for(process.communicate(), timeout=20)

    events = [
        msgspec.json.decode(line)["event"]
        for line in err.splitlines()
        if line.startswith(b"{")
    ]
    assert events.count("audit.checkpoint_recorded") >= 2
    assert KEY_TEXT.encode() not in err
