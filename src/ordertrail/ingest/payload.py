"""The shape of a Locally webhook body."""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["LocallyWebhook", "decode_webhook"]

_Key = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class LocallyWebhook(msgspec.Struct, frozen=True):
    """A cart item status webhook, as Locally documents it.

    Only the fields ordertrail needs are read; any other field Locally adds
    stays in the stored raw body untouched.
    """

    upc: _Key
    """The item's UPC."""
    order_id: _Key
    """Locally's cart (order) id."""
    status: Annotated[str, msgspec.Meta(max_length=256)]
    """The status string, kept verbatim; its meaning is assigned by projections."""
    order_url: str | None = None
    """Locally's API address of the cart."""

    def __post_init__(self) -> None:
        # PostgreSQL text cannot hold NUL, and UTF-8 cannot hold an unpaired
        # surrogate; such a body is kept in quarantine (its raw bytes are
        # fine there), not retried forever as a failed append.
        for name in ("upc", "order_id", "status", "order_url"):
            value = getattr(self, name)
            if value is not None and not _storable(value):
                msg = f"`{name}` holds a NUL character or an unpaired surrogate"
                raise ValueError(msg)


def _storable(text: str) -> bool:
    if text.isascii():
        return "\x00" not in text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


_decoder = msgspec.json.Decoder(LocallyWebhook)


def decode_webhook(body: bytes) -> LocallyWebhook:
    """Decode a raw body; raise ``msgspec.DecodeError`` if it is not a webhook."""
    try:
        return _decoder.decode(body)
    except RecursionError:
        # Even a field ordertrail does not read is walked to its end, and the
        # decoder follows nesting only as deep as the interpreter's recursion
        # limit allows (several hundred levels). Such a body is kept in
        # quarantine like any other that cannot be read, not answered 500.
        msg = "JSON is nested too deeply to read"
        raise msgspec.DecodeError(msg) from None
