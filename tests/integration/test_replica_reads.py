"""Reads from a streaming replica (``ORDERTRAIL_READ_DATABASE_URL``).

A primary and a hot standby run from the server binaries (tests/clusters.py),
and ``ordertrail serve`` runs against both. The tests prove that every read
endpoint answers from the replica and every write goes to the primary, that
a long poll parked before a webhook is woken once the replica replays it
(even when that takes longer than the feed head's horizon retries), and that
a 202 implies the replica shows the webhook exactly when the primary commits
with ``synchronous_commit = remote_apply`` and names the replica synchronous.

The replica is made slow on purpose with ``recovery_min_apply_delay``, so the
race between a webhook's acknowledgement and its replay is always lost by the
replica, not only on a busy machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from ordertrail.db.connection import connect
from ordertrail.db.migrate import apply_migrations
from tests.clusters import Cluster, skip_unless_runnable, throwaway_cluster
from tests.integration.helpers import TOKEN_HEADER
from tests.integration.projection_support import Service, environment, free_port
from tests.support import UPC, WEBHOOK_PATH, bearer, new_order_id, webhook_body

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    skip_unless_runnable("pg_basebackup", "psql"),
]

DATABASE = "ordertrail"
REPLICA = "replica"
"""The standby's name: its cluster_name, which it streams under."""
OTHER_UPC = "601842495582"
SLOW_APPLY = 3.0
"""Seconds the replica holds each commit back in the long-poll test: longer
than the feed head's horizon retries (about 1.9 s in all)."""


@dataclass
class Replicated:
    """A primary, its replica, and ``ordertrail serve`` reading from the replica."""

    primary: Cluster
    replica: Cluster
    http: httpx.AsyncClient
    service_log: Path
    token: str
    reader: str
    auditor: str

    async def catch_up(self) -> None:
        """Wait until the replica shows everything committed on the primary."""
        await asyncio.to_thread(self.replica.catch_up, self.primary)


@contextlib.asynccontextmanager
async def serving(variables: dict[str, str], log: Path) -> AsyncIterator[Service]:
    """``ordertrail serve`` in a group of its own, logging to ``log``."""
    port = free_port()
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ordertrail",
            "serve",
            env=environment(
                variables["ORDERTRAIL_DATABASE_URL"],
                ORDERTRAIL_PORT=str(port),
                **variables,
            ),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    service = Service(process, f"http://127.0.0.1:{port}")
    try:
        await _until_ready(service, log)
        yield service
    finally:
        await service.stop()


async def _until_ready(service: Service, log: Path) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        while time.monotonic() < deadline:
            if service.process.returncode is not None:
                pytest.fail(f"the service exited: {_tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/health/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    pytest.fail(f"the service did not become ready: {_tail(log)}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def _credentials(url: str) -> tuple[str, str, str]:
    connection = await connect(url)
    try:
        await apply_migrations(connection)
        token = await create_credential(
            connection, CredentialKind.WEBHOOK_TOKEN, mode="live", label="replica"
        )
        reader = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.READER, label="replica"
        )
        auditor = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.AUDITOR, label="replica"
        )
    finally:
        await connection.close()
    return token.secret, reader.secret, auditor.secret


@pytest.fixture(scope="module")
async def replicated(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Replicated]:
    """A primary and a streaming replica, and the service reading from it."""
    root = tmp_path_factory.mktemp("replica-reads")
    with throwaway_cluster(root) as primary:
        primary.query(f"CREATE DATABASE {DATABASE}")
        replica = await asyncio.to_thread(primary.replica, root, name=REPLICA)
        for cluster in (primary, replica):
            cluster.configure({"log_statement": "'all'", "log_line_prefix": "'%a|'"})
        token, reader, auditor = await _credentials(primary.url(DATABASE))
        log = root / "service.log"
        variables = {
            "ORDERTRAIL_DATABASE_URL": primary.url(DATABASE),
            "ORDERTRAIL_READ_DATABASE_URL": replica.url(DATABASE),
            "ORDERTRAIL_LOG_LEVEL": "info",
            "ORDERTRAIL_KEY_RATE": "0",
            "ORDERTRAIL_FAILURE_RATE": "0",
        }
        async with (
            serving(variables, log) as service,
            httpx.AsyncClient(base_url=service.base_url, timeout=30) as http,
        ):
            yield Replicated(primary, replica, http, log, token, reader, auditor)


