"""``POST /webhooks/locally``: where a Locally webhook enters.

The order of the checks is the order of trust: the token first (nothing is
read or kept for a caller without one), then the body's size, then its
shape. Every authenticated delivery ends either as an event (202, after the
commit) or in quarantine (413, 415, 422); if neither could be made durable the
answer is 503 and Locally retries.

The body alone decides whether a delivery is an event: Locally does not say
what content type it sends, and a readable webhook labelled oddly is still
Locally's word. The label only explains a body that cannot be read: one
declared as something other than JSON is answered 415, not 422, so that the
sender learns what to change.

The route is direct (``ordertrail.api.direct``): every answer is an
``Answer`` with its final headers, written onto the connection as it is.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Request, post
from litestar.exceptions import ClientException
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ASGIApp

from ordertrail.api.direct import Answer, direct
from ordertrail.api.documentation import WEBHOOK_TOKEN, WebhookOperation, problems
from ordertrail.api.problems import problem_answer
from ordertrail.api.security import client_address, refuse_failing
from ordertrail.api.services import Services
from ordertrail.auth.credentials import CredentialKind
from ordertrail.eventstore.records import Delivery
from ordertrail.ingest import quarantine
from ordertrail.ingest.payload import decode_webhook
from ordertrail.ingest.writer import AppendFailed
from ordertrail.lib.metrics import DELIVERIES

__all__ = ["Accepted", "Arrival", "declares_json", "receive_webhook"]

log = structlog.get_logger("ordertrail.ingest")

TOKEN_HEADER = "locally-webhook-token"  # noqa: S105 - a header name
IDEMPOTENCY_HEADERS = ("idempotency-key", "webhook-id")
# RFC 9110 asks every 401 for a challenge; this one names the header to send.
_TOKEN_CHALLENGE = 'Token realm="ordertrail", header="locally-webhook-token"'  # noqa: S105
_MAX_IDEMPOTENCY_KEY = 256


class Accepted(msgspec.Struct, frozen=True):
    """The answer to a delivery that is now an event in the log."""

    position: int
    """The event's global position."""
    order_id: str
    upc: str
    version: int
    """The event's version within its item's stream."""
    redelivery: bool
    """Whether this delivery repeats one already recorded."""
    redelivery_of: int | None
    """The position of the event this delivery repeats."""


_encode = msgspec.json.Encoder().encode


class Arrival(msgspec.Struct, frozen=True, kw_only=True):
    """What is known of an authenticated delivery before its body is read."""

    received_at: datetime
    request_id: str
    mode: str
    token_id: str
    client_address: str | None
    idempotency_key: str | None
    content_type: str | None


