"""Order ids and UPCs made to break SQL, patterns, terminals and encodings.

Quotes, backslashes, semicolons, comments, ``'; DROP TABLE events; --``,
LIKE wildcards, right-to-left overrides, emoji with modifiers and joiners,
combining marks, full-width letters, invisible characters and the longest
values allowed go in through the webhook and come back out of every endpoint
and command that takes them, byte for byte: SQL is built from constants and
every value travels as a parameter. What no stored text can hold (a NUL, a
string that is not UTF-8, a number past PostgreSQL's bigint) gets a clear 4xx
or usage error, or is kept in quarantine; never a 500 or a traceback. And the
tables are all there afterwards, holding what they held plus what was sent.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.cursors import encode_cursor
from ordertrail.auth.credentials import CredentialKind, Role, create_credential
from tests.integration.api_support import issue, problem, running_app
from tests.integration.fault_support import serving
from tests.integration.helpers import post_webhook, quarantined_by_request
from tests.integration.projection_support import (
    Completed,
    differing,
    ordertrail,
    own_database,
    rows_of,
    served_version,
    view_source,
)
from tests.support import bearer, new_order_id, webhook_body

LONGEST = 256
"""The longest order id, UPC or status a webhook may carry."""

HOSTILE = [
    "'",
    '"',
    "\\",
    "\\'",
    "''",
    "';",
    "--",
    "/*",
    "*/ x",
    "'; DROP TABLE events; --",
    '"; DROP TABLE events; --',
    "1' OR '1'='1",
    "x'); DELETE FROM credentials; --",
    "$1",
    "$$ $tag$",
    "E'\\x41'",
    "U&'\\0041'",
    ":name",
    "%s",
    "{0}",
    "%",
    "_",
    "%%",
    "%_%",
    "a%b",
    "a_b",
    "\\%",
    "[a-z]*",
    "?",
    "#",
    "&amp;",
    "<script>",
    "..",
    "\u202eevil\u202c",
    "שלום",
    "مرحبا",
    "👍🏽",
    "👩\u200d👩\u200d👧",
    "🏳️\u200d🌈",
    "e\u0301",
    "é",
    "Z\u0351\u0352\u0353\u0354",
    "\uff21\uff22\uff23\uff11\uff12\uff13",
    "\u200b",
    "\ufeff",
    "\u00a0",
    " ",
    " leading",
    "trailing ",
    "tab\there",
    "new\nline",
    "\x01\x1f\x7f",
    "\ufffd",
    "x" * LONGEST,
    "é" * LONGEST,
    "\U0001d518" * LONGEST,
]


def order_id_for(text: str) -> str:
    """An order id no other test uses that holds ``text``, within the limit."""
    unique = new_order_id()
    return unique + text[len(unique) :] if len(text) >= LONGEST else unique + text


def in_path(value: str) -> str:
    return quote(value, safe="")


@dataclass(frozen=True)
class Stored:
    """A delivery accepted with hostile identifiers."""

    order_id: str
    upc: str
    status: str
    body: bytes
    position: int


@dataclass(frozen=True)
class Hostile:
    """The app, its credentials, and what was stored through it."""

    client: AsyncTestClient[Litestar]
    pool: asyncpg.Pool
    key: str
    token: str
    stored: list[Stored]
    tables_before: set[str]
    events_before: int


async def table_names(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    return {row["table_name"] for row in rows}


@pytest.fixture(scope="module")
async def hostile(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Hostile]:
    async with running_app(database_url) as client:
        key = (
            await issue(client, pool, CredentialKind.API_KEY, role=Role.ADMIN)
        ).secret
        token = (
            await issue(client, pool, CredentialKind.WEBHOOK_TOKEN, mode="live")
        ).secret
        tables_before = await table_names(pool)
        events_before = await pool.fetchval("SELECT count(*) FROM events")
        stored = []
        for text in HOSTILE:
            order_id = order_id_for(text)
            body = webhook_body(order_id, upc=text, status=text)
            response = await post_webhook(client, body, token)
            assert response.status_code == 202, (text, response.text)
            position = response.json()["position"]
            stored.append(Stored(order_id, text, text, body, position))
        yield Hostile(client, pool, key, token, stored, tables_before, events_before)


async def get(hostile: Hostile, path: str, **params: Any) -> httpx.Response:
    return await hostile.client.get(path, params=params, headers=bearer(hostile.key))


# Round trips -------------------------------------------------------------------


async def test_hostile_identifiers_are_stored_exactly_as_sent(hostile: Hostile) -> None:
    for sent in hostile.stored:
        row = await hostile.pool.fetchrow(
            "SELECT order_id, upc, raw_status, raw_body FROM events "
            "WHERE position = $1",
            sent.position,
        )
        assert row is not None
        assert row["order_id"] == sent.order_id
        assert row["upc"] == sent.upc
        assert row["raw_status"] == sent.status
        assert row["raw_body"] == sent.body


def routable(sent: Stored) -> bool:
    # A server hands the application the path percent-decoded, and routes
    # split it at "/": an identifier holding one cannot be named in a path.
    # Nor can "..", which clients resolve away (RFC 3986, 5.2.4). Such items
    # are read through the query parameters and the export.
    identifiers = (sent.order_id, sent.upc)
    return not any("/" in i or i in (".", "..") for i in identifiers)


async def test_every_read_endpoint_gives_them_back_byte_for_byte(
    hostile: Hostile,
) -> None:
    for sent in filter(routable, hostile.stored):
        order = f"/v1/orders/{in_path(sent.order_id)}"
        item = f"{order}/items/{in_path(sent.upc)}"

        whole = await get(hostile, order)
        one = await get(hostile, item)
        history = await get(hostile, f"{order}/events")
        listed = await get(hostile, "/v1/items", order_id=sent.order_id)
        then = await get(hostile, item, as_of=str(sent.position))
        earlier = await get(hostile, order, as_of=str(sent.position - 1))

        for response in (whole, one, history, listed, then):
            assert response.status_code == 200, (sent.upc, response.text)
        ((upc, view),) = [(i["upc"], i) for i in whole.json()["items"]]
        assert (whole.json()["order_id"], upc) == (sent.order_id, sent.upc)
        assert (one.json()["order_id"], one.json()["upc"]) == (
            sent.order_id,
            sent.upc,
        )
        assert one.json()["last_status"] == sent.status == view["last_status"]
        (event,) = history.json()["events"]
        assert event["upc"] == sent.upc
        assert event["raw_status"] == sent.status
        assert base64.b64decode(event["raw_body_base64"]) == sent.body
        assert event["raw_body"] == sent.body.decode()
        ((listed_order, listed_upc),) = [
            (i["order_id"], i["upc"]) for i in listed.json()["items"]
        ]
        assert (listed_order, listed_upc) == (sent.order_id, sent.upc)
        assert (then.json()["upc"], then.json()["as_of_position"]) == (
            sent.upc,
            sent.position,
        )
        # Before its one event, the order did not exist.
        assert problem(earlier, 404)["type"].endswith("order-not-found")


async def test_identifiers_with_a_slash_are_read_through_the_query(
    hostile: Hostile,
) -> None:
    slashed = [sent for sent in hostile.stored if not routable(sent)]
    assert slashed
    for sent in slashed:
        listed = await get(hostile, "/v1/items", order_id=sent.order_id)

        assert [(i["order_id"], i["upc"]) for i in listed.json()["items"]] == [
            (sent.order_id, sent.upc)
        ]


async def test_cursors_carry_hostile_keys_from_page_to_page(hostile: Hostile) -> None:
    order_id = new_order_id() + "'; DROP TABLE events; --"
    upcs = ["'", "%", "_", "\\", "👍🏽", "e\u0301", "é", "\u202e"]
    for upc in upcs:
        body = webhook_body(order_id, upc=upc)
        assert (
            await post_webhook(hostile.client, body, hostile.token)
        ).status_code == 202

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(len(upcs) + 1):
        params: dict[str, Any] = {"order_id": order_id, "limit": 1}
        if cursor is not None:
            params["cursor"] = cursor
        page = await get(hostile, "/v1/items", **params)
        assert page.status_code == 200, page.text
        seen += [item["upc"] for item in page.json()["items"]]
        cursor = page.json()["next"]
        if cursor is None:
            break

    assert sorted(seen) == sorted(upcs)
    assert len(seen) == len(set(seen))


async def test_the_change_feed_gives_them_back_exactly(hostile: Hostile) -> None:
    # Walk the feed from its start: every hostile item is there once per
    # page, with its identifiers and status as sent.
    wanted = {(sent.order_id, sent.upc): sent for sent in hostile.stored}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if after is not None:
            params["after"] = after
        page = await get(hostile, "/v1/changes", **params)
        assert page.status_code == 200, page.text
        for change in page.json()["changes"]:
            key = (change["order_id"], change["upc"])
            if key in wanted:
                seen[key] = change
        after = page.json()["next"]
        if not page.json()["more"]:
            break

    assert seen.keys() == wanted.keys()
    for key, change in seen.items():
        assert change["last_status"] == wanted[key].status
        assert change["position"] == wanted[key].position


async def test_like_wildcards_match_only_themselves(hostile: Hostile) -> None:
    base = new_order_id()
    suffixes = ["AB", "A%", "A_", "%", "_", "A\\%", "A\\_"]
    for suffix in suffixes:
        body = webhook_body(base + suffix, upc=suffix)
        assert (
            await post_webhook(hostile.client, body, hostile.token)
        ).status_code == 202

    for suffix in suffixes:
        order_id = base + suffix
        listed = await get(hostile, "/v1/items", order_id=order_id)
        order = await get(hostile, f"/v1/orders/{in_path(order_id)}")
        history = await get(hostile, f"/v1/orders/{in_path(order_id)}/events")

        assert [i["order_id"] for i in listed.json()["items"]] == [order_id]
        assert [i["upc"] for i in order.json()["items"]] == [suffix]
        assert [e["upc"] for e in history.json()["events"]] == [suffix]
    # Nothing matches the pattern that "A_" or "%" would be.
    assert (await get(hostile, f"/v1/orders/{in_path(base + 'A')}")).status_code == 404
    assert (await get(hostile, "/v1/items", order_id=base)).json()["items"] == []


async def test_the_export_holds_them_exactly(hostile: Hostile) -> None:
    first = min(sent.position for sent in hostile.stored)
    last = max(sent.position for sent in hostile.stored)

    response = await get(
        hostile, "/v1/export", from_position=str(first), to_position=str(last)
    )

    assert response.status_code == 200, response.text
    lines = [msgspec.json.decode(line) for line in response.content.splitlines()]
    exported = {line["position"]: line for line in lines if "position" in line}
    for sent in hostile.stored:
        event = exported[sent.position]
        assert (event["order_id"], event["upc"]) == (sent.order_id, sent.upc)
        assert event["raw_status"] == sent.status
        assert base64.b64decode(event["raw_body"]) == sent.body
    assert lines[-1]["summary"]["count"] >= len(hostile.stored)


# What cannot be stored ---------------------------------------------------------


@pytest.mark.parametrize("field", ["order_id", "upc", "status"])
async def test_a_nul_in_an_identifier_is_kept_in_quarantine(
    hostile: Hostile, field: str
) -> None:
    order_id = new_order_id()
    document = {"upc": "1", "order_id": order_id, "status": "confirmed"}
    document[field] = f"{document[field]}\u0000'; DROP TABLE events; --"
    body = msgspec.json.encode(document)

    response = await post_webhook(
        hostile.client,
        body,
        hostile.token,
        headers={"idempotency-key": "'; DROP TABLE quarantine; --"},
    )

    assert problem(response, 422)["type"].endswith("invalid-payload")
    held = await quarantined_by_request(hostile.pool, response.headers["x-request-id"])
    assert held is not None
    assert held["raw_body"] == body
    assert held["idempotency_key"] == "'; DROP TABLE quarantine; --"
    listing = await get(hostile, "/v1/admin/quarantine", limit="1000")
    assert listing.status_code == 200
    (listed,) = [d for d in listing.json()["deliveries"] if d["id"] == held["id"]]
    assert base64.b64decode(listed["raw_body"]) == body
    assert listed["idempotency_key"] == "'; DROP TABLE quarantine; --"


UNSTORABLE_PATHS = [
    "/v1/orders/a%00b",
    "/v1/orders/a%00b/events",
    "/v1/orders/x/items/%00",
    "/v1/orders/%00/items/x",
]


@pytest.mark.parametrize("path", UNSTORABLE_PATHS)
async def test_a_nul_in_a_path_is_a_bad_request(hostile: Hostile, path: str) -> None:
    response = await get(hostile, path)

    assert problem(response, 400)["type"].endswith("invalid-parameter")


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/items", {"order_id": "a\u0000b"}),
        ("/v1/items", {"cursor": encode_cursor("items", "\u0000", "")}),
        ("/v1/items", {"cursor": encode_cursor("items", "x", "\u0000")}),
    ],
    ids=["nul-order-filter", "nul-in-cursor-order", "nul-in-cursor-upc"],
)
async def test_a_value_no_stored_one_can_equal_is_a_bad_request(
    hostile: Hostile, path: str, params: dict[str, str]
) -> None:
    response = await get(hostile, path, **params)

    assert problem(response, 400)["type"].endswith("invalid-parameter")


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("/v1/items", {"cursor": "'; DROP TABLE events; --"}, "cursor"),
        ("/v1/items", {"updated_after": "9999-12-31T23:59:59-23:59"}, "updated_after"),
        ("/v1/items", {"updated_after": "0001-01-01T00:00:00+23:59"}, "updated_after"),
        ("/v1/orders/x", {"as_of": "9999-12-31T23:59:59-23:59"}, "as_of"),
        ("/v1/orders/x/items/y", {"as_of": "0001-01-01T00:00:00+23:59"}, "as_of"),
        ("/v1/items", {"cursor": "%"}, "cursor"),
        ("/v1/items", {"cursor": encode_cursor("changes", 1, 2)}, "cursor"),
        ("/v1/changes", {"after": "' OR 1=1 --"}, "after"),
        ("/v1/changes", {"after": encode_cursor("items", "a", "b")}, "after"),
        ("/v1/orders/x", {"as_of": "1; DROP TABLE events"}, "as_of"),
        ("/v1/orders/x", {"as_of": "' OR '1'='1"}, "as_of"),
        ("/v1/orders/x/items/y", {"as_of": "%"}, "as_of"),
        ("/v1/orders/x/events", {"after": "1 OR 1=1"}, "after"),
        ("/v1/orders/x/events", {"limit": "1; --"}, "limit"),
        ("/v1/items", {"limit": "'"}, "limit"),
        ("/v1/items", {"mode": "live' --"}, "mode"),
        ("/v1/items", {"state": "confirmed' OR 'x'='x"}, "state"),
        ("/v1/export", {"from_position": "1; DROP TABLE events"}, "from_position"),
        ("/v1/export", {"to_position": "99999999999999999999"}, "to_position"),
        ("/v1/admin/quarantine", {"limit": "1;DROP TABLE quarantine"}, "limit"),
        ("/v1/admin/quarantine", {"include_released": "' OR 1=1"}, "include_released"),
    ],
)
async def test_hostile_parameters_are_refused_by_name(
    hostile: Hostile, path: str, params: dict[str, str], parameter: str
) -> None:
    response = await get(hostile, path, **params)

    assert problem(response, 400)["parameter"] == parameter


async def test_identifiers_longer_than_any_stored_one_are_simply_absent(
    hostile: Hostile,
) -> None:
    long = "'; DROP TABLE events; --" * 300
    order = await get(hostile, f"/v1/orders/{in_path(long)}")
    item = await get(hostile, f"/v1/orders/{in_path(long)}/items/{in_path(long)}")
    listed = await get(hostile, "/v1/items", order_id=long)

    assert problem(order, 404)["type"].endswith("order-not-found")
    assert problem(item, 404)["type"].endswith("item-not-found")
    assert listed.json()["items"] == []

    too_long = msgspec.json.encode(
        {"upc": "1", "order_id": "x" * (LONGEST + 1), "status": "confirmed"}
    )
    refused = await post_webhook(hostile.client, too_long, hostile.token)
    assert problem(refused, 422)["type"].endswith("invalid-payload")


async def test_the_tables_are_intact_afterwards(hostile: Hostile) -> None:
    accepted = await hostile.pool.fetchval(
        "SELECT count(*) FROM events WHERE position >= $1",
        min(sent.position for sent in hostile.stored),
    )

    assert await table_names(hostile.pool) == hostile.tables_before
    assert await hostile.pool.fetchval("SELECT count(*) FROM events") == (
        hostile.events_before + accepted
    )
    assert accepted >= len(hostile.stored)
    for table in ("events", "quarantine", "credentials", "projections", "item_view"):
        assert await hostile.pool.fetchval(f"SELECT count(*) FROM {table}") > 0
    assert (await get(hostile, "/health/ready")).status_code == 200


# The command line --------------------------------------------------------------

CLI_ORDER = "'; DROP TABLE events; --%_\\\U0001f44d\U0001f3fd"
CLI_UPCS = ["'", "%", "_", "e\u0301", "\u202eevil"]


@dataclass(frozen=True)
class Operated:
    """A database of its own holding hostile events, for commands to run on."""

    url: str
    pool: asyncpg.Pool
    bodies: dict[str, bytes]
    held: bytes
    held_id: int
    tables_before: set[str]


@contextlib.asynccontextmanager
async def operated_database(server_url: str) -> AsyncIterator[Operated]:
    """A fresh database holding the hostile events, dropped afterwards."""
    async with own_database(server_url) as database:
        async with running_app(database.url) as client:
            token = await issue(
                client, database.pool, CredentialKind.WEBHOOK_TOKEN, mode="live"
            )
            bodies = {}
            for upc in CLI_UPCS:
                bodies[upc] = webhook_body(CLI_ORDER, upc=upc, status=f"{upc}'--")
                answer = await post_webhook(client, bodies[upc], token.secret)
                assert answer.status_code == 202
            held = msgspec.json.encode(
                {"upc": "'", "order_id": "a\u0000'; --", "status": "x"}
            )
            answer = await post_webhook(client, held, token.secret)
            row = await quarantined_by_request(
                database.pool, answer.headers["x-request-id"]
            )
            assert row is not None
        yield Operated(
            database.url,
            database.pool,
            bodies,
            held,
            row["id"],
            await table_names(database.pool),
        )


@pytest.fixture(scope="module")
async def operated(server_url: str) -> AsyncIterator[Operated]:
    # Commands such as `projections skip` change what the service does; they
    # run on a database no other test reads.
    async with operated_database(server_url) as operated:
        yield operated


async def command(operated: Operated, *arguments: str, **variables: str) -> Completed:
    """Run an ``ordertrail`` command; whatever it was given, no traceback."""
    done = await ordertrail(operated.url, *arguments, within=60.0, **variables)
    assert "Traceback" not in done.stderr, (arguments, done.stderr)
    return done


@pytest.mark.slow
async def test_replay_reads_hostile_identifiers_exactly(operated: Operated) -> None:
    replayed = await command(operated, "replay", CLI_ORDER, "--json")
    one = await command(operated, "replay", CLI_ORDER, "--upc", "%", "--json")
    # "_" and "%" are no patterns: a prefix of the order finds nothing.
    prefix = await command(operated, "replay", CLI_ORDER[:5] + "%")

    assert replayed.returncode == 0, replayed.stderr
    steps = replayed.json_lines()
    assert sorted(str(step["upc"]) for step in steps) == sorted(CLI_UPCS)
    assert {step["raw_status"] for step in steps} == {f"{u}'--" for u in CLI_UPCS}
    assert not any(step["tampering"] for step in steps)
    assert [step["upc"] for step in one.json_lines()] == ["%"]
    assert prefix.returncode == 1
    assert "no live events" in prefix.stderr


@pytest.mark.slow
async def test_export_and_verification_read_hostile_identifiers_exactly(
    operated: Operated,
) -> None:
    exported = await command(operated, "export", "--mode", "live")
    verified = await command(
        operated, "audit", "verify", "--order", CLI_ORDER, "--json"
    )
    elsewhere = await command(operated, "audit", "verify", "--order", "' OR '1'='1")

    assert exported.returncode == 0, exported.stderr
    events = {
        str(line["upc"]): line for line in exported.json_lines() if "position" in line
    }
    for upc, body in operated.bodies.items():
        assert events[upc]["order_id"] == CLI_ORDER
        assert base64.b64decode(str(events[upc]["raw_body"])) == body
    assert verified.returncode == 0, verified.stdout
    summary = verified.json_lines()[-1]["summary"]
    assert isinstance(summary, dict)
    assert (summary["events"], summary["streams"]) == (len(CLI_UPCS), len(CLI_UPCS))
    assert elsewhere.returncode == 0
    assert "0 events" in elsewhere.stdout


@pytest.mark.slow
async def test_quarantine_commands_show_and_keep_what_cannot_be_stored(
    operated: Operated,
) -> None:
    shown = await command(operated, "quarantine", "show", str(operated.held_id))
    retried = await command(operated, "quarantine", "retry", str(operated.held_id))

    assert shown.returncode == 0
    assert msgspec.json.decode(shown.stdout)["raw_body_hex"] == operated.held.hex()
    assert retried.returncode == 1
    assert f"{operated.held_id}: kept:" in retried.stdout


@pytest.mark.slow
async def test_projection_and_credential_commands_keep_hostile_text_verbatim(
    operated: Operated,
) -> None:
    reason = "'; DROP TABLE projections; --"
    label = "'); DELETE FROM credentials; --"

    skipped = await command(
        operated, "projections", "skip", "items", "--position", "1", "--reason", reason
    )
    no_such = await command(operated, "projections", "skip", reason, "--position", "1")
    status = await command(operated, "projections", "status", "%")
    labelled = await command(
        operated, "tokens", "create", "--mode", "live", "--label", label
    )
    listed = await command(operated, "tokens", "list", "--json")
    revoked = [
        await command(operated, group, "revoke", "'; DROP TABLE credentials; --")
        for group in ("tokens", "keys")
    ]

    assert skipped.returncode == 0, skipped.stderr
    assert (
        await operated.pool.fetchval(
            "SELECT reason FROM projection_skips WHERE position = 1"
        )
        == reason
    )
    assert no_such.returncode == 1
    assert "no such version" in no_such.stderr
    assert status.returncode == 0
    assert labelled.returncode == 0
    assert label in [line["label"] for line in listed.json_lines()]
    for refused in revoked:
        assert refused.returncode == 1
        assert "'; DROP TABLE credentials; --" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments",
    [
        ("replay", "a\udcffb"),
        ("replay", "x", "--upc", "\udcff"),
        ("replay", "x", "--as-of", "'; DROP TABLE events; --"),
        ("replay", "x", "--as-of", "9999-12-31T23:59:59-23:59"),
        ("audit", "verify", "--order", "\udcfe"),
        ("tokens", "revoke", "\udcff"),
        ("keys", "revoke", "\udcff"),
        ("tokens", "create", "--mode", "live", "--label", "\udcff"),
        ("quarantine", "show", "'; DROP TABLE quarantine; --"),
        ("quarantine", "show", "99999999999999999999"),
        ("quarantine", "retry", "1", "-1"),
        ("quarantine", "list", "--limit", "-1"),
        ("projections", "skip", "--position", "99999999999999999999"),
        ("projections", "skip", "--position", "1", "--reason", "\udcff"),
        ("projections", "retry", "--version", "99999999999"),
        ("export", "--from-position", "99999999999999999999"),
    ],
    ids=[
        "order-not-utf8",
        "upc-not-utf8",
        "as-of-sql",
        "as-of-past-9999",
        "audit-order-not-utf8",
        "token-id-not-utf8",
        "key-id-not-utf8",
        "label-not-utf8",
        "quarantine-id-sql",
        "quarantine-id-past-bigint",
        "quarantine-id-negative",
        "limit-negative",
        "position-past-bigint",
        "reason-not-utf8",
        "version-past-integer",
        "export-from-past-bigint",
    ],
)
async def test_arguments_no_stored_value_can_equal_are_usage_errors(
    operated: Operated, arguments: tuple[str, ...]
) -> None:
    refused = await command(operated, *arguments)

    assert refused.returncode == 2, refused.stderr
    assert "Error: " in refused.stderr


@pytest.mark.slow
async def test_send_test_posts_hostile_identifiers_that_are_stored_exactly(
    server_url: str, tmp_path: Path
) -> None:
    upc = "'; --%_\u202e"
    statuses = ["ordered", "confirmed'; --"]
    async with own_database(server_url) as database:
        async with database.pool.acquire() as connection:
            token = await create_credential(
                connection, CredentialKind.WEBHOOK_TOKEN, mode="live"
            )
        async with serving(database.url, tmp_path / "serve.log") as service:
            sent = await ordertrail(
                database.url,
                "send-test",
                "--url",
                f"{service.base_url}/webhooks/locally",
                "--token",
                token.secret,
                "--order-id",
                CLI_ORDER,
                "--upc",
                upc,
                *(argument for status in statuses for argument in ("--status", status)),
                within=60.0,
            )
        stored = await database.pool.fetch(
            "SELECT order_id, upc, raw_status FROM events ORDER BY position"
        )

    assert sent.returncode == 0, sent.stderr
    assert [tuple(row) for row in stored] == [(CLI_ORDER, upc, s) for s in statuses]
    assert sent.stdout.count("  202  ") == len(statuses)
    assert token.secret not in sent.stdout + sent.stderr


AUDIT_KEY = "'; DROP TABLE audit_checkpoints; --%_\\\u202e\U0001f44d\U0001f3fd"
"""A key long enough to sign with, itself full of what breaks quoting."""
SIGNED = {"ORDERTRAIL_AUDIT_KEY": AUDIT_KEY}


@pytest.mark.slow
async def test_a_checkpoint_signs_hostile_streams_and_their_export_verifies_against_it(
    operated: Operated, tmp_path: Path
) -> None:
    recorded = await command(operated, "audit", "checkpoint", **SIGNED)
    nothing_new = await command(operated, "audit", "checkpoint", **SIGNED)
    listed = await command(operated, "audit", "checkpoints", "--json")
    (checkpoint,) = listed.json_lines()
    path = tmp_path / "export.ndjson"
    # Both modes from position 1 to the checkpoint's: the range whose heads
    # the checkpoint's digest covers.
    exported = await command(
        operated,
        "export",
        "--to-position",
        str(checkpoint["position"]),
        "-o",
        str(path),
    )
    checked = await command(
        operated,
        "audit",
        "verify-export",
        str(path),
        "--expect-digest",
        str(checkpoint["digest"]),
        "--json",
    )
    verified = await command(operated, "audit", "verify", "--json", **SIGNED)
    heads = await operated.pool.fetch(
        "SELECT order_id, upc FROM audit_checkpoint_heads WHERE checkpoint_id = $1",
        checkpoint["id"],
    )

    assert recorded.returncode == 0, recorded.stderr
    assert recorded.stdout == (
        f"checkpoint {checkpoint['id']} at position {checkpoint['position']}: "
        f"{len(CLI_UPCS)} streams, digest {checkpoint['digest']}, "
        f"key {checkpoint['key_id']}\n"
    )
    assert nothing_new.returncode == 0, nothing_new.stderr
    assert (
        nothing_new.stdout == "no event since the last checkpoint; nothing recorded\n"
    )
    assert sorted((row["order_id"], row["upc"]) for row in heads) == sorted(
        (CLI_ORDER, upc) for upc in CLI_UPCS
    )
    assert exported.returncode == 0, exported.stderr
    assert checked.returncode == 0, checked.stdout
    summary = checked.json_lines()[-1]["summary"]
    assert isinstance(summary, dict)
    assert (summary["events"], summary["streams"], summary["findings"]) == (
        len(CLI_UPCS),
        len(CLI_UPCS),
        0,
    )
    assert summary["heads_digest"] == checkpoint["digest"]
    assert verified.returncode == 0, verified.stdout
    verdict = verified.json_lines()[-1]["summary"]
    assert isinstance(verdict, dict)
    assert (verdict["checkpoints"], verdict["signatures_checked"]) == (1, True)
    for done in (recorded, nothing_new, listed, exported, checked, verified):
        assert AUDIT_KEY not in done.stdout + done.stderr


@pytest.mark.slow
async def test_verify_export_names_a_changed_hostile_event_by_its_exact_identifiers(
    operated: Operated, tmp_path: Path
) -> None:
    path = tmp_path / "export.ndjson"
    exported = await command(operated, "export", "--mode", "live", "-o", str(path))
    assert exported.returncode == 0, exported.stderr
    lines = path.read_bytes().splitlines(keepends=True)
    number, event = next(
        (n, decoded)
        for n, line in enumerate(lines, start=1)
        if (decoded := msgspec.json.decode(line)).get("upc") == "%"
    )
    event["raw_status"] = "refunded"
    lines[number - 1] = msgspec.json.encode(event) + b"\n"
    path.write_bytes(b"".join(lines))

    checked = await command(operated, "audit", "verify-export", str(path), "--json")

    assert checked.returncode == 1, checked.stdout
    *findings, summary = checked.json_lines()
    assert [
        (f["kind"], f["mode"], f["order_id"], f["upc"], f["line"]) for f in findings
    ] == [("content_changed", "live", CLI_ORDER, "%", number)]
    verdict = summary["summary"]
    assert isinstance(verdict, dict)
    assert (verdict["findings"], verdict["clean"]) == (1, False)


async def every_row(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every row of every table and view, as text, in a stable order."""
    rows = {}
    for table in sorted(await table_names(pool)):
        found = await pool.fetch(f'SELECT row_to_json(t)::text FROM "{table}" t')
        rows[table] = sorted(row[0] for row in found)
    return rows