# Requests ----------------------------------------------------------------------


async def post(
    replicated: Replicated, order_id: str, *, upc: str = UPC, status: str = "confirmed"
) -> dict[str, Any]:
    """Deliver a webhook; fail unless it is acknowledged."""
    response = await replicated.http.post(
        WEBHOOK_PATH,
        content=webhook_body(order_id, upc=upc, status=status),
        headers={"content-type": "application/json", TOKEN_HEADER: replicated.token},
    )
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def read(
    replicated: Replicated, path: str, *, key: str | None = None, **params: Any
) -> httpx.Response:
    """GET a read endpoint with the reader's key (or ``key``)."""
    return await replicated.http.get(
        path, params=params, headers=bearer(key or replicated.reader)
    )


async def body(
    replicated: Replicated, path: str, *, key: str | None = None, **params: Any
) -> Any:
    """GET a read endpoint; fail unless it answers 200; return its JSON."""
    response = await read(replicated, path, key=key, **params)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


async def health(replicated: Replicated) -> dict[str, Any]:
    """The readiness probe's answer; it stays 200 whatever the replica does."""
    response = await replicated.http.get("/health/ready")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def feed_end(replicated: Replicated) -> str:
    """The change feed's cursor after every change the replica shows now."""
    page = await body(replicated, "/v1/changes", limit=1000)
    while page["more"]:
        page = await body(replicated, "/v1/changes", limit=1000, after=page["next"])
    cursor: str = page["next"]
    return cursor


def changed_items(page: dict[str, Any], order_id: str) -> dict[str, str]:
    """UPC to state of ``order_id``'s items on a change feed page."""
    return {
        change["upc"]: change["state"]
        for change in page["changes"]
        if change["order_id"] == order_id
    }


# What the servers saw ---------------------------------------------------------


def statements(cluster: Cluster, since: int) -> list[str]:
    """The service's statements the server logged since byte ``since``.

    The fixture has both servers log every statement, prefixed by the
    client's application name.
    """
    entries: list[str] = []
    for line in cluster.log_since(since).splitlines():
        if line.startswith((" ", "\t")) and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append(line)
    return [
        entry
        for entry in entries
        if entry.startswith("ordertrail|LOG:  ")
        and ("execute" in entry or "statement:" in entry)
    ]


def complaints(replicated: Replicated, since: tuple[int, int]) -> list[str]:
    """Errors the replica returned and warnings the service logged, since then.

    A statement only a primary can run (a write, ``pg_current_xact_id()``)
    fails on the standby with an ERROR in its log.
    """
    replica_since, service_since = since
    refused = [
        line
        for line in replicated.replica.log_since(replica_since).splitlines()
        if "ERROR:" in line
    ]
    with replicated.service_log.open("rb") as file:
        file.seek(service_since)
        lines = file.read().decode().splitlines()
    logged = [
        line
        for line in lines
        if line.startswith("{")
        and msgspec.json.decode(line).get("level") in {"warning", "error", "critical"}
    ]
    return refused + logged


def log_positions(replicated: Replicated) -> tuple[int, int]:
    """Where the replica's and the service's logs end now."""
    return replicated.replica.log_size(), replicated.service_log.stat().st_size


# The tests ---------------------------------------------------------------------


async def primary_rows(replicated: Replicated, sql: str, *args: Any) -> list[Any]:
    """Rows read straight from the primary, to compare answers with."""
    connection = await asyncpg.connect(replicated.primary.url(DATABASE))
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


