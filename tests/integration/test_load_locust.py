"""A Locust load of webhooks and polls, then the log held against its answers.

Locust runs ``tests/load/locustfile.py`` in a process of its own (it patches
the standard library with gevent's) against ``ordertrail serve`` on a
database of the test's own, for a fixed time. Then:

- Locust counted no failure: every webhook got the 202 it should (its
  stream, version and redelivery flag), no poll saw an item go back, and no
  read right after a 202 missed it;
- every 202 is one event, as answered, and no event went unanswered;
- each retry is the redelivery of the delivery it repeats;
- each item's row in the view is at its last acknowledged version and
  equals a fresh fold of the log;
- ``ordertrail audit verify`` finds every hash chain whole.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from ordertrail.eventstore.records import RecordedEvent, StreamKey
from ordertrail.projections.items import ItemView
from tests.integration.projection_support import (
    OwnDatabase,
    assert_verified,
    differing,
    end_state,
    kill_group,
    ordertrail,
    running_service,
    settle,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LOCUSTFILE = Path(__file__).parents[1] / "load" / "locustfile.py"
USERS = 32
RUN_SECONDS = 15
STOP_SECONDS = 15
"""How long a user may take to finish its cart item once the time is up."""


@dataclass(frozen=True)
class Acknowledged:
    """A 202 as the locustfile recorded it."""

    stream: StreamKey
    position: int
    version: int
    redelivery_of: int | None
    body: bytes
    retry: bool


async def test_a_locust_load_leaves_exactly_what_was_acknowledged(
    own: OwnDatabase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = secrets.token_urlsafe(24)
    async with own.pool.acquire() as connection:
        reader = await create_credential(
            connection, CredentialKind.API_KEY, role=Role.READER, label="locust"
        )
    settings = {
        "ORDERTRAIL_WEBHOOK_TOKEN_LIVE": token,
        # Every poller shares one key; the per-key limit has tests of its own.
        "ORDERTRAIL_KEY_RATE": "0",
    }
    async with running_service(own.url, **settings) as service:
        await run_locust(service.base_url, token, reader.secret, tmp_path)
        await settle(own.pool)

    log, _, view, fold = await end_state(own.pool)
    verified = await ordertrail(own.url, "audit", "verify", "--json")
    acknowledged = read_record(tmp_path / "acknowledged.jsonl")
    stats = read_stats(tmp_path / "locust_stats.csv")
    with capsys.disabled():
        print(
            f"\nlocust: {stats['Aggregated'][0]:,} requests, "
            f"{stats['Aggregated'][1]:,} failures; {len(acknowledged):,} webhooks "
            f"acknowledged ({sum(a.retry for a in acknowledged):,} retries), "
            f"{len(log):,} events, {len(view):,} items"
        )

    assert stats["Aggregated"][1] == 0
    assert stats["/webhooks/locally"][0] > 0
    assert stats["/v1/orders/[order_id]/items/[upc]"][0] > 0
    check_acknowledged(acknowledged, log)
    check_redeliveries(acknowledged)
    check_view(acknowledged, view)
    assert differing(view, fold) == []
    assert_verified(verified, len(log))


async def run_locust(base_url: str, token: str, api_key: str, into: Path) -> None:
    """Run the locustfile headless for ``RUN_SECONDS``; fail on a failure."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust",
        "--locustfile", str(LOCUSTFILE),
        "--headless",
        "--host", base_url,
        "--users", str(USERS),
        "--spawn-rate", str(USERS),
        "--run-time", f"{RUN_SECONDS}s",
        "--stop-timeout", str(STOP_SECONDS),
        "--csv", str(into / "locust"),
        "--only-summary",
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("ORDERTRAIL_")},
            "ORDERTRAIL_LOCUST_TOKEN": token,
            "ORDERTRAIL_LOCUST_API_KEY": api_key,
            "ORDERTRAIL_LOCUST_RECORD": str(into / "acknowledged.jsonl"),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(
            process.communicate(), RUN_SECONDS + STOP_SECONDS + 60
        )
    except TimeoutError:
        kill_group(process.pid)
        await process.wait()
        raise
    failures = into / "locust_failures.csv"
    assert process.returncode == 0, output.decode(errors="replace")[-4000:] + (
        failures.read_text() if failures.exists() else ""
    )


def read_record(path: Path) -> list[Acknowledged]:
    """The 202s the locustfile recorded, in the order they came."""
    acknowledged = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        answer = entry["answer"]
        acknowledged.append(
            Acknowledged(
                stream=StreamKey("live", answer["order_id"], answer["upc"]),
                position=answer["position"],
                version=answer["version"],
                redelivery_of=answer["redelivery_of"],
                body=entry["body"].encode(),
                retry=entry["retry"],
            )
        )
    return acknowledged


def read_stats(path: Path) -> dict[str, tuple[int, int]]:
    """Requests and failures by request name, as Locust counted them."""
    with path.open(newline="") as file:
        return {
            row["Name"]: (int(row["Request Count"]), int(row["Failure Count"]))
            for row in csv.DictReader(file)
        }


def check_acknowledged(
    acknowledged: list[Acknowledged], log: list[RecordedEvent]
) -> None:
    """Every 202 is one event, as answered; no event went unanswered."""
    by_position = {event.position: event for event in log}
    positions = [a.position for a in acknowledged]
    assert len(positions) == len(set(positions)), "two 202s named one position"
    assert set(positions) == set(by_position), "202s and events differ"
    for answer in acknowledged:
        event = by_position[answer.position]
        assert (event.stream, event.version) == (answer.stream, answer.version)
        assert event.raw_body == answer.body
        assert event.redelivery_of == answer.redelivery_of


def check_redeliveries(acknowledged: list[Acknowledged]) -> None:
    """A retry repeats the delivery just before it in its stream; nothing else does."""
    previous: dict[StreamKey, Acknowledged] = {}
    for answer in sorted(acknowledged, key=lambda a: (a.stream, a.version)):
        if answer.retry:
            original = previous[answer.stream]
            assert (answer.redelivery_of, answer.body) == (
                original.position,
                original.body,
            )
        else:
            assert answer.redelivery_of is None
        previous[answer.stream] = answer


def check_view(
    acknowledged: list[Acknowledged], view: dict[StreamKey, ItemView]
) -> None:
    """Each item's row is at its last 202's version, with its retries counted."""
    last: dict[StreamKey, int] = {}
    retries: collections.Counter[StreamKey] = collections.Counter()
    for answer in acknowledged:
        last[answer.stream] = max(last.get(answer.stream, 0), answer.version)
        retries[answer.stream] += answer.retry
    assert set(last) == set(view)
    for stream, version in last.items():
        assert (view[stream].version, view[stream].redelivery_count) == (
            version,
            retries[stream],
        ), stream
