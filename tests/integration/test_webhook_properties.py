"""Properties of ``POST /webhooks/locally`` over generated hostile deliveries.

Whatever arrives (arbitrary bytes, broken UTF-8, control characters, lone
surrogates, bodies over the limit, JSON nested thousands of levels deep,
fields of the wrong type, unknown fields, enormous or repeated headers, any
content type), the endpoint answers with one of the statuses its OpenAPI
document lists, never a 5xx, and keeps what it says it keeps:

- a delivery with the valid token is an event (202) or in quarantine (413,
  422), found by the request id its answer carries, its body byte for byte
  (the first ``BODY_LIMIT`` bytes for a 413);
- a delivery without it (missing, wrong, repeated) is answered 401 and
  leaves nothing anywhere.

The app runs on the test database with the default body limit, 64 KiB.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.auth.credentials import CredentialKind
from ordertrail.ingest.controller import declares_json
from tests.integration.api_support import issue, running_app
from tests.integration.helpers import (
    TOKEN_HEADER,
    quarantined_by_request,
    quarantined_mentioning,
)
from tests.support import WEBHOOK_PATH, new_order_id

BODY_LIMIT = 64 * 1024
CONTRACT = Path(__file__).parents[2] / "schemas" / "openapi.json"


def documented_answers() -> set[int]:
    """The answers the committed OpenAPI document lists for the webhook."""
    operation = msgspec.json.decode(CONTRACT.read_bytes())["paths"][WEBHOOK_PATH]
    return {int(status) for status in operation["post"]["responses"]}


DOCUMENTED = documented_answers()
PROBLEM_TYPES = {
    401: "urn:ordertrail:problem:unauthenticated",
    413: "urn:ordertrail:problem:body-too-large",
    415: "urn:ordertrail:problem:unsupported-media-type",
    422: "urn:ordertrail:problem:invalid-payload",
}
IDEMPOTENCY_KEPT = 256
"""How much of an idempotency key is kept."""

EXAMPLES = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Receiver:
    """The app under test and the live token it accepts."""

    client: AsyncTestClient[Litestar]
    pool: asyncpg.Pool
    token: str


@pytest.fixture(scope="module")
async def receiver(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Receiver]:
    async with running_app(database_url, body_limit=BODY_LIMIT) as client:
        token = await issue(client, pool, CredentialKind.WEBHOOK_TOKEN, mode="live")
        yield Receiver(client, pool, token.secret)


# Sending and checking ----------------------------------------------------------


def payload(order_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A Locally payload for a fresh order, with ``fields`` changed or added."""
    order_id = order_id or new_order_id()
    return {
        "upc": "601842495575",
        "order_id": order_id,
        "status": "confirmed",
        "order_url": f"https://www.locally.com/api/v2/cart/{order_id}",
        **fields,
    }


def encoded(document: Any) -> bytes:
    return msgspec.json.encode(document)


def with_token(receiver: Receiver, *extra: tuple[bytes, bytes]) -> Headers:
    return [
        (TOKEN_HEADER.encode(), receiver.token.encode()),
        (b"content-type", b"application/json"),
        (b"x-request-id", uuid.uuid4().hex.encode()),
        *extra,
    ]


