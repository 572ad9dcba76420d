"""Shared by the projection runtime tests: a database of their own, folds from
scratch, the command line and the service in processes of their own.

The projection catalogue is global to a database (one served version, and a
swap changes what every reader sees), so every test that rebuilds, swaps,
fails or skips a projection runs on a fresh database made here and dropped
afterwards, never on the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import asyncpg
import httpx
import msgspec
import pytest

from ordertrail.db.connection import Connection, create_pool
from ordertrail.db.migrate import apply_migrations
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.notifications import Listener, PositionSignal
from ordertrail.eventstore.records import Cursor, Delivery, RecordedEvent, StreamKey
from ordertrail.eventstore.store import EVENTS_CHANNEL, EventStore, NewEvent
from ordertrail.ingest.writer import append_and_project
from ordertrail.projections import catalogue
from ordertrail.projections.catalogue import PROJECTIONS_CHANNEL, ProjectionVersion
from ordertrail.projections.items import (
    PROJECTION_NAME,
    VIEW_COLUMNS,
    ItemProjection,
    ItemView,
)
from ordertrail.projections.served import ServedProjection
from ordertrail.projections.supervisor import RunnerSupervisor
from tests.support import (
    UPC,
    create_database,
    delivery,
    drop_database,
    fresh_database_name,
    webhook_body,
)

__all__ = [
    "STORE",
    "Completed",
    "EndState",
    "OwnDatabase",
    "Service",
    "append_inline",
    "append_raw",
    "assert_verified",
    "differing",
    "elected_runner",
    "end_state",
    "environment",
    "free_port",
    "kill_group",
    "ordertrail",
    "own_database",
    "projection_for",
    "report",
    "rows_of",
    "running_service",
    "scratch_fold",
    "served_version",
    "settle",
    "start_command",
    "table_exists",
    "until",
    "view_source",
    "whole_log",
]

STORE = EventStore()
"""The event store as the service configures it by default."""


@dataclass(frozen=True)
class OwnDatabase:
    """A migrated database that one test alone uses."""

    url: str
    pool: asyncpg.Pool


@contextlib.asynccontextmanager
async def own_database(server_url: str) -> AsyncIterator[OwnDatabase]:
    """Create and migrate a fresh database; drop it (and its clients) afterwards."""
    name = fresh_database_name()
    url = await create_database(server_url, name)
    try:
        connection = await asyncpg.connect(url)
        try:
            await apply_migrations(connection)
        finally:
            await connection.close()
        pool = await create_pool(url, min_size=1, max_size=8)
        try:
            yield OwnDatabase(url, pool)
        finally:
            await pool.close()
    finally:
        await drop_database(server_url, name)


# The log -----------------------------------------------------------------------

_sequence = itertools.count(1)


def report(
    order_id: str,
    status: str,
    *,
    upc: str = UPC,
    mode: str = "live",
    received_at: datetime | None = None,
) -> Delivery:
    """A delivery whose body no earlier one had, so it is never a redelivery."""
    body = webhook_body(order_id, upc=upc, status=status, sequence=next(_sequence))
    return delivery(
        order_id,
        upc=upc,
        status=status,
        mode=mode,
        raw_body=body,
        received_at=received_at,
    )


async def append_raw(
    pool: asyncpg.Pool, deliveries: Sequence[Delivery], *, announce: bool = False
) -> list[NewEvent]:
    """Append in one transaction without touching any projection.

    What a log looks like to a runner when the inline update did not happen
    (older code, a crash between the two, a version that did not exist yet).
    ``announce`` sends the notification a writer sends after its commit.
    """
    async with pool.acquire() as connection, connection.transaction():
        events = await STORE.append(connection, deliveries)
        if announce:
            last = max(event.position for event in events)
            await connection.execute(
                "SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(last)
            )
    return events


async def append_inline(
    pool: asyncpg.Pool, served: ServedProjection, deliveries: Sequence[Delivery]
) -> list[NewEvent]:
    """Append as the ingest writer does: events and the served view together."""
    async with pool.acquire() as connection:
        return await append_and_project(connection, STORE, served, deliveries)


async def settle(pool: asyncpg.Pool) -> None:
    """Wait until every event in the log is below the snapshot horizon.

    Runners read only there. Any transaction open on the same server, in any
    database (another test run, a benchmark), holds the horizon back for as
    long as it stays open; a test that asserts what a runner applied waits
    for its own events to settle first.
    """
    await until(lambda: _settled(pool), "the log settling", within=30)


async def _settled(pool: asyncpg.Pool) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT coalesce(max(transaction_id) < "
            "pg_snapshot_xmin(pg_current_snapshot()), true) FROM events"
        )
    )


async def whole_log(connection: Connection) -> list[RecordedEvent]:
    """Every event, committed or not yet settled, in read order."""
    return await STORE.read_after(connection, Cursor(), 10**9, settled=False)


# Views and folds ---------------------------------------------------------------


async def rows_of(connection: Connection, table: str) -> dict[StreamKey, ItemView]:
    """Every row of an item view table, as the projection's own struct."""
    rows = await connection.fetch(f'SELECT {", ".join(VIEW_COLUMNS)} FROM "{table}"')
    return {
        StreamKey(row["mode"], row["order_id"], row["upc"]): msgspec.convert(
            dict(row.items()), ItemView
        )
        for row in rows
    }