@post(
    "/webhooks/locally",
    status_code=202,
    request_max_body_size=None,
    summary="Receive a Locally cart item webhook",
    description=(
        "Authenticated by the `locally-webhook-token` header. Answers 202 only "
        "after the event is committed; 503 means nothing was kept and the "
        "sender should retry."
    ),
    tags=["ingest"],
    opt=direct(),
    operation_class=WebhookOperation,
    security=WEBHOOK_TOKEN,
    responses={
        # No generated examples: they are random, and the committed document
        # must come out the same every time.
        202: ResponseSpec(
            Accepted, description="Committed to the log.", generate_examples=False
        ),
        **problems(401, 413, 415, 422, 429, 503),
    },
)
async def receive_webhook(request: Request[Any, Any, Any]) -> ASGIApp:
    """Authenticate, read and append one webhook delivery.

    Annotated as an ASGI app, which the ``Answer`` is, so that the framework
    sends it as it is when it calls the handler itself.
    """
    services: Services = request.app.state.services
    received_at = datetime.now(UTC)
    request_id: str = request.scope["state"]["request_id"]
    client = client_address(request, services.settings.trusted_client_header)
    headers = _wanted_headers(request)

    credential = await services.credentials.verify(
        headers.get(TOKEN_HEADER), CredentialKind.WEBHOOK_TOKEN
    )
    if credential is None or credential.mode is None:
        # Only failures are limited: Locally's own deliveries, which carry a
        # valid token, must never wait behind someone's guessing.
        DELIVERIES.labels("unknown", "unauthenticated").inc()
        refuse_failing(services, client)
        log.warning(
            "webhook.refused",
            reason="unauthenticated",
            client=client,
            request_id=request_id,
        )
        return problem_answer(
            401,
            "unauthenticated",
            "Missing or unknown webhook token",
            headers={"WWW-Authenticate": _TOKEN_CHALLENGE},
            request_id=request_id,
        )
    arrival = Arrival(
        received_at=received_at,
        request_id=request_id,
        mode=credential.mode,
        token_id=credential.id,
        client_address=client,
        idempotency_key=_storable(_idempotency_key(headers)),
        content_type=_storable(headers.get("content-type")),
    )

    limit = services.settings.body_limit
    body, length, complete = await _read_body(
        request, headers.get("content-length"), limit
    )
    if not complete:
        reason = f"body larger than {limit} bytes"
        return await _hold(services, arrival, body, length, reason, truncated=True)
    try:
        webhook = decode_webhook(body)
    except msgspec.DecodeError as error:
        return await _hold(services, arrival, body, length, str(error), truncated=False)

    delivery = Delivery(
        mode=arrival.mode,
        order_id=webhook.order_id,
        upc=webhook.upc,
        raw_status=webhook.status,
        raw_body=body,
        received_at=received_at,
        request_id=request_id,
        token_id=arrival.token_id,
        client_address=client,
        idempotency_key=arrival.idempotency_key,
    )
    return await _append(services, delivery)


async def _append(services: Services, delivery: Delivery) -> Answer:
    try:
        appended = await services.writer.append(delivery)
    except AppendFailed as error:
        DELIVERIES.labels(delivery.mode, "unavailable").inc()
        log.error(  # noqa: TRY400 - the cause is known; a traceback adds nothing
            "webhook.not_stored",
            reason=str(error),
            request_id=delivery.request_id,
            order_id=delivery.order_id,
            upc=delivery.upc,
            mode=delivery.mode,
        )
        return _unavailable(delivery.request_id)

    redelivery = appended.redelivery_of is not None
    DELIVERIES.labels(delivery.mode, "redelivery" if redelivery else "accepted").inc()
    log.info(
        "webhook.accepted",
        request_id=delivery.request_id,
        order_id=delivery.order_id,
        upc=delivery.upc,
        mode=delivery.mode,
        status=delivery.raw_status,
        position=appended.position,
        version=appended.version,
        redelivery=redelivery,
        token_id=delivery.token_id,
    )
    answer = Accepted(
        appended.position,
        delivery.order_id,
        delivery.upc,
        appended.version,
        redelivery,
        appended.redelivery_of,
    )
    return Answer.of(202, _encode(answer), "application/json")


_WANTED = frozenset(
    name.encode()
    for name in (TOKEN_HEADER, "content-type", "content-length", *IDEMPOTENCY_HEADERS)
)


def _wanted_headers(request: Request[Any, Any, Any]) -> dict[str, str]:
    # One pass over the raw headers for the few this handler reads; the
    # framework's header view rebuilds itself on every access. A repeated
    # header is combined into one value, as RFC 9110 (5.3) combines field
    # lines and as a proxy in between may already have done: two tokens are
    # then no token, however they arrive.
    found: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        if name in _WANTED:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            found[key] = f"{found[key]}, {text}" if key in found else text
    return found


def _idempotency_key(headers: dict[str, str]) -> str | None:
    for header in IDEMPOTENCY_HEADERS:
        value = headers.get(header)
        if value:
            return value[:_MAX_IDEMPOTENCY_KEY]
    return None


