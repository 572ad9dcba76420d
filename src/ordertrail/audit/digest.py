"""The digest of every stream head, and the signature that makes it evidence.

Every value below is written as a *field*: a 4-byte big-endian length, then
the value's bytes, exactly as in the event hash (``eventstore/hashing.py``).
Text is UTF-8; integers are decimal ASCII without sign or leading zeros;
hashes and digests are their raw 32 bytes.

Heads digest. ``SHA-256`` over the concatenation of:

1. the field ``ordertrail.heads.v1``;
2. for each stream, in ascending order of ``(mode, order_id, upc)`` compared
   as UTF-8 byte strings (mode first, then order id, then UPC), the fields
   mode, order_id, upc, head version, head hash.

A stream's head is its event of highest version at or below the checkpoint's
position. The digest of no streams at all is the hash of the first field
alone. An export that covers positions 1 to P of both modes carries in its
summary the heads from which the same digest follows.

Checkpoint signature. ``HMAC-SHA256`` keyed with the UTF-8 bytes of
``ORDERTRAIL_AUDIT_KEY``, over the concatenation of the fields:

1. ``ordertrail.checkpoint.v1``;
2. the checkpoint's position;
3. its stream count;
4. the heads digest (32 bytes);
5. its creation time in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.

Key id. The first 8 bytes, in lowercase hex, of ``HMAC-SHA256(key,
"ordertrail.audit.key-id")``: it tells which key signed a checkpoint without
revealing anything about the key.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime

from ordertrail.eventstore.hashing import format_received_at

__all__ = [
    "MINIMUM_KEY_LENGTH",
    "AuditKey",
    "AuditKeyError",
    "HeadsDigest",
    "checkpoint_message",
    "entry",
    "field",
]

MINIMUM_KEY_LENGTH = 32
"""Characters an audit key needs at least: short keys can be guessed offline."""

_HEADS_TAG = b"ordertrail.heads.v1"
_CHECKPOINT_TAG = b"ordertrail.checkpoint.v1"
_KEY_ID_LABEL = b"ordertrail.audit.key-id"


def field(value: bytes) -> bytes:
    """Return ``value`` as a field: its 4-byte big-endian length, then itself."""
    return len(value).to_bytes(4, "big") + value


class HeadsDigest:
    """Accumulates stream heads, in stream order, into the heads digest."""

    __slots__ = ("_hash", "_last", "count")

    def __init__(self) -> None:
        self._hash = hashlib.sha256(field(_HEADS_TAG))
        self._last: tuple[str, str, str] | None = None
        self.count = 0
        """How many heads were added."""

    def add(
        self, mode: str, order_id: str, upc: str, version: int, head: bytes
    ) -> None:
        """Add a stream's head; streams must come in ascending key order.

        Python compares strings by code point, which is the UTF-8 byte order
        the encoding names, so the check needs no encoding.
        """
        key = (mode, order_id, upc)
        if self._last is not None and key <= self._last:
            msg = f"stream {key} comes after {self._last}: heads must be ascending"
            raise ValueError(msg)
        self._last = key
        self._hash.update(entry(mode, order_id, upc, version, head))
        self.count += 1

    def add_entry(self, key: tuple[str, str, str], encoded: bytes) -> None:
        """Add a head already encoded by ``entry`` (saves encoding it twice)."""
        if self._last is not None and key <= self._last:
            msg = f"stream {key} comes after {self._last}: heads must be ascending"
            raise ValueError(msg)
        self._last = key
        self._hash.update(encoded)
        self.count += 1

    def digest(self) -> bytes:
        """Return the digest of the heads added so far."""
        return self._hash.digest()


def entry(mode: str, order_id: str, upc: str, version: int, head: bytes) -> bytes:
    """Return one stream's contribution to the heads digest."""
    return b"".join(
        (
            field(mode.encode()),
            field(order_id.encode()),
            field(upc.encode()),
            field(str(version).encode()),
            field(head),
        )
    )


def checkpoint_message(
    position: int, stream_count: int, digest: bytes, created_at: datetime
) -> bytes:
    """Return the bytes a checkpoint's signature covers."""
    return b"".join(
        (
            field(_CHECKPOINT_TAG),
            field(str(position).encode()),
            field(str(stream_count).encode()),
            field(digest),
            field(format_received_at(created_at).encode()),
        )
    )


class AuditKeyError(ValueError):
    """The configured audit key cannot be used."""


class AuditKey:
    """The secret that signs checkpoints; it never shows in a repr or a log."""

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: str) -> None:
        if len(secret) < MINIMUM_KEY_LENGTH:
            msg = (
                f"ORDERTRAIL_AUDIT_KEY must be at least {MINIMUM_KEY_LENGTH} "
                "characters long"
            )
            raise AuditKeyError(msg)
        self._secret = secret.encode()
        self.key_id = hmac.new(self._secret, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[
            :16
        ]
        """Names the key without revealing it (see the module docstring)."""

    @classmethod
    def configured(cls, secret: str | None) -> AuditKey | None:
        """Return the key from a setting's value, or ``None`` when unset."""
        return cls(secret) if secret else None

    def __repr__(self) -> str:
        return f"AuditKey(key_id={self.key_id!r})"

    def sign(
        self, position: int, stream_count: int, digest: bytes, created_at: datetime
    ) -> bytes:
        """Return the signature of a checkpoint."""
        message = checkpoint_message(position, stream_count, digest, created_at)
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def signed(
        self,
        signature: bytes,
        position: int,
        stream_count: int,
        digest: bytes,
        created_at: datetime,
    ) -> bool:
        """Return whether ``signature`` is this key's signature of a checkpoint."""
        expected = self.sign(position, stream_count, digest, created_at)
        return hmac.compare_digest(expected, signature)
