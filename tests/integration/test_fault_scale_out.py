"""Several ``ordertrail serve`` processes against one database.

Two, then three, services on ports of their own take webhooks from 64
concurrent senders, each attempt going to the next service in turn, so the
changes of one item (its status changes and messages, racing each other)
arrive through different processes at once. The tests prove:

- no event is lost: every 202 is in the log where its answer said, and each
  webhook is stored once as a transition;
- no stream has a repeated or missing version, and no batch had to be
  committed again: the stream locks queue the processes (the unique key is
  only the backstop); the chains are checked too;
- exactly one process runs the projection: at no sample does more than one
  session hold the runner's lock, the holder belongs to one service, exactly
  one service logged its election, and the checkpoint reaches the head;
- every service answers the same state for every item, equal to a fresh fold
  of the log, and so does the view's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from ordertrail.eventstore.records import StreamKey
from ordertrail.projections.items import ItemView
from tests.integration.fault_support import (
    Webhook,
    acknowledgement_faults,
    elections,
    log_tail,
    logged_events,
    plan_webhooks,
    runner_at_head,
    runner_holders,
    sending,
    service_owning,
    serving,
    stream_faults,
    transition_faults,
)
from tests.integration.projection_support import (
    OwnDatabase,
    Service,
    differing,
    projection_for,
    rows_of,
    scratch_fold,
    served_version,
    until,
)
from tests.support import bearer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

_RETRIES = ('"event":"writer.batch_failed"', '"event":"writer.failed"')


@pytest.mark.parametrize("processes", [2, 3])
async def test_services_side_by_side_lose_nothing_and_agree(
    own: OwnDatabase, tmp_path: Path, processes: int
) -> None:
    token = secrets.token_urlsafe(24)
    reader = await _reader_key(own.pool)
    # 120 items, each with 1 to 3 status changes and 6 messages, the
    # messages racing the second change to the same stream.
    webhooks = plan_webhooks(60, 2, messages=6)
    logs = [tmp_path / f"service-{number}.log" for number in range(processes)]

    async with _services(own.url, logs, ORDERTRAIL_WEBHOOK_TOKEN_LIVE=token) as fleet:
        targets = [service.base_url for service in fleet]
        async with _election_watch(own.pool) as holders_seen:
            async with sending(webhooks, targets, token) as load:
                await asyncio.wait_for(load.finished(), 90)
            events = await logged_events(own.pool)
            settled, caught_up = await _until_runner_at_head(own.pool, logs)
        holder = await _single_runner(own.pool, fleet, logs)
        answers = await _item_answers(fleet, reader, {e.stream for e in events})

    statuses = Counter(a.status for w in webhooks for a in w.attempts)
    assert statuses == Counter({202: len(webhooks)}), statuses
    assert acknowledgement_faults(webhooks, events) == []
    assert transition_faults(webhooks, events) == []
    assert stream_faults(events) == []
    raced = _raced_streams(webhooks)
    assert raced, "no item was sent to two services at once"
    # Each batch committed the first time: the stream locks queued the
    # processes, rather than the unique key turning a collision away and the
    # writer committing the batch again one delivery at a time.
    retried = [log for log in logs if any(f in log.read_text() for f in _RETRIES)]
    assert retried == [], [log_tail(log) for log in retried]

    assert max(holders_seen) == 1, f"runner lock holders seen: {holders_seen}"

    expected = await _fold(own.pool)
    async with own.pool.acquire() as connection:
        table = await rows_of(connection, (await served_version(own.pool)).table_name)
    assert differing(table, expected) == []
    for service in fleet:
        assert differing(answers[service.base_url], expected) == [], service.base_url

    print(
        f"\n{processes} services: {len(webhooks)} webhooks, all 202; "
        f"{len(events)} events in {len({e.stream for e in events})} streams; "
        f"{len(raced)} items sent to two services at once; runner lock held "
        f"by one session in all {len(holders_seen)} samples, by {holder}; "
        f"log settled in {settled:.2f} s, checkpoint at its end "
        f"{caught_up:.2f} s later"
    )


# Steps ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _services(
    database_url: str, logs: Sequence[Path], **variables: str
) -> AsyncIterator[list[Service]]:
    """One ``ordertrail serve`` per log, started one after the other."""
    async with contextlib.AsyncExitStack() as stack:
        fleet = [
            await stack.enter_async_context(
                serving(
                    database_url,
                    log,
                    ORDERTRAIL_LOG_LEVEL="info",
                    # Every item is read from every service with one key.
                    ORDERTRAIL_KEY_RATE="0",
                    ORDERTRAIL_POOL_MAX="6",
                    **variables,
                )
            )
            for log in logs
        ]
        yield fleet


async def _reader_key(pool: asyncpg.Pool) -> str:
    async with pool.acquire() as connection:
        issued = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.READER, label="scale-out"
        )
    return issued.secret


@contextlib.asynccontextmanager
async def _election_watch(pool: asyncpg.Pool) -> AsyncIterator[list[int]]:
    """Count the runner lock's holders every 50 ms while the body runs."""
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            seen.append(len(await runner_holders(pool)))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _until_runner_at_head(
    pool: asyncpg.Pool, logs: Sequence[Path]
) -> tuple[float, float]:
    """Wait for the log to settle, then for the runner to reach its end.

    Returns the seconds each took. Any transaction open on the server holds
    the settling back; the runner then wakes within its poll interval.
    """
    settled = await until(lambda: _settled(pool), "the log settling", within=30)
    try:
        caught_up = await until(
            lambda: runner_at_head(pool), "the runner reaching the head", within=20
        )
    except pytest.fail.Exception:
        pytest.fail(f"the checkpoint stayed behind: {[log_tail(log) for log in logs]}")
    return settled, caught_up