def _storable(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; an HTTP server should refuse it in a
    # header, but an ASGI server may pass it on. Header values are read as
    # latin-1, so U+FFFD never occurs in them: the replacement keeps distinct
    # values distinct, and an idempotency key still names one delivery.
    if value is None or "\x00" not in value:
        return value
    return value.replace("\x00", "\ufffd")


async def _read_body(
    request: Request[Any, Any, Any], announced: str | None, limit: int
) -> tuple[bytes, int, bool]:
    """Return (body or its first ``limit`` bytes, length seen, complete).

    The body is read as the server frames it, message by message, and held
    to the limit by what arrives, whatever Content-Length said. The
    framework's own reading would refuse a Content-Length it cannot parse
    (two values combined, a digit outside ASCII) with an answer of its own,
    and this delivery is authenticated: it must end as an event or in
    quarantine. Reading stops at the first chunk past the limit; the rest is
    never read.
    """
    chunks: list[bytes] = []
    length = 0
    more = True
    while more:
        message = await request.receive()
        if message["type"] != "http.request":
            # The sender went away mid-body: there is nobody to answer.
            raise ClientException("the sender went away before the body ended")
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        length += len(chunk)
        if length > limit:
            kept = (b"".join(chunks) + chunk)[:limit]
            if announced is not None and announced.isascii() and announced.isdigit():
                length = max(length, int(announced))
            return kept, length, False
        chunks.append(chunk)
    return b"".join(chunks), length, True


async def _hold(
    services: Services,
    arrival: Arrival,
    body: bytes,
    length: int,
    reason: str,
    *,
    truncated: bool,
) -> Answer:
    """Keep an authenticated delivery that will not become an event."""
    try:
        quarantine_id = await quarantine.hold(
            services.pool,
            received_at=arrival.received_at,
            mode=arrival.mode,
            request_id=arrival.request_id,
            client_address=arrival.client_address,
            token_id=arrival.token_id,
            content_type=arrival.content_type,
            idempotency_key=arrival.idempotency_key,
            raw_body=body,
            body_length=length,
            truncated=truncated,
            reason=reason,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        DELIVERIES.labels(arrival.mode, "unavailable").inc()
        log.error(  # noqa: TRY400 - the cause is known; a traceback adds nothing
            "webhook.not_stored",
            reason=str(error),
            quarantine=True,
            request_id=arrival.request_id,
        )
        return _unavailable(arrival.request_id)
    DELIVERIES.labels(arrival.mode, "too_large" if truncated else "quarantined").inc()
    log.warning(
        "webhook.quarantined",
        request_id=arrival.request_id,
        reason=reason,
        quarantine_id=quarantine_id,
        mode=arrival.mode,
        length=length,
        token_id=arrival.token_id,
    )
    if truncated:
        return problem_answer(
            413,
            "body-too-large",
            "Webhook body too large",
            f"{length} bytes; the limit is {services.settings.body_limit}. "
            f"The first part is kept as quarantine {quarantine_id}.",
            request_id=arrival.request_id,
        )
    if not declares_json(arrival.content_type):
        return problem_answer(
            415,
            "unsupported-media-type",
            "Not a JSON webhook body",
            f"{reason}, and the Content-Type does not declare JSON: send the "
            f"webhook as application/json. Kept as quarantine {quarantine_id}.",
            request_id=arrival.request_id,
        )
    return problem_answer(
        422,
        "invalid-payload",
        "Not a Locally webhook payload",
        f"{reason}. Kept as quarantine {quarantine_id}.",
        request_id=arrival.request_id,
    )


def declares_json(content_type: str | None) -> bool:
    """Whether a Content-Type allows a JSON body; an absent one does.

    ``application/json``, ``text/json`` and any ``+json`` type (RFC 6839),
    whatever their parameters and letter case.
    """
    if content_type is None:
        return True
    media_type = content_type.partition(";")[0].strip().lower()
    return (
        not media_type
        or media_type in _JSON_MEDIA_TYPES
        or media_type.endswith("+json")
    )


_JSON_MEDIA_TYPES = frozenset({"application/json", "text/json"})


def _unavailable(request_id: str) -> Answer:
    return problem_answer(
        503,
        "unavailable",
        "Could not store the delivery; retry",
        headers={"Retry-After": "1"},
        request_id=request_id,
    )