async def scratch_fold(
    connection: Connection,
    projection: ItemProjection,
    *,
    upto: Cursor | None = None,
) -> dict[StreamKey, ItemView]:
    """Fold every stream from its first event, with no saved row involved.

    ``upto`` keeps only events at or before that place in the read order:
    what a table whose checkpoint is there must hold, no more and no less.
    """
    streams: dict[StreamKey, list[RecordedEvent]] = {}
    for event in await whole_log(connection):
        if upto is None or Cursor(event.transaction_id, event.position) <= upto:
            streams.setdefault(event.stream, []).append(event)
    folded = {}
    for stream, events in streams.items():
        item = projection.fold(None, sorted(events, key=lambda e: e.version))
        assert item is not None
        folded[stream] = ItemView.of(item)
    return folded


def differing(
    actual: dict[StreamKey, ItemView], expected: dict[StreamKey, ItemView]
) -> list[str]:
    """Say, item by item, how two sets of rows disagree (empty when equal)."""
    faults = [f"{key} missing" for key in expected.keys() - actual.keys()]
    faults += [f"{key} unexpected" for key in actual.keys() - expected.keys()]
    for key in expected.keys() & actual.keys():
        if actual[key] != expected[key]:
            faults.append(f"{key}: {actual[key]} != {expected[key]}")
    return faults


async def projection_for(
    connection: Connection, version: int, name: str = PROJECTION_NAME
) -> ItemProjection:
    """The projection that writes ``version``'s table, as its runner builds it."""
    record = await catalogue.find(connection, name, version)
    assert record is not None, f"no version {version}"
    skipped = await catalogue.skipped_positions(connection, name, version)
    return ItemProjection(
        record.vocabulary_or(Vocabulary.default()),
        STORE,
        version=version,
        table=record.table_name,
        skipped=skipped,
    )


async def served_version(pool: asyncpg.Pool) -> ProjectionVersion:
    """The version readers are served now."""
    async with pool.acquire() as connection:
        return await catalogue.served(connection, PROJECTION_NAME)


class EndState(NamedTuple):
    """What a load left behind: the log, the served view and a fold of the log."""

    log: list[RecordedEvent]
    projection: ItemProjection
    view: dict[StreamKey, ItemView]
    fold: dict[StreamKey, ItemView]


async def end_state(pool: asyncpg.Pool) -> EndState:
    """Read the whole log and the served view, and fold the log from scratch."""
    served = await served_version(pool)
    async with pool.acquire() as connection:
        log = await whole_log(connection)
        projection = await projection_for(connection, served.version)
        view = await rows_of(connection, "item_view")
        fold = await scratch_fold(connection, projection)
    return EndState(log, projection, view, fold)


async def view_source(pool: asyncpg.Pool) -> str:
    """The table the readers' view ``item_view`` selects from."""
    source = await pool.fetchval(
        "SELECT DISTINCT c.relname FROM pg_depend d "
        "JOIN pg_rewrite r ON r.oid = d.objid "
        "JOIN pg_class c ON c.oid = d.refobjid "
        "WHERE r.ev_class = 'item_view'::regclass AND c.oid <> r.ev_class "
        "AND c.relkind = 'r'"
    )
    assert isinstance(source, str)
    return source


