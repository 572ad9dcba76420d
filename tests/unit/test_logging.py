"""Log redaction: no token, API key or Authorization value reaches a log line."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import structlog

from ordertrail.lib.logging import redact_secrets
from ordertrail.lib.secrets import API_KEY_PREFIX, WEBHOOK_TOKEN_PREFIX, new_secret

TOKEN = new_secret(WEBHOOK_TOKEN_PREFIX)
API_KEY = new_secret(API_KEY_PREFIX)


def redacted(**fields: Any) -> dict[str, Any]:
    return dict(redact_secrets(None, "info", {"event": "test.logged", **fields}))


def rendered(**fields: Any) -> str:
    # What reaches the stream: redaction, then the JSON renderer.
    line = structlog.processors.JSONRenderer()(None, "info", redacted(**fields))
    assert isinstance(line, str)
    return line


def refuse(secret: str) -> None:
    raise ValueError(f"rejected credential {secret}")


def log_lines(captured: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in captured.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    "field",
    [
        "token",
        "locally_webhook_token",
        "Authorization",
        "api_key",
        "apikey",
        "password",
        "client_secret",
        "cookie",
    ],
)
def test_fields_named_like_secrets_are_masked(field: str) -> None:
    assert redacted(**{field: "anything at all"})[field] == "[redacted]"


def test_token_id_is_a_public_identifier_and_kept() -> None:
    assert redacted(token_id="tok_1a2b3c4d")["token_id"] == "tok_1a2b3c4d"


@pytest.mark.parametrize("secret", [TOKEN, API_KEY])
def test_values_shaped_like_our_secrets_are_masked(secret: str) -> None:
    fields = redacted(detail=f"presented {secret} twice", reason=secret)

    assert secret not in json.dumps(fields)
    assert fields["detail"] == "presented [redacted] twice"
    assert fields["reason"] == "[redacted]"


def test_ordinary_values_are_untouched() -> None:
    fields = redacted(
        order_id="QE3QL6", status="confirmed", position=12, short="otw_abc"
    )

    assert fields == {
        "event": "test.logged",
        "order_id": "QE3QL6",
        "status": "confirmed",
        "position": 12,
        "short": "otw_abc",
    }


def test_secret_inside_a_headers_mapping_is_masked() -> None:
    # The module promises that a careless headers=... cannot leak a token.
    line = rendered(
        headers={"locally-webhook-token": TOKEN, "authorization": f"Bearer {API_KEY}"}
    )

    assert TOKEN not in line
    assert API_KEY not in line


def test_secret_inside_a_list_of_header_pairs_is_masked() -> None:
    line = rendered(headers=[("locally-webhook-token", TOKEN)])

    assert TOKEN not in line


def test_configured_json_lines_are_redacted(capfd: pytest.CaptureFixture[str]) -> None:
    log = structlog.get_logger("tests.logging")

    log.info("webhook.refused", token=TOKEN, detail=f"Bearer {API_KEY}", order_id="Q1")
    logging.getLogger("tests.stdlib").warning("presented %s", TOKEN)

    captured = capfd.readouterr().err
    assert TOKEN not in captured
    assert API_KEY not in captured
    lines = log_lines(captured)
    assert {"webhook.refused", "presented [redacted]"} <= {
        line["event"] for line in lines
    }


def test_exception_text_in_a_log_line_is_redacted(
    capfd: pytest.CaptureFixture[str],
) -> None:
    log = structlog.get_logger("tests.logging")

    try:
        refuse(TOKEN)
    except ValueError:
        log.exception("writer.failed")

    captured = capfd.readouterr().err
    assert "writer.failed" in captured
    assert TOKEN not in captured
