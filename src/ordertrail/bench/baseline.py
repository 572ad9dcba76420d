"""The smallest honest webhook receiver, to measure ordertrail against.

It takes the same requests on the same path and answers 202 after one plain
INSERT of the body in its own transaction: no authentication, no decoding, no
hash chain, no projection, no group commit. Its pool is built like the
service's (settings in the startup packet, no per-release reset), so the
difference between the two is ordertrail's own work, not pool overhead.

``POST /http-only`` reads the body and answers 202 without touching the
database: the ceiling of litestar and granian alone on this machine.

For the read benchmark, ``GET /items/{order_id}/{upc}`` answers one item row
read by its primary key, and ``GET /changes`` one page of the change feed's
query, each returned as the database gave it: no API key, no conversion into
the view's type, no ETag. They read the served item view, like ordertrail.

Served by the benchmark with ``granian --factory
ordertrail.bench.baseline:create_app``; the database comes from
``ORDERTRAIL_DATABASE_URL``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import NotFoundException

from ordertrail.db.connection import SERVER_SETTINGS
from ordertrail.lib.settings import Settings
from ordertrail.projections.items import VIEW_COLUMNS

__all__ = ["BASELINE_TABLE", "create_app"]

BASELINE_TABLE = "bench_baseline_deliveries"

_CREATE_TABLE = f"""
    CREATE TABLE IF NOT EXISTS {BASELINE_TABLE} (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        received_at timestamptz NOT NULL DEFAULT now(),
        raw_body    bytea       NOT NULL
    )
"""

_INSERT = f"INSERT INTO {BASELINE_TABLE} (raw_body) VALUES ($1)"

# The same columns and conditions as ordertrail's own queries, so that the
# comparison is between the handlers around them.
_COLUMNS = ", ".join(VIEW_COLUMNS)
_ITEM = (
    f"SELECT {_COLUMNS} FROM item_view WHERE order_id = $1 AND mode = $2 AND upc = $3"
)
_PAGE = f"""
    SELECT {_COLUMNS}, change_xid FROM item_view
    WHERE mode = $1
      AND (change_xid, position) > ($2::text::xid8, $3)
      AND change_xid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY change_xid, position
    LIMIT $4
"""


async def _keep_session(_connection: asyncpg.Connection) -> None:
    # Same reason as the service's pool: nothing here leaves session state
    # behind, and the default reset would cost a third of each append.
    return None


@post("/webhooks/locally", status_code=202)
async def insert_delivery(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Store the body with one INSERT, then answer 202."""
    body = await request.body()
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as connection:
        await connection.execute(_INSERT, body)
    return Response(b"", status_code=202)


@post("/http-only", status_code=202)
async def http_only(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Read the body and answer 202 without touching the database."""
    await request.body()
    return Response(b"", status_code=202)


@get("/items/{order_id:str}/{upc:str}")
async def item_row(
    request: Request[Any, Any, Any], order_id: str, upc: str
) -> dict[str, Any]:
    """Return one live item's row, read by its primary key."""
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as connection:
        row = await connection.fetchrow(_ITEM, order_id, "live", upc)
    if row is None:
        raise NotFoundException
    return dict(row.items())


@get("/changes")
async def change_page(
    request: Request[Any, Any, Any], xid: int = 0, position: int = 0, limit: int = 100
) -> dict[str, Any]:
    """Return the live rows changed after ``(xid, position)``, in feed order."""
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as connection:
        rows = await connection.fetch(_PAGE, "live", str(xid), position, limit)
    last = (rows[-1]["change_xid"], rows[-1]["position"]) if rows else (xid, position)
    return {
        "changes": [dict(row.items()) for row in rows],
        "next": list(last),
        "more": len(rows) == limit,
    }


@get("/health/live")
async def live() -> dict[str, str]:
    """Answer once the lifespan (and so the pool) is up."""
    return {"status": "live"}


def create_app() -> Litestar:
    """Build the baseline application; its pool opens when it starts."""
    settings = Settings.from_env()
    if not settings.database_url:
        msg = "the baseline needs ORDERTRAIL_DATABASE_URL"
        raise RuntimeError(msg)
    dsn = settings.database_url

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            reset=_keep_session,
            server_settings=SERVER_SETTINGS,
        )
        try:
            async with pool.acquire() as connection:
                await connection.execute(_CREATE_TABLE)
            app.state.pool = pool
            yield
        finally:
            await pool.close()

    return Litestar(
        route_handlers=[insert_delivery, http_only, item_row, change_page, live],
        lifespan=[lifespan],
        debug=False,
        logging_config=None,
        openapi_config=None,
    )
