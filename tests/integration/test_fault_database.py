"""PostgreSQL stops under load and comes back: the service answers honestly
while it is gone and recovers by itself.

``ordertrail serve`` runs against a throwaway cluster (tests/clusters.py)
while 64 senders post webhooks and retry as Locally does. The cluster is
stopped (``fast``: sessions are told and their transactions rolled back;
``immediate``: the server quits at once and recovers from its WAL on the
next start), kept down for a moment while a prober keeps posting and
reading, then started again on the same port; three times, with the load
going on in between. The tests prove:

- while it is down, every webhook answers 503 with a problem document
  (never 202: a 202 means committed), ``/health/ready`` answers 503 naming
  the database, and reads answer 503 problems, not 500;
- once it is back, without restarting the service, webhooks get 202 again
  within seconds, ``/health/ready`` is ready, a long poll parked after the
  recovery is woken by a new webhook (the listener reconnected), the
  projection runner moves its checkpoint to the head of the log again (its
  election connection was re-opened), and the view equals a fold of the log;
- every 202, before, during and after, is in the log exactly once, every
  webhook the senders retried through the outage ends up stored once as a
  transition, and the streams' versions and chains are whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from ordertrail.auth.credentials import (
    CredentialCache,
    CredentialKind,
    Role,
    bootstrap_token,
    create_credential,
)
from ordertrail.db.connection import create_pool
from tests.clusters import Cluster, skip_unless_runnable, throwaway_cluster
from tests.integration.fault_support import (
    LOCALLY_RETRY_DELAYS,
    Webhook,
    acknowledgement_faults,
    log_tail,
    logged_events,
    plan_webhooks,
    post_once,
    runner_at_head,
    runner_holders,
    sending,
    serving,
    stream_faults,
    transition_faults,
)
from tests.integration.projection_support import (
    OwnDatabase,
    differing,
    own_database,
    projection_for,
    rows_of,
    scratch_fold,
    served_version,
    settle,
    until,
)
from tests.support import UPC, bearer, new_order_id, webhook_body

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    skip_unless_runnable(),
]

OUTAGES = 3
"""Stops per test. A fast stop ends each idle session with a message that
asyncpg takes for a protocol error until it sees the socket close, and a
task that queries in between gets an InternalClientError. Whether a
background task does depends on timing; each stop is another chance."""
DOWN_FOR = 1.5
"""Seconds the database stays down once stopped, while the test probes it."""
RECOVERY_WITHIN = 10.0
"""Seconds after the start within which webhooks must be accepted again."""
ACCEPTED_BEFORE_THE_STOP = 300
ACCEPTED_BETWEEN_OUTAGES = 100
"""202s the senders get after each recovery before the next stop."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A PostgreSQL server of this test's own, which it may stop."""
    with throwaway_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
async def own(cluster: Cluster) -> AsyncIterator[OwnDatabase]:
    """A migrated database on the test's own server."""
    async with own_database(cluster.url()) as database:
        yield database