async def test_every_read_endpoint_answers_from_the_replica(
    replicated: Replicated,
) -> None:
    since = log_positions(replicated)
    order_id = new_order_id()
    ordered = await post(replicated, order_id, status="ordered")
    await post(replicated, order_id, status="confirmed")
    await post(replicated, order_id, upc=OTHER_UPC, status="ordered")
    await replicated.catch_up()
    auditor = replicated.auditor
    reads: dict[str, tuple[str, str | None, dict[str, str], str]] = {
        "item": (f"/v1/orders/{order_id}/items/{UPC}", None, {}, "item_view"),
        "order": (f"/v1/orders/{order_id}", None, {}, "item_view"),
        "listing": ("/v1/items", None, {"order_id": order_id}, "item_view"),
        "changes": ("/v1/changes", None, {"limit": "1000"}, "item_view"),
        "history": (f"/v1/orders/{order_id}/events", auditor, {}, "events"),
        "as_of": (
            f"/v1/orders/{order_id}/items/{UPC}",
            None,
            {"as_of": str(ordered["position"])},
            "events",
        ),
        "export": ("/v1/export", auditor, {}, "events"),
    }

    primary_since = replicated.primary.log_size()
    answers: dict[str, httpx.Response] = {}
    for name, (path, key, params, relation) in reads.items():
        replica_since = replicated.replica.log_size()
        answers[name] = await read(replicated, path, key=key, **params)
        assert answers[name].status_code == 200, (name, answers[name].text)
        queried = statements(replicated.replica, replica_since)
        assert any(relation in statement for statement in queried), (name, queried)
    # The primary only told the export where the settled range ends.
    on_primary = statements(replicated.primary, primary_since)
    assert not [s for s in on_primary if re.search(r"\bitem_view\b", s)], on_primary

    # The answers are the primary's state, as the replica shows it.
    item, order, listing, page, history, past = (
        answers[name].json()
        for name in ("item", "order", "listing", "changes", "history", "as_of")
    )
    (row,) = await primary_rows(
        replicated,
        "SELECT state, version, position FROM item_view WHERE order_id = $1 "
        "AND upc = $2",
        order_id,
        UPC,
    )
    assert (item["state"], item["version"], item["position"]) == tuple(row)
    assert item["state"] == "confirmed"
    assert sorted(i["upc"] for i in order["items"]) == sorted([UPC, OTHER_UPC])
    assert sorted(i["upc"] for i in listing["items"]) == sorted([UPC, OTHER_UPC])
    assert changed_items(page, order_id) == {UPC: "confirmed", OTHER_UPC: "ordered"}
    events = await primary_rows(
        replicated, "SELECT position FROM events WHERE order_id = $1", order_id
    )
    assert sorted(e["position"] for e in history["events"]) == sorted(
        e["position"] for e in events
    )
    assert past["state"] == "ordered"
    assert past["as_of_position"] == ordered["position"]
    summary = msgspec.json.decode(answers["export"].content.splitlines()[-1])
    (everything,) = await primary_rows(replicated, "SELECT count(*) FROM events")
    assert summary["summary"]["count"] == everything[0]

    ready = await health(replicated)
    assert (ready["status"], ready["replica"]) == ("ready", "ok")
    assert ready["read_your_writes"] is False
    assert ready["replica_lag_bytes"] >= 0
    assert complaints(replicated, since) == []


async def test_without_the_replica_reads_fail_and_webhooks_are_taken(
    replicated: Replicated,
) -> None:
    order_id = new_order_id()
    await post(replicated, order_id, status="ordered")
    await post(replicated, order_id, upc=OTHER_UPC, status="ordered")
    await replicated.catch_up()
    assert (await read(replicated, f"/v1/orders/{order_id}")).status_code == 200

    await asyncio.to_thread(replicated.replica.stop)
    try:
        during = await post(replicated, order_id, upc=OTHER_UPC, status="confirmed")
        for path, key, params in [
            (f"/v1/orders/{order_id}/items/{UPC}", None, {}),
            (f"/v1/orders/{order_id}", None, {}),
            ("/v1/items", None, {"order_id": order_id}),
            ("/v1/changes", None, {}),
            (f"/v1/orders/{order_id}/events", replicated.auditor, {}),
            (f"/v1/orders/{order_id}", None, {"as_of": "1"}),
            ("/v1/export", replicated.auditor, {}),
        ]:
            response = await read(replicated, path, key=key, **params)
            assert response.status_code >= 500, (path, response.status_code)
        down = await health(replicated)
        assert (down["status"], down["replica"]) == ("degraded", "unreachable")
    finally:
        await asyncio.to_thread(replicated.replica.start)

    # Back, the replica streams what the primary took meanwhile.
    deadline = time.monotonic() + 20
    while True:
        response = await read(replicated, f"/v1/orders/{order_id}/items/{OTHER_UPC}")
        if response.status_code == 200 and response.json()["state"] == "confirmed":
            break
        assert time.monotonic() < deadline, response.text
        await asyncio.sleep(0.1)
    assert response.json()["position"] == during["position"]


