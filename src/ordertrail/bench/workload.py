"""The deliveries the benchmark sends, built once as raw HTTP/1.1 requests.

Items are spread over orders of three UPCs each, like carts. Request ``k``
reports item ``k mod items`` with the status of round ``k div items``, so
every item's stream moves through the statuses in order, concurrent requests
almost never share a stream, and no body repeats until every item has had
every status. Past that the cycle starts again and a repeated body counts as
a redelivery, as a Locally retry would.
"""

from __future__ import annotations

import msgspec

__all__ = ["ITEMS", "STATUSES", "build_requests", "webhook_bodies"]

# Enough for a whole run's rounds to send every body once at about 6,000
# deliveries a second: a body sent twice within the redelivery window is a
# retry, and the benchmarks measure new deliveries.
ITEMS = 60_000
STATUSES = ("ordered", "confirmed", "message", "refunded")
UPCS_PER_ORDER = 3

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ORDER_IDS = len(_ALPHABET) ** 6
# Multiplying by a number coprime with the modulus permutes it: order ids look
# scattered, like Locally's, yet two orders can never share one.
_ORDER_STRIDE = 1_000_003
_UPC_STRIDE = 7_919


class _Webhook(msgspec.Struct):
    upc: str
    order_id: str
    status: str
    order_url: str


def order_id(order: int) -> str:
    """Return the six-character cart id of order number ``order``."""
    value = (order * _ORDER_STRIDE + 12_345) % _ORDER_IDS
    digits = []
    for _ in range(6):
        value, digit = divmod(value, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def upc(item: int) -> str:
    """Return the twelve-digit UPC of item number ``item``."""
    # Consecutive items (the UPCs of one order) map to distinct products.
    return f"6018424{item * _UPC_STRIDE % 100_000:05d}"


def webhook_bodies(items: int = ITEMS) -> list[bytes]:
    """Return one JSON body per (status, item), in sending order."""
    encode = msgspec.json.Encoder().encode
    bodies = []
    for status in STATUSES:
        for item in range(items):
            cart = order_id(item // UPCS_PER_ORDER)
            bodies.append(
                encode(
                    _Webhook(
                        upc=upc(item),
                        order_id=cart,
                        status=status,
                        order_url=f"https://www.locally.com/api/v2/cart/{cart}",
                    )
                )
            )
    return bodies


def build_requests(
    bodies: list[bytes], *, host: str, port: int, path: str, token: str
) -> list[bytes]:
    """Return each body as a complete keep-alive POST to ``path``."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "User-Agent: ordertrail-bench\r\n"
        "Content-Type: application/json\r\n"
        f"locally-webhook-token: {token}\r\n"
        "Content-Length: "
    ).encode("latin-1")
    return [b"%s%d\r\n\r\n%s" % (head, len(body), body) for body in bodies]