@dataclass
class Outage:
    """When the database was down, as the test saw it (``time.monotonic()``)."""

    stopping: float = 0.0
    """When ``pg_ctl stop`` was called."""
    down: float = 0.0
    """When it returned: the server is gone."""
    starting: float = 0.0
    """When ``pg_ctl start`` was called."""
    up: float = 0.0
    """When it returned: the server takes connections."""
    answers: list[tuple[str, float, httpx.Response]] = field(default_factory=list)
    """Reads and probes made while it was down: (what, sent at, answer)."""

    def within(self, sent_at: float, answered_at: float) -> bool:
        """Whether a request went out and came back while the server was down."""
        return self.down <= sent_at and answered_at <= self.starting


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_the_service_answers_503_while_the_database_is_down_and_recovers(
    own: OwnDatabase, cluster: Cluster, tmp_path: Path, mode: str
) -> None:
    token = secrets.token_urlsafe(24)
    reader = await _reader_key(own.pool)
    log = tmp_path / "service.log"
    webhooks = plan_webhooks(200, 4)
    probes: list[Webhook] = []
    outages: list[Outage] = []
    recoveries: list[float] = []

    async with (
        serving(
            own.url,
            log,
            ORDERTRAIL_WEBHOOK_TOKEN_LIVE=token,
            ORDERTRAIL_LOG_LEVEL="info",
        ) as service,
        httpx.AsyncClient(base_url=service.base_url, timeout=10) as http,
    ):
        await _until_reads(http, reader)
        async with sending(
            webhooks, [service.base_url], token, retry_delays=LOCALLY_RETRY_DELAYS
        ):
            await _until_accepted(webhooks, ACCEPTED_BEFORE_THE_STOP)
            async with _probing(http, token, probes):
                for _ in range(OUTAGES):
                    outage = Outage()
                    outages.append(outage)
                    await _stop_and_start(cluster, mode, http, reader, outage)
                    recoveries.append(await _until_accepted_again(probes, outage, log))
                    await _until_accepted(webhooks, ACCEPTED_BETWEEN_OUTAGES)
        ready = await http.get("/health/ready")
        assert ready.status_code == 200, (ready.text, log_tail(log))
        woken = await _long_poll_woken_by_a_webhook(http, reader, token, probes, log)
        caught_up = await _runner_catches_up(own.pool, log)
        assert len(await runner_holders(own.pool)) == 1

    everything = [webhook for webhook in [*webhooks, *probes] if webhook.attempts]
    answered_while_down = [_assert_answers_while_down(o, everything) for o in outages]
    # The last outage ends well before a webhook's fourth attempt is due, so
    # each webhook the senders took was accepted in the end.
    unsettled = [w.attempts for w in webhooks if w.attempts and not w.settled]
    assert unsettled == [], "a retried webhook was never accepted"
    events = await logged_events(own.pool)
    assert acknowledgement_faults(everything, events) == []
    assert transition_faults(everything, events) == []
    assert stream_faults(events) == []
    await _assert_view_is_the_fold(own.pool)

    print(
        f"\n{mode} stops: down "
        + ", ".join(f"{o.starting - o.down:.1f} s" for o in outages)
        + f"; webhook answers while down {answered_while_down} (all 503); "
        "first 202 after the start returned in "
        + ", ".join(f"{seconds:.2f} s" for seconds in recoveries)
        + f"; long poll woken in {woken:.2f} s; runner at the head "
        f"{caught_up:.2f} s after the log settled; {len(events)} events"
    )


async def test_a_credential_cache_keeps_its_credentials_while_the_database_is_down(
    own: OwnDatabase, cluster: Cluster
) -> None:
    """A reload that cannot reach the database keeps what was loaded.

    The cache reloads every ``refresh_interval``: an outage longer than that
    must not turn a valid token into an error (the delivery then answers 503
    at the writer, so Locally retries) or into a refusal.
    """
    secret = secrets.token_urlsafe(24)
    pool = await create_pool(own.url, min_size=0, max_size=2)
    try:
        async with pool.acquire() as connection:
            issued = await create_credential(
                connection, CredentialKind.API_KEY, role=Role.READER, label="cache"
            )
        cache = CredentialCache(
            pool, bootstrap=[bootstrap_token("live", secret)], refresh_interval=0.05
        )
        await cache.reload()
        await asyncio.to_thread(cluster.stop, "fast")
        try:
            await asyncio.sleep(0.1)
            token = await cache.verify(secret, CredentialKind.WEBHOOK_TOKEN)
            key = await cache.verify(issued.secret, CredentialKind.API_KEY)
            assert token is not None
            assert token.mode == "live"
            assert key is not None
            assert key.role is Role.READER
        finally:
            await asyncio.to_thread(cluster.start)
        # Back up, it reloads again (a moment after the failed attempt): a
        # key revoked meanwhile is refused.
        await pool.execute("UPDATE credentials SET revoked_at = now()")
        await asyncio.sleep(1.1)
        assert await cache.verify(issued.secret, CredentialKind.API_KEY) is None
    finally:
        await pool.close()


