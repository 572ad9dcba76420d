"""Webhook tokens (for Locally) and API keys (for readers), kept as digests.

A webhook token belongs to a mode: Locally's live and test connectivity each
have their own. An API key carries a role. Either can expire and be revoked;
a rotation is: create the new one, hand it over, revoke the old one.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import structlog

from ordertrail.db.connection import Connection
from ordertrail.lib.limits import RateLimiter
from ordertrail.lib.secrets import (
    API_KEY_PREFIX,
    WEBHOOK_TOKEN_PREFIX,
    digest,
    new_id,
    new_secret,
)

__all__ = [
    "CREDENTIALS_CHANNEL",
    "Credential",
    "CredentialCache",
    "CredentialKind",
    "Issued",
    "Role",
    "create_credential",
    "list_credentials",
    "revoke_credential",
]

log = structlog.get_logger("ordertrail.auth")

CREDENTIALS_CHANNEL = "ordertrail_credentials"

# A reload that raises one of these could not reach the database. (asyncpg
# raises InternalClientError for a query on a connection the server ended a
# moment before, while it sat idle.)
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_RELOAD_RETRY_SECONDS = 1.0


class CredentialKind(enum.StrEnum):
    """What a credential opens."""

    WEBHOOK_TOKEN = "webhook_token"  # noqa: S105 - a kind, not a secret
    API_KEY = "api_key"


class Role(enum.StrEnum):
    """What an API key may read. Each role includes the ones before it."""

    READER = "reader"
    AUDITOR = "auditor"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        """Return whether this role may do what ``needed`` may do."""
        order = (Role.READER, Role.AUDITOR, Role.ADMIN)
        return order.index(self) >= order.index(needed)


class Credential(msgspec.Struct, frozen=True, kw_only=True):
    """A stored credential, without its secret."""

    id: str
    kind: CredentialKind
    mode: str | None
    role: Role | None
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        """Return whether the credential opens anything at ``now``."""
        return self.revoked_at is None and (
            self.expires_at is None or now < self.expires_at
        )


class Issued(msgspec.Struct, frozen=True):
    """A credential just created, with its secret, shown this once."""

    credential: Credential
    secret: str


_PREFIXES = {
    CredentialKind.WEBHOOK_TOKEN: ("tok_", WEBHOOK_TOKEN_PREFIX),
    CredentialKind.API_KEY: ("key_", API_KEY_PREFIX),
}

_SELECT = (
    "SELECT id, kind, mode, role, label, created_at, expires_at, revoked_at, "
    "last_used_at FROM credentials"
)


async def create_credential(
    connection: Connection,
    kind: CredentialKind,
    *,
    mode: str | None = None,
    role: Role | None = None,
    label: str = "",
    expires_in: timedelta | None = None,
    secret: str | None = None,
) -> Issued:
    """Create a credential; generate its secret unless one is given.

    A given secret is how a token that Locally Station generated is adopted.
    """
    id_prefix, secret_prefix = _PREFIXES[kind]
    secret = secret if secret is not None else new_secret(secret_prefix)
    expires_at = datetime.now(UTC) + expires_in if expires_in is not None else None
    row = await connection.fetchrow(
        "INSERT INTO credentials "
        "(id, kind, mode, role, label, secret_sha256, expires_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "RETURNING id, kind, mode, role, label, created_at, expires_at, revoked_at, "
        "last_used_at",
        new_id(id_prefix),
        kind.value,
        mode,
        role.value if role else None,
        label,
        digest(secret),
        expires_at,
    )
    assert row is not None
    log.info(
        "credential.created",
        credential_id=row["id"],
        kind=kind.value,
        mode=mode,
        role=role.value if role else None,
    )
    return Issued(_credential(row), secret)


async def list_credentials(
    connection: Connection, kind: CredentialKind
) -> list[Credential]:
    """Return every credential of ``kind``, newest first."""
    rows = await connection.fetch(
        f"{_SELECT} WHERE kind = $1 ORDER BY created_at DESC, id", kind.value
    )
    return [_credential(row) for row in rows]


async def revoke_credential(
    connection: Connection, kind: CredentialKind, credential_id: str
) -> Credential | None:
    """Revoke a credential now; return it, or ``None`` if there is none."""
    row = await connection.fetchrow(
        "UPDATE credentials SET revoked_at = coalesce(revoked_at, now()) "
        "WHERE id = $1 AND kind = $2 "
        "RETURNING id, kind, mode, role, label, created_at, expires_at, revoked_at, "
        "last_used_at",
        credential_id,
        kind.value,
    )
    if row is None:
        return None
    log.info("credential.revoked", credential_id=credential_id, kind=kind.value)
    return _credential(row)


def _credential(row: asyncpg.Record) -> Credential:
    return msgspec.convert(dict(row.items()), Credential)


class _Entry:
    __slots__ = ("credential", "secret_sha256")

    def __init__(self, credential: Credential, secret_sha256: bytes) -> None:
        self.credential = credential
        self.secret_sha256 = secret_sha256


class CredentialCache:
    """The active credentials, held in memory and checked in constant time.

    The cache reloads when the database announces a change (create, revoke)
    and every ``refresh_interval`` seconds regardless. A secret it does not
    know is looked up by its digest (one index probe), so a token created a
    moment ago works before the announcement arrives; those look-ups are
    limited to ``miss_rate`` a second, so a flood of wrong tokens costs the
    database little.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        bootstrap: Sequence[tuple[Credential, str]] = (),
        refresh_interval: float = 30.0,
        miss_rate: float = 20.0,
    ) -> None:
        self._pool = pool
        self._bootstrap = [_Entry(c, digest(secret)) for c, secret in bootstrap]
        self._entries: dict[CredentialKind, dict[bytes, _Entry]] = {
            kind: {} for kind in CredentialKind
        }
        self._loaded_at = 0.0
        self._refresh_interval = refresh_interval
        self._misses = RateLimiter(miss_rate, miss_rate)
        self._reload_lock = asyncio.Lock()
        self._used: set[str] = set()

    async def reload(self) -> None:
        """Read the active credentials from the database."""
        async with self._reload_lock:
            async with self._pool.acquire() as connection:
                rows = await connection.fetch(
                    f"{_SELECT.replace('FROM', ', secret_sha256 FROM')} "
                    "WHERE revoked_at IS NULL "
                    "AND (expires_at IS NULL OR expires_at > now())"
                )
            entries: dict[CredentialKind, dict[bytes, _Entry]] = {
                kind: {} for kind in CredentialKind
            }
            for entry in self._bootstrap:
                entries[entry.credential.kind][entry.secret_sha256] = entry
            for row in rows:
                values = dict(row.items())
                secret_sha256 = values.pop("secret_sha256")
                credential = msgspec.convert(values, Credential)
                entries[credential.kind][secret_sha256] = _Entry(
                    credential, secret_sha256
                )
            self._entries = entries
            self._loaded_at = time.monotonic()

    async def _reload_or_keep(self) -> None:
        try:
            await self.reload()
        except _UNAVAILABLE as error:
            # With the database out of reach, what was loaded is still the
            # best answer: refusing every credential, or failing every check,
            # would turn an outage into 401s or 500s. A delivery with a valid
            # token goes on to the writer and answers 503, so Locally retries.
            # The next attempt waits a moment rather than come with each check.
            self._loaded_at = (
                time.monotonic() - self._refresh_interval + _RELOAD_RETRY_SECONDS
            )
            log.warning("credentials.reload_failed", error=str(error))

    def invalidate(self) -> None:
        """Make the next check reload (a change was announced)."""
        self._loaded_at = 0.0

    async def verify(
        self, presented: str | None, kind: CredentialKind
    ) -> Credential | None:
        """Return the active credential whose secret is ``presented``, if any."""
        if not presented:
            return None
        age = time.monotonic() - self._loaded_at
        if age > self._refresh_interval:
            await self._reload_or_keep()
        found = self._match(presented, kind)
        if found is None and self._misses.take("miss") is None:
            found = await self._look_up(presented, kind)
        if found is not None:
            self._used.add(found.id)
        return found

    async def _look_up(self, presented: str, kind: CredentialKind) -> Credential | None:
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(
                f"{_SELECT} WHERE secret_sha256 = $1 AND kind = $2 "
                "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
                digest(presented),
                kind.value,
            )
        if row is None:
            return None
        # Known now: the next reload (announced or periodic) caches it.
        self.invalidate()
        return _credential(row)

    def _match(self, presented: str, kind: CredentialKind) -> Credential | None:
        # Secrets are found by the SHA-256 of the whole secret, never compared
        # as text: how long the look-up takes depends on that digest, which
        # shares nothing with how much of a guess was right. The look-up stays
        # one probe however many keys there are.
        presented_sha256 = digest(presented)
        entry = self._entries[kind].get(presented_sha256)
        if entry is None or not hmac.compare_digest(
            entry.secret_sha256, presented_sha256
        ):
            return None
        found = entry.credential
        return found if found.active(datetime.now(UTC)) else None

    async def record_use(self) -> None:
        """Write the last-used time of credentials used since the last call."""
        used = [i for i in self._used if not i.startswith("env_")]
        self._used.clear()
        if used:
            async with self._pool.acquire() as connection:
                await connection.execute(
                    "UPDATE credentials SET last_used_at = now() "
                    "WHERE id = ANY($1::text[])",
                    used,
                )


def bootstrap_token(mode: str, secret: str) -> tuple[Credential, str]:
    """Return a webhook token given in the environment, as a credential."""
    credential = Credential(
        id=f"env_{mode}",
        kind=CredentialKind.WEBHOOK_TOKEN,
        mode=mode,
        role=None,
        label="from the environment",
        created_at=datetime.now(UTC),
        expires_at=None,
        revoked_at=None,
    )
    return credential, secret
