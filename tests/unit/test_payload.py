"""Decoding a Locally webhook body."""

from __future__ import annotations

import msgspec
import pytest

from ordertrail.ingest.payload import LocallyWebhook, decode_webhook


def test_locallys_example_payload_decodes() -> None:
    body = (
        b'{\n  "upc":"601842495575",\n  "order_id":"QE3QL6",\n  "status":"confirmed",\n'
        b'  "order_url":"https://www.locally.com/api/v2/cart/QE3QL6"\n}'
    )

    assert decode_webhook(body) == LocallyWebhook(
        upc="601842495575",
        order_id="QE3QL6",
        status="confirmed",
        order_url="https://www.locally.com/api/v2/cart/QE3QL6",
    )


def test_unknown_fields_are_ignored_and_order_url_is_optional() -> None:
    webhook = decode_webhook(
        b'{"status":"shipped","order_id":"Q","upc":"1","store_id":7,"extra":{"a":[1]}}'
    )

    assert webhook == LocallyWebhook(upc="1", order_id="Q", status="shipped")


def test_empty_status_is_a_fact_like_any_other() -> None:
    assert decode_webhook(b'{"upc":"1","order_id":"Q","status":""}').status == ""


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"upc=1&order_id=Q", "malformed"),
        (b"", "truncated"),
        (b"[]", "Expected `object`"),
        (b'{"upc":"1","status":"confirmed"}', "order_id"),
        (b'{"order_id":"Q","status":"confirmed"}', "upc"),
        (b'{"upc":"1","order_id":"Q"}', "status"),
        (b'{"upc":"1","order_id":123,"status":"confirmed"}', "$.order_id"),
        (b'{"upc":1,"order_id":"Q","status":"confirmed"}', "$.upc"),
        (b'{"upc":"1","order_id":"","status":"confirmed"}', "$.order_id"),
        (b'{"upc":"1","order_id":"Q","status":null}', "$.status"),
    ],
)
def test_unreadable_bodies_are_refused_with_a_reason(
    body: bytes, fragment: str
) -> None:
    with pytest.raises(msgspec.DecodeError) as raised:
        decode_webhook(body)

    assert fragment in str(raised.value)


def test_keys_longer_than_256_characters_are_refused() -> None:
    body = msgspec.json.encode({"upc": "1", "order_id": "Q" * 257, "status": "x"})

    with pytest.raises(msgspec.ValidationError, match="order_id"):
        decode_webhook(body)
