"""Opaque paging cursors: what a client hands back to continue a listing.

A cursor is the URL-safe base64 of a small JSON array tagged with its kind,
so a change-feed cursor cannot be passed to the item listing by mistake, and
anything a client makes up is refused with a clear 400.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgspec

from ordertrail.api.problems import ProblemError

__all__ = ["decode_cursor", "encode_cursor"]


def encode_cursor(kind: str, *parts: int | str) -> str:
    """Return the cursor for a place in a listing of ``kind``."""
    raw = msgspec.json.encode([kind, *parts])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(
    cursor: str, kind: str, types: tuple[type, ...], *, parameter: str
) -> tuple[Any, ...]:
    """Return the parts of a cursor of ``kind``, of ``types``; refuse others."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        decoded = msgspec.json.decode(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (binascii.Error, UnicodeEncodeError, ValueError, msgspec.DecodeError):
        decoded = None
    if not _fits(decoded, kind, types):
        raise ProblemError(
            400,
            "invalid-cursor",
            "The cursor is not one this listing handed out",
            f"pass back the {parameter!r} value from an earlier answer, unchanged",
            parameter=parameter,
        )
    return tuple(decoded[1:])


def _fits(decoded: Any, kind: str, types: tuple[type, ...]) -> bool:
    return (
        isinstance(decoded, list)
        and len(decoded) == len(types) + 1
        and decoded[0] == kind
        # bool is an int to isinstance; a cursor never holds one.
        and all(
            isinstance(part, kind_of) and not isinstance(part, bool)
            for part, kind_of in zip(decoded[1:], types, strict=True)
        )
    )