async def table_exists(pool: asyncpg.Pool, table: str) -> bool:
    """Whether ``table`` is still in the database."""
    return bool(await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", table))


async def until(
    condition: Callable[[], Awaitable[bool]], what: str, within: float = 10.0
) -> float:
    """Wait until ``condition`` holds; return the seconds it took."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# The runner as a service elects it --------------------------------------------


@contextlib.asynccontextmanager
async def elected_runner(
    own: OwnDatabase, *, poll_interval: float
) -> AsyncIterator[RunnerSupervisor]:
    """A supervisor woken by appends and catalogue changes, as a service wires it."""
    appended, changed = PositionSignal(), PositionSignal()
    listener = Listener(own.url, retry_delay=0.2)
    listener.subscribe(EVENTS_CHANNEL, appended.notice)
    listener.subscribe(PROJECTIONS_CHANNEL, changed.notice)
    supervisor = RunnerSupervisor(
        own.url,
        STORE,
        Vocabulary.default(),
        appended,
        changed,
        retry_interval=0.2,
        poll_interval=poll_interval,
    )
    await listener.start()
    await asyncio.wait_for(listener.connected.wait(), 10)
    await supervisor.start()
    try:
        await asyncio.wait_for(supervisor.elected.wait(), 10)
        yield supervisor
    finally:
        await supervisor.stop()
        await listener.stop()


# The command line and the service, in processes of their own -------------------


@dataclass(frozen=True)
class Completed:
    """A finished ``ordertrail`` command."""

    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, object]]:
        """The standard output read as JSON lines."""
        return [msgspec.json.decode(line) for line in self.stdout.splitlines() if line]


def assert_verified(verified: Completed, events: int) -> None:
    """``ordertrail audit verify`` found ``events`` events and nothing wrong."""
    assert verified.returncode == 0, verified.stdout + verified.stderr
    summary = verified.json_lines()[-1]["summary"]
    assert isinstance(summary, dict)
    assert (summary["clean"], summary["events"]) == (True, events)


def environment(database_url: str, **variables: str) -> dict[str, str]:
    """The process environment, with ordertrail configured only by the test."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ORDERTRAIL_")}
    return {
        **inherited,
        # Wide enough that rich never wraps a line the tests read.
        "COLUMNS": "240",
        "ORDERTRAIL_DATABASE_URL": database_url,
        "ORDERTRAIL_LOG_LEVEL": "warning",
        **variables,
    }


async def start_command(
    database_url: str, *arguments: str, **variables: str
) -> asyncio.subprocess.Process:
    """Start ``ordertrail ARGUMENTS`` in a process group of its own."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordertrail",
        *arguments,
        env=environment(database_url, **variables),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


async def ordertrail(
    database_url: str, *arguments: str, within: float = 120.0, **variables: str
) -> Completed:
    """Run ``ordertrail ARGUMENTS`` to the end, as an operator would."""
    process = await start_command(database_url, *arguments, **variables)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        kill_group(process.pid)
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())


def kill_group(pid: int, sent: signal.Signals = signal.SIGKILL) -> None:
    """Signal every process of the group ``pid`` leads (server and workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sent)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Service:
    """``ordertrail serve`` running in a process group of its own."""

    process: asyncio.subprocess.Process
    base_url: str

    @property
    def pid(self) -> int:
        """The server's process id, which leads its group."""
        return self.process.pid

    def kill(self) -> None:
        """Kill the server and its workers at once, as a crash would."""
        kill_group(self.pid)

    async def stop(self) -> None:
        """Stop gracefully; kill whatever is left after a while."""
        kill_group(self.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.kill()
            await self.process.wait()
        # A killed server's workers may outlive it for a moment.
        kill_group(self.pid)


@contextlib.asynccontextmanager
async def running_service(
    database_url: str, **variables: str
) -> AsyncIterator[Service]:
    """Start ``ordertrail serve`` on a free port; stop it on the way out."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordertrail",
        "serve",
        env=environment(database_url, ORDERTRAIL_PORT=str(port), **variables),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    service = Service(process, f"http://127.0.0.1:{port}")
    try:
        await _until_ready(service)
        yield service
    finally:
        await service.stop()


async def _until_ready(service: Service) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        while time.monotonic() < deadline:
            if service.process.returncode is not None:
                pytest.fail(f"the service exited with {service.process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/health/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    pytest.fail("the service did not become ready")
