"""The per-stream hash chain that makes the log tamper-evident.

Each event's hash is ``SHA-256(previous_hash || canonical(event))``, where
``previous_hash`` is the hash of the stream's previous event, or 32 zero bytes
for its first. ``canonical(event)`` is the concatenation of these fields, in
this order, each written as a 4-byte big-endian length and then its bytes:

1. the literal ``ordertrail.event.v1``
2. mode (``live`` or ``test``), UTF-8
3. order_id, UTF-8
4. upc, UTF-8
5. stream version, decimal ASCII
6. event type, UTF-8
7. raw status, UTF-8
8. raw body, the bytes exactly as received
9. received_at in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (always six digits)

Anyone holding an export can recompute every chain with this description.
"""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime

__all__ = ["GENESIS", "canonical", "chain_hash", "format_received_at"]

GENESIS = bytes(32)
_TAG = b"ordertrail.event.v1"
_length = struct.Struct(">I").pack
"""A field's length as 4 bytes, big-endian."""
_FRAMED_TAG = _length(len(_TAG)) + _TAG


def format_received_at(received_at: datetime) -> str:
    """Return the canonical text of a receive time."""
    return received_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(
    *,
    mode: str,
    order_id: str,
    upc: str,
    version: int,
    event_type: str,
    raw_status: str,
    raw_body: bytes,
    received_at: datetime,
) -> bytes:
    """Return the canonical encoding of an event (see the module docstring)."""
    # One join of the framed fields: each event of every delivery is hashed.
    mode_, order_, upc_, version_, type_, status_, received_ = (
        mode.encode(),
        order_id.encode(),
        upc.encode(),
        str(version).encode(),
        event_type.encode(),
        raw_status.encode(),
        format_received_at(received_at).encode(),
    )
    return b"".join(
        (
            _FRAMED_TAG,
            _length(len(mode_)),
            mode_,
            _length(len(order_)),
            order_,
            _length(len(upc_)),
            upc_,
            _length(len(version_)),
            version_,
            _length(len(type_)),
            type_,
            _length(len(status_)),
            status_,
            _length(len(raw_body)),
            raw_body,
            _length(len(received_)),
            received_,
        )
    )


def chain_hash(previous_hash: bytes, canonical_event: bytes) -> bytes:
    """Return the hash of an event that follows ``previous_hash``."""
    return hashlib.sha256(previous_hash + canonical_event).digest()
