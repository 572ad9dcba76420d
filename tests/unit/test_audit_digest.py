"""The heads digest and checkpoint signature, as a third party would compute them."""

from __future__ import annotations

import hashlib
import hmac
import struct
from datetime import UTC, datetime

import pytest

from ordertrail.audit.digest import (
    AuditKey,
    AuditKeyError,
    HeadsDigest,
    checkpoint_message,
)

KEY = "k" * 40
CREATED = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def spec_field(value: bytes) -> bytes:
    """A field as the docstring specifies it, written independently."""
    return struct.pack(">I", len(value)) + value


def spec_digest(heads: list[tuple[str, str, str, int, bytes]]) -> bytes:
    """The heads digest as the docstring specifies it, written independently."""
    data = spec_field(b"ordertrail.heads.v1")
    for mode, order_id, upc, version, head in sorted(
        heads, key=lambda h: tuple(part.encode("utf-8") for part in h[:3])
    ):
        data += b"".join(
            spec_field(part)
            for part in (
                mode.encode(),
                order_id.encode(),
                upc.encode(),
                str(version).encode(),
                head,
            )
        )
    return hashlib.sha256(data).digest()


HEADS = [
    ("live", "A1", "601842495575", 3, bytes(range(32))),
    ("live", "A1", "601842495576", 1, b"\xff" * 32),
    ("live", "Ä9", "1", 12, b"\x01" * 32),
    ("test", "A1", "601842495575", 2, b"\x02" * 32),
]


def test_the_heads_digest_follows_the_documented_encoding() -> None:
    digest = HeadsDigest()
    for head in sorted(HEADS):
        digest.add(*head)

    assert digest.digest() == spec_digest(HEADS)
    assert digest.count == len(HEADS)


def test_no_streams_hash_to_the_tag_alone() -> None:
    expected = hashlib.sha256(spec_field(b"ordertrail.heads.v1")).digest()

    assert HeadsDigest().digest() == expected


def test_heads_out_of_order_are_refused() -> None:
    digest = HeadsDigest()
    digest.add("live", "B", "1", 1, bytes(32))

    with pytest.raises(ValueError, match="ascending"):
        digest.add("live", "A", "1", 1, bytes(32))


def test_a_repeated_stream_is_refused() -> None:
    digest = HeadsDigest()
    digest.add("live", "A", "1", 1, bytes(32))

    with pytest.raises(ValueError, match="ascending"):
        digest.add("live", "A", "1", 2, bytes(32))


def test_the_signature_is_the_documented_hmac() -> None:
    digest = spec_digest(HEADS)
    message = b"".join(
        spec_field(part)
        for part in (
            b"ordertrail.checkpoint.v1",
            b"812",
            b"4",
            digest,
            b"2025-03-01T12:00:00.123456Z",
        )
    )
    expected = hmac.new(KEY.encode(), message, hashlib.sha256).digest()

    assert checkpoint_message(812, 4, digest, CREATED) == message
    assert AuditKey(KEY).sign(812, 4, digest, CREATED) == expected


def test_a_signature_holds_only_for_what_was_signed() -> None:
    key = AuditKey(KEY)
    digest = spec_digest(HEADS)
    signature = key.sign(812, 4, digest, CREATED)

    assert key.signed(signature, 812, 4, digest, CREATED)
    assert not key.signed(signature, 813, 4, digest, CREATED)
    assert not key.signed(signature, 812, 3, digest, CREATED)
    assert not key.signed(signature, 812, 4, bytes(32), CREATED)
    assert not AuditKey("m" * 40).signed(signature, 812, 4, digest, CREATED)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(AuditKeyError, match="at least 32"):
        AuditKey("too short")


def test_an_unset_key_is_none() -> None:
    assert AuditKey.configured(None) is None
    assert AuditKey.configured("") is None


def test_the_key_never_shows_and_its_id_names_it() -> None:
    key = AuditKey(KEY)
    expected_id = hmac.new(
        KEY.encode(), b"ordertrail.audit.key-id", hashlib.sha256
    ).hexdigest()[:16]

    assert KEY not in repr(key)
    assert key.key_id == expected_id
    assert AuditKey("m" * 40).key_id != key.key_id
