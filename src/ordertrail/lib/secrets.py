"""Generation and digests of webhook tokens and API keys."""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["API_KEY_PREFIX", "WEBHOOK_TOKEN_PREFIX", "digest", "new_id", "new_secret"]

WEBHOOK_TOKEN_PREFIX = "otw_"  # noqa: S105 - a prefix, not a secret
API_KEY_PREFIX = "otk_"


def new_secret(prefix: str) -> str:
    """Return a fresh secret: the prefix and 256 random bits, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    """Return a short public identifier for a credential."""
    return prefix + secrets.token_hex(4)


def digest(secret: str) -> bytes:
    """Return the SHA-256 digest under which a secret is stored."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