# Steps ----------------------------------------------------------------------------


async def _reader_key(pool: asyncpg.Pool) -> str:
    async with pool.acquire() as connection:
        issued = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.READER, label="faults"
        )
    return issued.secret


async def _until_reads(http: httpx.AsyncClient, key: str) -> None:
    async def reads() -> bool:
        answer = await http.get("/v1/changes", headers=bearer(key))
        return answer.status_code == 200

    await until(reads, "the service accepting the new API key")


async def _until_accepted(webhooks: list[Webhook], more: int) -> None:
    """Wait until the senders have ``more`` 202s than now."""
    goal = _accepted(webhooks) + more
    deadline = time.monotonic() + 60
    while _accepted(webhooks) < goal:
        assert time.monotonic() < deadline, f"{more} more webhooks not accepted"
        await asyncio.sleep(0.01)


def _accepted(webhooks: list[Webhook]) -> int:
    return sum(webhook.acceptance is not None for webhook in webhooks)


@contextlib.asynccontextmanager
async def _probing(
    http: httpx.AsyncClient, token: str, probes: list[Webhook]
) -> AsyncIterator[None]:
    """Post a webhook for a new item every 50 ms, whatever came back before.

    The senders back off after a 503 as Locally does; the prober keeps
    posting through the whole outage, so every moment of it is tried. Its
    webhooks are never retried: those refused may be missing, never doubled.
    """

    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            webhook = _new_item(probes)
            target = str(http.base_url).rstrip("/")
            webhook.attempts.append(await post_once(http, target, webhook.body, token))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(probe())
    try:
        yield
    finally:
        # Not cancelled: a post cut short could be stored yet not recorded.
        stop.set()
        await asyncio.wait_for(task, 15)


_READS_WHILE_DOWN = {
    "ready": "/health/ready",
    "item": f"/v1/orders/T000000000000/items/{UPC}",
    "order": "/v1/orders/T000000000000",
    "items": "/v1/items",
    "changes": "/v1/changes",
    "unknown key": "/v1/changes",
}
"""What the test reads while the database is down: the probe, reads, and a
key the service has never seen (it cannot look it up)."""


def _new_item(probes: list[Webhook]) -> Webhook:
    """A webhook for an item nobody posted before, added to ``probes``."""
    order_id = new_order_id()
    body = webhook_body(order_id, status="ordered")
    webhook = Webhook(order_id, UPC, "ordered", body)
    probes.append(webhook)
    return webhook


async def _stop_and_start(
    cluster: Cluster,
    mode: str,
    http: httpx.AsyncClient,
    reader: str,
    outage: Outage,
) -> None:
    outage.stopping = time.monotonic()
    await asyncio.to_thread(cluster.stop, mode)
    try:
        outage.down = time.monotonic()
        while time.monotonic() - outage.down < DOWN_FOR:
            for what, path in _READS_WHILE_DOWN.items():
                key = "key_never_issued" if what == "unknown key" else reader
                headers = {} if what == "ready" else bearer(key)
                sent_at = time.monotonic()
                answer = await http.get(path, headers=headers)
                outage.answers.append((what, sent_at, answer))
            await asyncio.sleep(0.2)
    finally:
        # Started again whatever happened, so the database can be dropped.
        outage.starting = time.monotonic()
        await asyncio.to_thread(cluster.start)
        outage.up = time.monotonic()


async def _until_accepted_again(
    probes: list[Webhook], outage: Outage, log: Path
) -> float:
    """Seconds from the start's return to the first 202 of a webhook sent after it."""
    deadline = outage.up + RECOVERY_WITHIN
    while time.monotonic() < deadline:
        for webhook in probes:
            attempt = webhook.attempts[0] if webhook.attempts else None
            if attempt and attempt.accepted and attempt.sent_at >= outage.up:
                return attempt.answered_at - outage.up
        await asyncio.sleep(0.05)
    pytest.fail(
        f"no webhook accepted within {RECOVERY_WITHIN} s of the database's "
        f"return: {log_tail(log)}"
    )


