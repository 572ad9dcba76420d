"""``POST /webhooks/locally``: where a Locally webhook enters.

The order of the checks is the order of trust: the token first (nothing is
read or kept for a caller without one), then the body's size, then its
shape. Every authenticated delivery ends either as an event (202, after the
commit) or in quarantine (413, 422); if neither could be made durable the
answer is 503 and Locally retries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Request, Response, post

from ordertrail.api.problems import problem_response
from ordertrail.api.services import Services
from ordertrail.auth.credentials import Credential, CredentialKind
from ordertrail.eventstore.records import Delivery
from ordertrail.ingest import quarantine
from ordertrail.ingest.payload import decode_webhook
from ordertrail.ingest.writer import AppendFailed

__all__ = ["Accepted", "receive_webhook"]

log = structlog.get_logger("ordertrail.ingest")

TOKEN_HEADER = "locally-webhook-token"
IDEMPOTENCY_HEADERS = ("idempotency-key", "webhook-id")
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
    responses={},
)
async def receive_webhook(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Authenticate, read and append one webhook delivery."""
    services: Services = request.app.state.services
    received_at = datetime.now(UTC)
    request_id: str = request.scope["state"]["request_id"]
    client = client_address(request, services.settings.trusted_client_header)

    credential = await services.credentials.verify(
        request.headers.get(TOKEN_HEADER), CredentialKind.WEBHOOK_TOKEN
    )
    if credential is None:
        log.warning("webhook.refused", reason="unauthenticated", client=client)
        return problem_response(
            401, "unauthenticated", "Missing or unknown webhook token",
            request_id=request_id,
        )

    body, length, complete = await _read_body(request, services.settings.body_limit)
    idempotency_key = _idempotency_key(request)
    if not complete:
        return await _hold(
            services, request, credential, received_at, request_id, client,
            idempotency_key, body, length, truncated=True,
            reason=f"body larger than {services.settings.body_limit} bytes",
            status=413,
        )
    try:
        webhook = decode_webhook(body)
    except msgspec.DecodeError as error:
        return await _hold(
            services, request, credential, received_at, request_id, client,
            idempotency_key, body, length, truncated=False, reason=str(error),
            status=422,
        )

    assert credential.mode is not None
    delivery = Delivery(
        mode=credential.mode,
        order_id=webhook.order_id,
        upc=webhook.upc,
        raw_status=webhook.status,
        raw_body=body,
        received_at=received_at,
        request_id=request_id,
        token_id=credential.id,
        client_address=client,
        idempotency_key=idempotency_key,
    )
    try:
        appended = await services.writer.append(delivery)
    except AppendFailed as error:
        log.error("webhook.not_stored", reason=str(error), order_id=delivery.order_id,
                  upc=delivery.upc, mode=delivery.mode)
        return _unavailable(request_id)

    redelivery = appended.redelivery_of is not None
    log.info(
        "webhook.accepted",
        order_id=delivery.order_id, upc=delivery.upc, mode=delivery.mode,
        status=delivery.raw_status, position=appended.position,
        version=appended.version, redelivery=redelivery, token_id=credential.id,
    )
    answer = Accepted(
        appended.position, delivery.order_id, delivery.upc, appended.version,
        redelivery, appended.redelivery_of,
    )
    return Response(_encode(answer), status_code=202, media_type="application/json")


def client_address(request: Request[Any, Any, Any], trusted_header: str | None) -> str | None:
    """Return the client's address, from a trusted proxy header if configured."""
    if trusted_header:
        forwarded = request.headers.get(trusted_header)
        if forwarded:
            return forwarded.split(",")[0].strip()[:64]
    return request.client.host if request.client else None


def _idempotency_key(request: Request[Any, Any, Any]) -> str | None:
    for header in IDEMPOTENCY_HEADERS:
        value = request.headers.get(header)
        if value:
            return value[:_MAX_IDEMPOTENCY_KEY]
    return None


async def _read_body(request: Request[Any, Any, Any], limit: int) -> tuple[bytes, int, bool]:
    """Return (body or its first ``limit`` bytes, length seen, complete).

    Reading stops at the first chunk past the limit; the rest is never read.
    """
    announced = request.headers.get("content-length")
    chunks: list[bytes] = []
    length = 0
    async for chunk in request.stream():
        length += len(chunk)
        if length > limit:
            kept = (b"".join(chunks) + chunk)[:limit]
            if announced is not None and announced.isdigit():
                length = max(length, int(announced))
            return kept, length, False
        chunks.append(chunk)
    return b"".join(chunks), length, True


async def _hold(
    services: Services,
    request: Request[Any, Any, Any],
    credential: Credential,
    received_at: datetime,
    request_id: str,
    client: str | None,
    idempotency_key: str | None,
    body: bytes,
    length: int,
    *,
    truncated: bool,
    reason: str,
    status: int,
) -> Response[bytes]:
    assert credential.mode is not None
    try:
        quarantine_id = await quarantine.hold(
            services.pool,
            received_at=received_at,
            mode=credential.mode,
            request_id=request_id,
            client_address=client,
            token_id=credential.id,
            content_type=request.headers.get("content-type"),
            idempotency_key=idempotency_key,
            raw_body=body,
            body_length=length,
            truncated=truncated,
            reason=reason,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        log.error("webhook.not_stored", reason=str(error), quarantine=True)
        return _unavailable(request_id)
    log.warning("webhook.quarantined", reason=reason, quarantine_id=quarantine_id,
                mode=credential.mode, length=length, token_id=credential.id)
    if status == 413:
        return problem_response(
            413, "body-too-large", "Webhook body too large",
            f"{length} bytes; the limit is {services.settings.body_limit}. "
            f"Kept as quarantine {quarantine_id}.",
            request_id=request_id,
        )
    return problem_response(
        422, "invalid-payload", "Not a Locally webhook payload",
        f"{reason}. Kept as quarantine {quarantine_id}.",
        request_id=request_id,
    )


def _unavailable(request_id: str) -> Response[bytes]:
    return problem_response(
        503, "unavailable", "Could not store the delivery; retry",
        headers={"Retry-After": "1"}, request_id=request_id,
    )