async def test_a_long_poll_is_woken_once_the_replica_replays_the_change(
    replicated: Replicated,
) -> None:
    since = log_positions(replicated)
    await replicated.catch_up()
    cursor = await feed_end(replicated)
    order_id = new_order_id()
    await asyncio.to_thread(
        replicated.replica.configure,
        {"recovery_min_apply_delay": f"'{SLOW_APPLY:g}s'"},
    )
    try:
        poll = asyncio.create_task(
            read(replicated, "/v1/changes", after=cursor, wait=20)
        )
        await asyncio.sleep(0.5)
        assert not poll.done()

        sent = time.monotonic()
        await post(replicated, order_id)
        # The notification is out, the replica does not show the change yet.
        missing = await read(replicated, f"/v1/orders/{order_id}/items/{UPC}")
        assert missing.status_code == 404

        answer = await asyncio.wait_for(poll, 20)
        woken_after = time.monotonic() - sent
    finally:
        await asyncio.to_thread(
            replicated.replica.configure, {"recovery_min_apply_delay": "0"}
        )

    assert answer.status_code == 200, answer.text
    assert changed_items(answer.json(), order_id) == {UPC: "confirmed"}
    # Woken by the replay itself: later than the horizon retries last, long
    # before the poll's own 20 s (or the feed's periodic look) would end it.
    assert SLOW_APPLY - 0.5 < woken_after < SLOW_APPLY + 5, woken_after
    assert complaints(replicated, since) == []


async def test_a_202_implies_the_replica_shows_the_webhook_with_remote_apply(
    replicated: Replicated,
) -> None:
    since = log_positions(replicated)
    primary, replica = replicated.primary, replicated.replica
    await replicated.catch_up()
    await asyncio.to_thread(replica.configure, {"recovery_min_apply_delay": "'1s'"})
    try:
        # Asynchronous: the acknowledgement runs ahead of the replica.
        late = new_order_id()
        await post(replicated, late)
        missing = await read(replicated, f"/v1/orders/{late}/items/{UPC}")
        assert missing.status_code == 404
        lagging = await health(replicated)
        assert lagging["read_your_writes"] is False
        assert lagging["replica_lag_bytes"] > 0

        await asyncio.to_thread(
            primary.configure,
            {
                "synchronous_standby_names": f"'{REPLICA}'",
                "synchronous_commit": "remote_apply",
            },
        )
        await until_synchronous(primary)
        assert (await health(replicated))["read_your_writes"] is True

        for _ in range(3):
            cursor = await feed_end(replicated)
            order_id = new_order_id()
            started = time.monotonic()
            accepted = await post(replicated, order_id, status="ordered")
            # The commit waited for the replica to apply it.
            assert time.monotonic() - started > 0.8
            item = await body(replicated, f"/v1/orders/{order_id}/items/{UPC}")
            page = await body(replicated, "/v1/changes", after=cursor)
            assert (item["state"], item["position"]) == (
                "ordered",
                accepted["position"],
            )
            assert changed_items(page, order_id) == {UPC: "ordered"}
    finally:
        await asyncio.to_thread(
            primary.configure,
            {"synchronous_standby_names": "''", "synchronous_commit": "on"},
        )
        await asyncio.to_thread(replica.configure, {"recovery_min_apply_delay": "0"})
    assert complaints(replicated, since) == []


async def until_synchronous(primary: Cluster) -> None:
    """Wait until the primary treats the replica as its synchronous standby."""
    deadline = time.monotonic() + 10
    query = (
        "SELECT sync_state FROM pg_stat_replication "
        f"WHERE application_name = '{REPLICA}'"
    )
    while await asyncio.to_thread(primary.query, query) != "sync":
        assert time.monotonic() < deadline, "the replica never became synchronous"
        await asyncio.sleep(0.05)