def _assert_answers_while_down(outage: Outage, webhooks: list[Webhook]) -> int:
    """Check every answer given while the database was down; return how many."""
    answered_while_down = [
        attempt
        for webhook in webhooks
        for attempt in webhook.attempts
        if outage.within(attempt.sent_at, attempt.answered_at)
    ]
    assert answered_while_down, "no webhook was posted while the database was down"
    statuses = {attempt.status for attempt in answered_while_down}
    assert statuses == {503}, statuses
    for attempt in answered_while_down:
        assert attempt.content_type == "application/problem+json"
        assert attempt.document is not None
        assert attempt.document["type"] == "urn:ordertrail:problem:unavailable"

    assert {what for what, _, _ in outage.answers} == set(_READS_WHILE_DOWN)
    assert [fault for fault in map(_probe_fault, outage.answers) if fault] == []
    return len(answered_while_down)


def _probe_fault(probe: tuple[str, float, httpx.Response]) -> str | None:
    what, _, answer = probe
    if what == "ready":
        said = answer.json()
        if answer.status_code != 503 or said.get("database") != "unreachable":
            return f"ready: {answer.status_code} {answer.text}"
        return None
    problem_type = "urn:ordertrail:problem:unavailable"
    if (
        answer.status_code != 503
        or answer.headers.get("content-type") != "application/problem+json"
        or answer.json().get("type") != problem_type
    ):
        return f"{what}: {answer.status_code} {answer.text}"
    return None


async def _long_poll_woken_by_a_webhook(
    http: httpx.AsyncClient, reader: str, token: str, probes: list[Webhook], log: Path
) -> float:
    """Seconds from a webhook's 202 to the return of a poll parked before it."""
    after = None
    while True:
        params = {"limit": "1000"} | ({"after": after} if after else {})
        page = await http.get("/v1/changes", params=params, headers=bearer(reader))
        assert page.status_code == 200, page.text
        after = page.json()["next"]
        if not page.json()["more"]:
            break

    parked = asyncio.create_task(
        http.get(
            "/v1/changes",
            params={"after": after, "wait": "25"},
            headers=bearer(reader),
            timeout=30,
        )
    )
    await asyncio.sleep(0.5)
    assert not parked.done(), "the poll came back with nothing new to say"
    webhook = _new_item(probes)
    target = str(http.base_url).rstrip("/")
    webhook.attempts.append(await post_once(http, target, webhook.body, token))
    assert webhook.settled, webhook.attempts
    accepted_at = time.monotonic()
    answer = await asyncio.wait_for(parked, 30)
    woken = time.monotonic() - accepted_at
    # The listener wakes it at once; without the listener the feed would
    # look again only after its 30-second fallback.
    assert woken < 5.0, (woken, answer.text, log_tail(log))
    assert answer.status_code == 200, answer.text
    changed = {change["order_id"] for change in answer.json()["changes"]}
    assert webhook.order_id in changed
    return woken


async def _runner_catches_up(pool: asyncpg.Pool, log: Path) -> float:
    """Seconds until the served version's checkpoint reaches the head of the log."""
    await settle(pool)

    try:
        return await until(
            lambda: runner_at_head(pool), "the runner reaching the head", within=20
        )
    except pytest.fail.Exception:
        pytest.fail(f"the runner did not catch up: {log_tail(log)}")


async def _assert_view_is_the_fold(pool: asyncpg.Pool) -> None:
    served = await served_version(pool)
    async with pool.acquire() as connection:
        projection = await projection_for(connection, served.version)
        expected = await scratch_fold(connection, projection)
        actual = await rows_of(connection, served.table_name)
    assert differing(actual, expected) == []
