"""Roles, credential lifetimes and secret digests, without a database."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from ordertrail.auth.credentials import (
    Credential,
    CredentialKind,
    Role,
    bootstrap_token,
)
from ordertrail.lib.secrets import (
    API_KEY_PREFIX,
    WEBHOOK_TOKEN_PREFIX,
    digest,
    new_id,
    new_secret,
)

NOW = datetime(2026, 3, 14, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("role", "needed", "allowed"),
    [
        (Role.READER, Role.READER, True),
        (Role.READER, Role.AUDITOR, False),
        (Role.READER, Role.ADMIN, False),
        (Role.AUDITOR, Role.READER, True),
        (Role.AUDITOR, Role.AUDITOR, True),
        (Role.AUDITOR, Role.ADMIN, False),
        (Role.ADMIN, Role.READER, True),
        (Role.ADMIN, Role.AUDITOR, True),
        (Role.ADMIN, Role.ADMIN, True),
    ],
)
def test_each_role_includes_the_ones_before_it(
    role: Role, needed: Role, allowed: bool
) -> None:
    assert role.allows(needed) is allowed


def credential(
    *, expires_at: datetime | None = None, revoked_at: datetime | None = None
) -> Credential:
    return Credential(
        id="tok_1a2b3c4d",
        kind=CredentialKind.WEBHOOK_TOKEN,
        mode="live",
        role=None,
        label="",
        created_at=NOW - timedelta(days=1),
        expires_at=expires_at,
        revoked_at=revoked_at,
    )


def test_credential_is_active_until_it_expires() -> None:
    expiring = credential(expires_at=NOW + timedelta(seconds=1))

    assert credential().active(NOW)
    assert expiring.active(NOW)
    assert not expiring.active(NOW + timedelta(seconds=1))


def test_revoked_credential_is_inactive() -> None:
    assert not credential(revoked_at=NOW - timedelta(seconds=1)).active(NOW)


def test_secrets_carry_their_prefix_and_256_random_bits() -> None:
    token = new_secret(WEBHOOK_TOKEN_PREFIX)
    key = new_secret(API_KEY_PREFIX)

    assert token.startswith("otw_")
    assert key.startswith("otk_")
    # 32 random bytes in URL-safe base64 without padding are 43 characters.
    assert len(token) == len("otw_") + 43
    assert token != new_secret(WEBHOOK_TOKEN_PREFIX)


def test_ids_are_short_and_public() -> None:
    identifier = new_id("tok_")

    assert identifier.startswith("tok_")
    assert len(identifier) == len("tok_") + 8


def test_only_a_sha256_digest_of_a_secret_is_kept() -> None:
    assert digest("otw_abc") == hashlib.sha256(b"otw_abc").digest()


def test_bootstrap_token_is_an_active_webhook_token_of_its_mode() -> None:
    token, secret = bootstrap_token("test", "from-env")

    assert secret == "from-env"
    assert token.id == "env_test"
    assert token.kind is CredentialKind.WEBHOOK_TOKEN
    assert token.mode == "test"
    assert token.active(datetime.now(UTC))