@pytest.mark.slow
async def test_migrating_again_leaves_hostile_rows_and_the_tables_as_they_were(
    operated: Operated,
) -> None:
    before = await every_row(operated.pool)

    first = await command(operated, "migrate")
    second = await command(operated, "migrate")

    for done in (first, second):
        assert done.returncode == 0, done.stderr
        assert done.stdout == "schema is current\n"
    assert await table_names(operated.pool) == operated.tables_before
    assert await every_row(operated.pool) == before
    stored = await operated.pool.fetch(
        "SELECT upc, raw_body FROM events WHERE order_id = $1", CLI_ORDER
    )
    assert {row["upc"]: row["raw_body"] for row in stored} == operated.bodies
    held = await operated.pool.fetchval(
        "SELECT raw_body FROM quarantine WHERE id = $1", operated.held_id
    )
    assert held == operated.held


@pytest.mark.slow
async def test_a_rebuilt_view_gives_hostile_items_back_exactly_and_the_old_is_dropped(
    server_url: str,
) -> None:
    # A rebuild swaps the view that the other commands' database serves: it
    # runs on a database of its own.
    async with operated_database(server_url) as operated:
        old = await served_version(operated.pool)
        async with operated.pool.acquire() as connection:
            served_rows = await rows_of(connection, old.table_name)

        rebuilt = await command(operated, "projections", "rebuild")

        new = await served_version(operated.pool)
        source = await view_source(operated.pool)
        async with operated.pool.acquire() as connection:
            rebuilt_rows = await rows_of(connection, new.table_name)
        dropped = await command(operated, "projections", "drop-old")
        again = await command(operated, "projections", "drop-old")
        tables = await table_names(operated.pool)
        async with running_app(operated.url) as client:
            reader = await issue(
                client, operated.pool, CredentialKind.API_KEY, role=Role.READER
            )
            order = await client.get(
                f"/v1/orders/{in_path(CLI_ORDER)}", headers=bearer(reader.secret)
            )

    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"0 of {len(CLI_UPCS)} items differ from the served version" in (
        rebuilt.stderr
    )
    assert new.version == old.version + 1
    assert source == new.table_name
    assert differing(rebuilt_rows, served_rows) == []
    assert sorted(key.upc for key in rebuilt_rows) == sorted(CLI_UPCS)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout == f"dropped {old.table_name}\n"
    assert again.returncode == 0, again.stderr
    assert again.stdout == "no retired version to drop\n"
    assert tables == (operated.tables_before - {old.table_name}) | {new.table_name}
    assert order.status_code == 200, order.text
    assert order.json()["order_id"] == CLI_ORDER
    # Each status is unknown to the vocabulary, so it is also kept as a key.
    assert {
        item["upc"]: (item["last_status"], item["unrecognized_statuses"])
        for item in order.json()["items"]
    } == {upc: (f"{upc}'--", {f"{upc}'--": 1}) for upc in CLI_UPCS}


@pytest.mark.slow
async def test_the_commands_leave_the_tables_intact(operated: Operated) -> None:
    await command(operated, "replay", CLI_ORDER)

    assert await table_names(operated.pool) == operated.tables_before
    assert await operated.pool.fetchval("SELECT count(*) FROM events") == len(CLI_UPCS)
