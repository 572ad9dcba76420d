"""Typed settings read once from ``ORDERTRAIL_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

__all__ = ["PREFIX", "Settings", "SettingsError", "default_data_dir"]

PREFIX = "ORDERTRAIL_"

Mode = Literal["live", "test"]


class SettingsError(ValueError):
    """An ``ORDERTRAIL_*`` variable holds a value the service cannot use."""


def default_data_dir() -> Path:
    """Return where the embedded PostgreSQL keeps its data between runs."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ordertrail"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the service can be told from its environment.

    Each field is read from the variable of the same name in upper case with
    the ``ORDERTRAIL_`` prefix, for example ``ORDERTRAIL_DATABASE_URL``.
    """

    database_url: str | None = None
    """External PostgreSQL; unset starts the embedded server in ``data_dir``."""
    read_database_url: str | None = None
    """A streaming replica of ``database_url`` that answers the read endpoints.

    Unset, reads go to ``database_url``. Webhooks, credentials, projections
    and the feed's notifications stay on the primary. Reads see a webhook as
    soon as it is acknowledged only if the primary commits with
    ``synchronous_commit = remote_apply`` and names this replica in
    ``synchronous_standby_names``.
    """
    data_dir: str = msgspec.field(default_factory=lambda: str(default_data_dir()))
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    log_format: Literal["json", "console"] = "json"
    body_limit: int = 64 * 1024
    """Largest webhook body accepted, in bytes."""
    redelivery_window: float = 120.0
    """Seconds within which an identical body for the same item is a retry."""
    commit_delay: float = 0.002
    """Seconds the writer waits to gather concurrent appends into one commit."""
    commit_batch: int = 256
    """Most appends that share one commit."""
    pool_min: int = 2
    pool_max: int = 10
    vocabulary_file: str | None = None
    """An operator's status vocabulary; unset uses the one shipped."""
    webhook_token_live: str | None = None
    """A bootstrap live webhook token, accepted besides the stored ones."""
    webhook_token_test: str | None = None
    """A bootstrap test webhook token, accepted besides the stored ones."""
    trusted_client_header: str | None = None
    """Header holding the client address when a trusted proxy sets it."""
    key_rate: float = 50.0
    """Requests a second one API key may make; 0 turns the limit off."""
    key_burst: float = 100.0
    """Requests an API key may make at once before its rate applies."""
    failure_rate: float = 1.0
    """Failed authentications a second from one client address; 0 is no limit."""
    failure_burst: float = 20.0
    """Failed authentications one address may make at once."""
    cors_origins: str | None = None
    """Comma-separated origins allowed to read from browsers; unset: no CORS."""
    audit_key: str | None = None
    """Secret that signs audit checkpoints (HMAC-SHA256), 32 characters or more.

    Unset, checkpoints cannot be recorded and their signatures not checked.
    """

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (the process environment)."""
        source = os.environ if environ is None else environ
        raw = {
            name: source[PREFIX + name.upper()]
            for name in cls.__struct_fields__
            if PREFIX + name.upper() in source
        }
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as error:
            raise SettingsError(_explain(error)) from None

    @property
    def pgdata(self) -> Path:
        """The embedded server's data directory."""
        return Path(self.data_dir).expanduser() / "pgdata"


def _explain(error: msgspec.ValidationError) -> str:
    # msgspec names the field as "$.field"; name the variable instead.
    message = str(error)
    marker = "at `$."
    if marker in message:
        field = message.rsplit(marker, 1)[1].rstrip("`")
        message = f"{PREFIX}{field.upper()}: {message.split(' - at', maxsplit=1)[0]}"
    return message
