"""Exports over HTTP and from the command line, checked offline afterwards."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.audit.verify_export import verify_export
from ordertrail.db.connection import connect
from ordertrail.eventstore.store import EventStore
from tests.integration.helpers import post_webhook
from tests.support import bearer, delivery, webhook_body

UPCS = ("601842495575", "601842495582")


async def deliver_order(
    client: AsyncTestClient[Litestar], token: str, order_id: str
) -> list[tuple[int, bytes]]:
    """Three statuses for two items; return each (position, body)."""
    sent = []
    for status in ("ordered", "confirmed", "picked up"):
        for upc in UPCS:
            body = webhook_body(order_id, upc=upc, status=status)
            answer = await post_webhook(client, body, token)
            assert answer.status_code == 202, answer.text
            sent.append((int(answer.json()["position"]), body))
    return sent


def parse(
    content: bytes,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    lines = [msgspec.json.decode(line) for line in content.splitlines()]
    header, *events, summary = lines
    return header["export"], events, summary["summary"]


async def test_an_auditor_exports_a_range_as_ndjson(
    client: AsyncTestClient[Litestar],
    live_token: str,
    auditor_key: str,
    order_id: str,
) -> None:
    sent = await deliver_order(client, live_token, order_id)
    first, last = sent[0][0], sent[-1][0]

    answer = await client.get(
        "/v1/export",
        headers=bearer(auditor_key),
        params={"from_position": first, "to_position": last, "mode": "live"},
    )
    header, events, summary = parse(answer.content)
    mine = [event for event in events if event["order_id"] == order_id]

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in answer.headers["content-disposition"]
    assert (header["from_position"], header["to_position"]) == (first, last)
    assert [(e["position"], base64.b64decode(e["raw_body"])) for e in mine] == sent
    assert [e["position"] for e in events] == sorted(e["position"] for e in events)
    assert set(mine[0]) >= {
        "transaction_id",
        "request_id",
        "client_address",
        "token_id",
        "idempotency_key",
        "redelivery_of",
        "body_sha256",
        "previous_hash",
        "hash",
    }
    assert summary["count"] == len(events)
    assert (summary["first_position"], summary["last_position"]) == (first, last)
    heads = {tuple(head[:3]): head[3] for head in summary["heads"]}
    assert heads[("live", order_id, UPCS[0])] == 3


async def test_an_export_over_http_verifies_offline(
    client: AsyncTestClient[Litestar],
    live_token: str,
    admin_key: str,
    order_id: str,
    tmp_path: Path,
) -> None:
    sent = await deliver_order(client, live_token, order_id)
    path = tmp_path / "export.ndjson"

    answer = await client.get(
        "/v1/export",
        headers=bearer(admin_key),
        params={"from_position": sent[0][0], "to_position": sent[-1][0]},
    )
    path.write_bytes(answer.content)
    result = verify_export(path)

    assert answer.status_code == 200
    assert result.clean, [f.describe() for f in result.findings]
    assert result.events >= len(sent)


async def test_the_end_of_the_range_is_at_most_the_settled_position(
    client: AsyncTestClient[Litestar],
    live_token: str,
    auditor_key: str,
    order_id: str,
) -> None:
    sent = await deliver_order(client, live_token, order_id)

    answer = await client.get(
        "/v1/export",
        headers=bearer(auditor_key),
        params={"from_position": sent[-1][0], "to_position": 2**62},
    )
    header, events, summary = parse(answer.content)

    assert sent[-1][0] <= header["to_position"] < 2**62
    assert events[0]["position"] == sent[-1][0]
    assert summary["to_position"] == header["to_position"]


async def test_one_mode_only(
    client: AsyncTestClient[Litestar],
    live_token: str,
    test_token: str,
    auditor_key: str,
    order_id: str,
) -> None:
    live = await deliver_order(client, live_token, order_id)
    test = await deliver_order(client, test_token, order_id)

    answer = await client.get(
        "/v1/export",
        headers=bearer(auditor_key),
        params={
            "from_position": live[0][0],
            "to_position": test[-1][0],
            "mode": "test",
        },
    )
    _, events, summary = parse(answer.content)

    assert {event["mode"] for event in events} == {"test"}
    assert [e["position"] for e in events if e["order_id"] == order_id] == [
        position for position, _ in test
    ]
    assert {head[0] for head in summary["heads"]} == {"test"}


async def test_readers_and_strangers_cannot_export(
    client: AsyncTestClient[Litestar], reader_key: str
) -> None:
    reader = await client.get("/v1/export", headers=bearer(reader_key))
    stranger = await client.get("/v1/export")

    assert reader.status_code == 403
    assert stranger.status_code == 401


async def test_bad_bounds_are_bad_requests(
    client: AsyncTestClient[Litestar], auditor_key: str
) -> None:
    for params in ({"from_position": "0"}, {"to_position": "x"}, {"mode": "both"}):
        answer = await client.get(
            "/v1/export", headers=bearer(auditor_key), params=params
        )
        assert answer.status_code == 400, params


async def run_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    environment = {**os.environ, "ORDERTRAIL_DATABASE_URL": database_url}
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


async def test_the_export_command_writes_a_file_that_verifies(
    client: AsyncTestClient[Litestar],
    live_token: str,
    database_url: str,
    order_id: str,
    tmp_path: Path,
) -> None:
    sent = await deliver_order(client, live_token, order_id)
    path = tmp_path / "export.ndjson"

    exported = await run_cli(
        database_url,
        "export",
        "--from-position",
        str(sent[0][0]),
        "--to-position",
        str(sent[-1][0]),
        "-o",
        str(path),
    )
    checked = await run_cli(database_url, "audit", "verify-export", str(path))

    assert exported[0] == 0, exported[2]
    assert f"positions {sent[0][0]} to {sent[-1][0]}" in exported[2]
    assert not (tmp_path / "export.ndjson.partial").exists()
    assert checked[0] == 0, checked[1]
    assert checked[1].rstrip().endswith("clean")


async def test_a_tampered_export_file_fails_with_the_line_named(
    client: AsyncTestClient[Litestar],
    live_token: str,
    database_url: str,
    order_id: str,
    tmp_path: Path,
) -> None:
    sent = await deliver_order(client, live_token, order_id)
    path = tmp_path / "export.ndjson"
    await run_cli(
        database_url,
        "export",
        "--mode",
        "live",
        "--from-position",
        str(sent[0][0]),
        "--to-position",
        str(sent[-1][0]),
        "-o",
        str(path),
    )
    lines = path.read_bytes().splitlines(keepends=True)
    number, line = next(
        (n, text)
        for n, text in enumerate(lines, start=1)
        if b'"picked up"'
        in base64.b64decode(msgspec.json.decode(text).get("raw_body", ""))
    )
    event = msgspec.json.decode(line)
    event["raw_status"] = "refunded"
    lines[number - 1] = msgspec.json.encode(event) + b"\n"
    path.write_bytes(b"".join(lines))

    code, out, _ = await run_cli(database_url, "audit", "verify-export", str(path))

    assert code == 1
    assert out.startswith(f"content_changed: live order {order_id}")
    assert f"line {number}" in out.splitlines()[0]


async def test_the_export_command_writes_to_standard_output(
    client: AsyncTestClient[Litestar],
    live_token: str,
    database_url: str,
    order_id: str,
) -> None:
    sent = await deliver_order(client, live_token, order_id)

    code, out, _ = await run_cli(
        database_url,
        "export",
        "--from-position",
        str(sent[0][0]),
        "--to-position",
        str(sent[0][0]),
    )
    _, events, summary = parse(out.encode())

    assert code == 0
    assert [event["position"] for event in events] == [sent[0][0]]
    assert summary["count"] == 1


async def test_an_export_waits_for_appends_in_flight_then_gives_up(
    client: AsyncTestClient[Litestar],
    auditor_key: str,
    database_url: str,
    order_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("ordertrail.api.audit._SETTLE_WITHIN", 0.2)
    writer = await connect(database_url)
    try:
        transaction = writer.transaction()
        await transaction.start()
        await EventStore().append(writer, [delivery(order_id)])
        answer = await client.get("/v1/export", headers=bearer(auditor_key))
        # Rolled back: an event appended without its projection would be
        # left for the projection tests to find.
        await transaction.rollback()
    finally:
        await writer.close()

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["type"] == "urn:ordertrail:problem:log-not-settled"
