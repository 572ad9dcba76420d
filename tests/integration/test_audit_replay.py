"""``ordertrail replay``: an order event by event, with what each one did."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import msgspec
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.integration.helpers import post_webhook
from tests.support import webhook_body

UPC_A = "601842495575"
UPC_B = "601842495582"


async def deliver(
    client: AsyncTestClient[Litestar], token: str, order_id: str, upc: str, status: str
) -> int:
    answer = await post_webhook(
        client, webhook_body(order_id, upc=upc, status=status), token
    )
    assert answer.status_code == 202, answer.text
    return int(answer.json()["position"])


async def eventful_order(
    client: AsyncTestClient[Litestar], token: str, order_id: str
) -> list[int]:
    """An order with an anomaly, an unrecognized status and a redelivery."""
    return [
        await deliver(client, token, order_id, UPC_A, "ordered"),
        await deliver(client, token, order_id, UPC_A, "confirmed"),
        # Another alias of "ordered": a late report, not a redelivery.
        await deliver(client, token, order_id, UPC_A, "order placed"),
        await deliver(client, token, order_id, UPC_B, "awaiting carrier pigeon"),
        await deliver(client, token, order_id, UPC_A, "confirmed"),
        await deliver(client, token, order_id, UPC_B, "cancelled"),
    ]


async def replay(database_url: str, *args: str) -> tuple[int, str, str]:
    environment = {**os.environ, "ORDERTRAIL_DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordertrail",
        "replay",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def steps(out: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in out.splitlines()]


async def test_each_event_shows_its_meaning_and_the_item_after_it(
    client: AsyncTestClient[Litestar], live_token: str, database_url: str, order_id: str
) -> None:
    positions = await eventful_order(client, live_token, order_id)

    code, out, _ = await replay(database_url, order_id, "--json")
    rows = steps(out)

    assert code == 0
    assert [row["position"] for row in rows] == positions
    assert [
        (row["upc"], row["raw_status"], row["meaning"], row["state"]) for row in rows
    ] == [
        (UPC_A, "ordered", "ordered", "ordered"),
        (UPC_A, "confirmed", "confirmed", "confirmed"),
        (UPC_A, "order placed", "ordered", "confirmed"),
        (UPC_B, "awaiting carrier pigeon", None, "new"),
        (UPC_A, "confirmed", "confirmed", "confirmed"),
        (UPC_B, "cancelled", "cancelled", "cancelled"),
    ]
    assert rows[2]["anomalies"] == ["out_of_order"]
    assert rows[3]["unrecognized"] is True
    assert rows[4]["redelivery_of"] == positions[1]
    assert all(row["tampering"] == [] for row in rows)


async def test_the_table_marks_anomalies_and_redeliveries(
    client: AsyncTestClient[Litestar], live_token: str, database_url: str, order_id: str
) -> None:
    positions = await eventful_order(client, live_token, order_id)

    code, out, _ = await replay(database_url, order_id)

    assert code == 0
    assert f"live order {order_id}" in out
    assert "anomaly: out_of_order" in out
    assert "unrecognized status" in out
    assert f"of {positions[1]}" in out
    assert "order state: confirmed" in out


async def test_one_item_as_of_a_position(
    client: AsyncTestClient[Litestar], live_token: str, database_url: str, order_id: str
) -> None:
    positions = await eventful_order(client, live_token, order_id)

    code, out, _ = await replay(
        database_url, order_id, "--upc", UPC_A, "--as-of", str(positions[2]), "--json"
    )

    assert code == 0
    assert [row["position"] for row in steps(out)] == positions[:3]


async def test_an_unknown_order_or_a_bad_as_of_fails(
    database_url: str, order_id: str
) -> None:
    unknown = await replay(database_url, order_id)
    unreadable = await replay(database_url, order_id, "--as-of", "last tuesday")

    assert unknown[0] == 1
    assert f"no live events for order {order_id}" in unknown[2]
    assert unreadable[0] == 2
    assert "RFC 3339" in unreadable[2]
