"""What the OpenAPI document says beyond what the handlers' types show.

Every error answer is a problem document (RFC 9457), so each route lists the
statuses it can answer with that schema instead of litestar's generic 400.
The webhook route reads its raw body itself (it must keep bodies it cannot
parse), so its request body is described here, from the payload Struct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityRequirement,
)

from ordertrail.api.problems import PROBLEM_MEDIA_TYPE, Problem
from ordertrail.ingest.payload import LocallyWebhook

__all__ = ["API_KEY", "WEBHOOK_TOKEN", "WebhookOperation", "problems"]

API_KEY: list[SecurityRequirement] = [{"apiKey": []}]
WEBHOOK_TOKEN: list[SecurityRequirement] = [{"webhookToken": []}]

_MEANINGS = {
    304: "The copy named in If-None-Match is current; no body.",
    400: "A parameter or cursor is not valid; `parameter` names it.",
    401: "Missing, unknown, expired or revoked credentials.",
    403: "The API key's role does not allow this.",
    404: "No such order or item in this mode.",
    413: "The body is over the size limit; its first part is kept in quarantine.",
    415: (
        "Not a Locally payload, and declared as a content type other than JSON; "
        "the body is kept in quarantine."
    ),
    422: "Not a Locally payload; the body is kept in quarantine.",
    429: "Too many requests; wait as long as Retry-After says.",
    503: "The database is out of reach: nothing was stored; retry.",
}


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """Return the documented error answers for ``statuses``."""
    return {
        status: ResponseSpec(
            None if status == 304 else Problem,
            description=_MEANINGS[status],
            media_type=PROBLEM_MEDIA_TYPE,
            generate_examples=False,
        )
        for status in statuses
    }


_CAMEL_TO_SNAKE = {
    "minLength": "min_length",
    "maxLength": "max_length",
    "anyOf": "any_of",
}


def _schema(document: dict[str, Any]) -> Schema:
    # msgspec writes JSON Schema; litestar wants its Schema objects. The
    # payload uses only this small subset of keywords.
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key == "type":
            values["type"] = OpenAPIType(value)
        elif key == "properties":
            values["properties"] = {name: _schema(v) for name, v in value.items()}
        elif key == "anyOf":
            values["any_of"] = [_schema(v) for v in value]
        else:
            values[_CAMEL_TO_SNAKE.get(key, key)] = value
    return Schema(**values)


def _payload_schema() -> Schema:
    (_, definitions) = msgspec.json.schema_components([LocallyWebhook])
    return _schema(definitions["LocallyWebhook"])


@dataclass
class WebhookOperation(Operation):
    """The webhook route's operation, with its request body described."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description=(
                "A Locally cart item webhook, as Locally sends it. Fields besides "
                "these are kept, unread, in the stored raw body."
            ),
            content={"application/json": OpenAPIMediaType(schema=_payload_schema())},
        )