def authentic(receiver: Receiver, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the headers carry the valid token, once and alone."""
    tokens = [value for name, value in headers if name.lower() == TOKEN_HEADER.encode()]
    return tokens == [receiver.token.encode()]


async def deliver(receiver: Receiver, body: bytes, headers: Headers) -> httpx.Response:
    """POST to the app with exactly these header lines, as a server would pass them.

    The test client's own transport joins repeated headers and re-encodes
    values as UTF-8; httpx's ASGI transport, run on the app's loop, hands the
    app the raw lines, repeats and arbitrary bytes included.
    """

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=receiver.client.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver.local"
        ) as http:
            return await http.post(WEBHOOK_PATH, content=body, headers=headers)

    return receiver.client.blocking_portal.call(post)


async def events_of_request(
    pool: asyncpg.Pool, request_id: str
) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM events WHERE request_id = $1", request_id)
    return [dict(row.items()) for row in rows]


async def check_answer(
    receiver: Receiver,
    response: httpx.Response,
    body: bytes,
    *,
    valid_token: bool,
    expected: set[int],
) -> dict[str, Any] | None:
    """Check the answer and what it left stored; return the event or quarantine row."""
    status = response.status_code
    assert status < 500, (status, response.text)
    assert status in DOCUMENTED, (status, response.text)
    assert status in (expected if valid_token else {401}), (status, response.text)
    request_id = response.headers["x-request-id"]
    if status != 202:
        problem = msgspec.json.decode(response.content)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert problem["status"] == status
        assert problem["type"] == PROBLEM_TYPES[status]
        assert problem["request_id"] == request_id

    events = await events_of_request(receiver.pool, request_id)
    held = await quarantined_by_request(receiver.pool, request_id)
    if not valid_token:
        assert events == []
        assert held is None
        return None
    # Every authenticated delivery is kept, in exactly one place.
    if status == 202:
        assert held is None
        (event,) = events
        assert event["raw_body"] == body
        assert event["position"] == response.json()["position"]
        return event
    assert events == []
    assert held is not None
    assert held["mode"] == "live"
    assert held["released_at"] is None
    if status == 413:
        assert held["truncated"] is True
        assert held["raw_body"] == body[:BODY_LIMIT]
        assert held["body_length"] >= len(body) > BODY_LIMIT
    else:
        assert held["truncated"] is False
        assert held["raw_body"] == body
        assert held["body_length"] == len(body)
    return held


# Bodies ------------------------------------------------------------------------


@given(body=st.binary(max_size=2000))
@EXAMPLES
async def test_arbitrary_bytes_are_kept_or_refused_as_documented(
    receiver: Receiver, body: bytes
) -> None:
    response = await deliver(receiver, body, with_token(receiver))

    await check_answer(receiver, response, body, valid_token=True, expected={202, 422})


FIELDS = ["upc", "order_id", "status", "order_url"]
# What can sit inside a JSON string, as bytes, and what the endpoint must make
# of it there: in a field ordertrail reads, or in one it keeps unread.
BROKEN_TEXT = [
    # Not UTF-8: unread fields are skipped unchecked, and the raw body is
    # bytes, so only a field that is read makes the body unreadable.
    (b"\xff", 422, 202),
    (b"\xc3\x28", 422, 202),
    (b"\xc0\xaf", 422, 202),
    (b"\x80", 422, 202),
    (b"\xf0\x9f\x98", 422, 202),
    (b"\xed\xa0\x80", 422, 202),
    (b"\xf4\x90\x80\x80", 422, 202),
    # Control characters written raw are not JSON anywhere.
    (b"\x00", 422, 422),
    (b"\x01", 422, 422),
    (b"\x1f", 422, 422),
    (b"\n", 422, 422),
    # Escaped, they are JSON; NUL alone cannot be stored as text.
    (b"\\u0000", 422, 202),
    (b"a\\u0000b", 422, 202),
    (b"\\u0001", 202, 202),
    (b"\\u001f", 202, 202),
    (b"\x7f", 202, 202),
    # A surrogate escape without its other half is not a character.
    (b"\\ud800", 422, 422),
    (b"\\udfff", 422, 422),
    (b"\\udc00\\ud800", 422, 422),
    (b"x\\ud83dy", 422, 422),
    (b"\\ud83d\\ude00", 202, 202),
]


@given(
    field=st.sampled_from([*FIELDS, "note"]),
    broken=st.sampled_from(BROKEN_TEXT),
    before=st.text(alphabet="abcXYZ019 -", max_size=8),
)
@EXAMPLES
async def test_broken_text_inside_a_field_is_kept_somewhere(
    receiver: Receiver, field: str, broken: tuple[bytes, int, int], before: str
) -> None:
    poison, if_read, if_unread = broken
    marker = f"@@{uuid.uuid4().hex}@@"
    document = payload(**{field: f"{before}{marker}"})
    body = encoded(document).replace(marker.encode(), poison)

    response = await deliver(receiver, body, with_token(receiver))

    expected = if_read if field in FIELDS else if_unread
    await check_answer(receiver, response, body, valid_token=True, expected={expected})


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
NOT_A_STRING = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(JSON_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=4), JSON_SCALARS, max_size=3),
)


_ABSENT = object()


@st.composite
def wrong_field(draw: st.DrawFn) -> tuple[str, Any]:
    """A field of the payload, and a value that field cannot take (or none)."""
    field = draw(st.sampled_from(FIELDS))
    wrong: st.SearchStrategy[Any] = NOT_A_STRING
    if field != "order_url":
        # order_url may be null or absent; the others must be strings.
        wrong = wrong | st.none() | st.just(_ABSENT)
        wrong = wrong | st.text(min_size=257, max_size=300)
    if field in ("upc", "order_id"):
        wrong = wrong | st.just("")
    return field, draw(wrong)


# Values for the other fields that are fine, so that the field at fault is the
# one the reason names.
FINE_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    min_size=1,
    max_size=20,
)


@given(wrong=wrong_field(), others=st.dictionaries(st.sampled_from(FIELDS), FINE_TEXT))
@EXAMPLES
async def test_a_field_of_the_wrong_type_is_kept_in_quarantine(
    receiver: Receiver, wrong: tuple[str, Any], others: dict[str, str]
) -> None:
    field, value = wrong
    document = payload(**{**others, "order_id": new_order_id()})
    if value is _ABSENT:
        del document[field]
    else:
        document[field] = value
    body = encoded(document)

    response = await deliver(receiver, body, with_token(receiver))

    held = await check_answer(
        receiver, response, body, valid_token=True, expected={422}
    )
    assert held is not None
    assert field in held["reason"]


@given(
    extra=st.dictionaries(
        st.text(max_size=12).filter(lambda key: key not in FIELDS),
        JSON_VALUES,
        min_size=1,
        max_size=5,
    ),
    status=st.text(max_size=64).filter(lambda text: "\x00" not in text),
)
@EXAMPLES
async def test_unknown_fields_are_kept_unread_in_the_event(
    receiver: Receiver, extra: dict[str, Any], status: str
) -> None:
    body = encoded(payload(status=status, **extra))
    if len(body) > BODY_LIMIT:
        body = encoded(payload(status=status))

    response = await deliver(receiver, body, with_token(receiver))

    event = await check_answer(
        receiver, response, body, valid_token=True, expected={202}
    )
    assert event is not None
    assert event["raw_status"] == status


@given(
    length=st.integers(min_value=BODY_LIMIT - 3, max_value=BODY_LIMIT + 3)
    | st.integers(min_value=BODY_LIMIT + 4, max_value=2_000_000),
    announced=st.sampled_from(["true", "absent", "small", "large", "junk"]),
)
@settings(max_examples=40, deadline=None)
async def test_a_body_over_the_limit_keeps_its_first_part_in_quarantine(
    receiver: Receiver, length: int, announced: str
) -> None:
    document = payload(padding="")
    bare = len(encoded(document))
    document["padding"] = "p" * max(0, length - bare)
    body = encoded(document)
    # The limit holds by the bytes that arrive, whatever Content-Length says.
    content_length = {
        "true": [str(len(body)).encode()],
        "absent": [],
        "small": [b"10"],
        "large": [str(len(body) * 10).encode()],
        "junk": [b"\xb2"],
    }[announced]
    headers = with_token(receiver, *((b"content-length", v) for v in content_length))

    response = await deliver(receiver, body, headers)

    expected = {413} if len(body) > BODY_LIMIT else {202}
    await check_answer(receiver, response, body, valid_token=True, expected=expected)


@given(
    depth=st.integers(min_value=1, max_value=200)
    | st.integers(min_value=3000, max_value=20_000)
    | st.integers(min_value=1, max_value=20_000),
    container=st.sampled_from(["[", '{"a":']),
    where=st.sampled_from(["top", "read field", "unread field"]),
)
@EXAMPLES
async def test_deeply_nested_json_is_read_or_kept_in_quarantine(
    receiver: Receiver, depth: int, container: str, where: str
) -> None:
    close = "]" if container == "[" else "}"
    nested = container * depth + "1" + close * depth
    order_id = new_order_id()
    if where == "top":
        text = nested
    else:
        field = "status" if where == "read field" else "note"
        text = (
            f'{{"upc":"601842495575","order_id":"{order_id}","status":"confirmed",'
            f'"{field}":{nested}}}'
        )
    body = text.encode()
    # Deep enough to fill the limit is a 413 whatever the shape.
    if len(body) > BODY_LIMIT:
        expected = {413}
    elif where != "unread field":
        expected = {422}
    elif depth <= 200:
        expected = {202}
    elif depth >= 3000:
        expected = {422}
    else:
        # Between the two, the interpreter's recursion limit decides.
        expected = {202, 422}

    response = await deliver(receiver, body, with_token(receiver))

    await check_answer(receiver, response, body, valid_token=True, expected=expected)


# Headers -----------------------------------------------------------------------

HUGE = 200_000


def token_headers(secret: bytes) -> st.SearchStrategy[Headers]:
    """Token headers: the valid one, variants of it, none, several."""
    name = TOKEN_HEADER.encode()
    wrong = st.sampled_from(
        [
            b"",
            b"x",
            secret[:-1],
            secret + b"x",
            secret.upper(),
            b" " + secret,
            secret + b"\x00",
            b"Bearer " + secret,
            secret * (HUGE // len(secret)),
            b"\xff" * HUGE,
        ]
    ) | st.binary(max_size=64)
    one_header = st.sampled_from([secret]) | wrong
    return st.lists(
        st.tuples(st.sampled_from([name, b"Locally-Webhook-Token"]), one_header),
        max_size=3,
    )


HEADER_VALUES = st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=xyz",
        b"application/xml",
        b"",
        b"\x00",
        b"a\x00b",
        b"caf\xe9",
        b"\xff\xfe",
        b"x" * HUGE,
    ]
) | st.binary(max_size=40)


# A well-formed request id sent by the client is kept; these tests look rows
# up by request id, so a generated one must not be both kept and repeated.
_KEPT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
REQUEST_IDS = HEADER_VALUES.filter(lambda value: not _KEPT_REQUEST_ID.fullmatch(value))


@st.composite
def other_headers(draw: st.DrawFn) -> Headers:
    """Content types, idempotency keys and request ids: none, odd, huge, repeated."""
    headers: Headers = []
    for name in (b"content-type", b"idempotency-key", b"webhook-id"):
        for value in draw(st.lists(HEADER_VALUES, max_size=2)):
            headers.append((name, value))
    for value in draw(st.lists(REQUEST_IDS, max_size=2)):
        headers.append((b"x-request-id", value))
    return headers


@given(
    tokens=st.data(),
    others=other_headers(),
    readable=st.booleans(),
)
@EXAMPLES
async def test_any_headers_get_a_documented_answer(
    receiver: Receiver, tokens: st.DataObject, others: Headers, readable: bool
) -> None:
    token = tokens.draw(token_headers(receiver.token.encode()))
    marker = new_order_id()
    body = encoded(payload(marker)) if readable else f"junk {marker}".encode()
    headers = [*token, *others]
    valid_token = authentic(receiver, headers)

    response = await deliver(receiver, body, headers)

    # A readable webhook is an event whatever its label; an unreadable body
    # is 415 when it was declared as something other than JSON.
    declared = header_kept(others, b"content-type")
    unreadable = {422} if declares_json(declared) else {415}
    kept = await check_answer(
        receiver,
        response,
        body,
        valid_token=valid_token,
        expected={202} if readable else unreadable,
    )
    if not valid_token:
        assert await quarantined_mentioning(receiver.pool, marker) == 0
        assert (
            await receiver.pool.fetchval(
                "SELECT count(*) FROM events WHERE order_id = $1", marker
            )
            == 0
        )
        return
    assert kept is not None
    assert kept["idempotency_key"] == idempotency_key_kept(others)
    if not readable:
        assert kept["content_type"] == header_kept(others, b"content-type")


def header_kept(headers: Headers, name: bytes) -> str | None:
    """A header as the service keeps it: repeats combined, NUL made storable."""
    values = [value.decode("latin-1") for n, value in headers if n == name]
    if not values:
        return None
    return ", ".join(values).replace("\x00", "\ufffd")


def idempotency_key_kept(headers: Headers) -> str | None:
    for name in (b"idempotency-key", b"webhook-id"):
        value = header_kept(headers, name)
        if value:
            return value[:IDEMPOTENCY_KEPT]
    return None


async def test_the_service_still_answers_after_all_of_it(receiver: Receiver) -> None:
    live = await receiver.client.get("/health/live")
    ready = await receiver.client.get("/health/ready")
    body = encoded(payload())
    accepted = await deliver(receiver, body, with_token(receiver))

    assert live.status_code == 200
    assert ready.status_code == 200
    await check_answer(receiver, accepted, body, valid_token=True, expected={202})