async def _settled(pool: asyncpg.Pool) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()) "
            "FROM events"
        )
    )


async def _single_runner(
    pool: asyncpg.Pool, fleet: list[Service], logs: Sequence[Path]
) -> str:
    """The one service that runs the projection: it says so, and holds the lock.

    Exactly one session holds the runner's lock, and exactly one service
    logged its election, once. Over TCP the session's client port names the
    process that holds it, which must be that service; a Unix socket (the
    embedded server) has no port to follow.
    """
    holders = await runner_holders(pool)
    assert len(holders) == 1, holders
    said = [elections(log) for log in logs]
    assert sorted(said) == [0] * (len(logs) - 1) + [1], said
    elected = fleet[said.index(1)]
    port = holders[0]["client_port"]
    if port is not None and port > 0:
        assert service_owning(fleet, port) == [elected]
    return elected.base_url


async def _item_answers(
    fleet: list[Service], reader: str, streams: set[StreamKey]
) -> dict[str, dict[StreamKey, ItemView]]:
    """Every item as each service answers it."""
    gate = asyncio.Semaphore(16)
    answers: dict[str, dict[StreamKey, ItemView]] = {s.base_url: {} for s in fleet}
    async with httpx.AsyncClient(timeout=10, headers=bearer(reader)) as http:

        async def read(service: Service, stream: StreamKey) -> None:
            async with gate:
                answer = await http.get(
                    f"{service.base_url}/v1/orders/{stream.order_id}/items/{stream.upc}"
                )
            assert answer.status_code == 200, answer.text
            view = msgspec.json.decode(answer.content, type=ItemView)
            answers[service.base_url][stream] = view

        await asyncio.gather(*(read(s, stream) for s in fleet for stream in streams))
    return answers


async def _fold(pool: asyncpg.Pool) -> dict[StreamKey, ItemView]:
    """Every item folded from its events alone, by the served version's code."""
    served = await served_version(pool)
    async with pool.acquire() as connection:
        projection = await projection_for(connection, served.version)
        return await scratch_fold(connection, projection)


def _raced_streams(webhooks: list[Webhook]) -> set[StreamKey]:
    """Items with two deliveries in flight at once, to different services."""
    spans: dict[StreamKey, list[tuple[float, float, str]]] = {}
    for webhook in webhooks:
        for attempt in webhook.attempts:
            spans.setdefault(webhook.stream, []).append(
                (attempt.sent_at, attempt.answered_at, attempt.target)
            )
    raced = set()
    for stream, intervals in spans.items():
        intervals.sort()
        for (_, ends, target), (starts, _, other) in itertools.pairwise(intervals):
            if starts < ends and target != other:
                raced.add(stream)
    return raced
