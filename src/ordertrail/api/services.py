"""The running service's parts, built in the app's lifespan and shared."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import structlog

from ordertrail.api.revalidation import StampReader
from ordertrail.auth.credentials import (
    CREDENTIALS_CHANNEL,
    CredentialCache,
    bootstrap_token,
)
from ordertrail.db.connection import create_pool, database_url
from ordertrail.db.migrate import apply_migrations, pending
from ordertrail.db.replica import ReadReplica
from ordertrail.domain.vocabulary import Vocabulary
from ordertrail.eventstore.notifications import Listener, PositionSignal
from ordertrail.eventstore.store import EVENTS_CHANNEL, EventStore
from ordertrail.ingest.writer import GroupCommitWriter
from ordertrail.lib.limits import RateLimiter
from ordertrail.lib.settings import Settings
from ordertrail.projections import catalogue
from ordertrail.projections.catalogue import PROJECTIONS_CHANNEL, adopt_vocabulary
from ordertrail.projections.feed import FeedHead
from ordertrail.projections.items import PROJECTION_NAME, ItemProjection
from ordertrail.projections.served import ServedProjection
from ordertrail.projections.supervisor import RunnerSupervisor

__all__ = ["Services", "running_services"]

log = structlog.get_logger("ordertrail.service")


@dataclass
class Services:
    """Everything a request handler may need, created once per process."""

    settings: Settings
    dsn: str
    pool: asyncpg.Pool
    reads: asyncpg.Pool
    """Where read endpoints query: ``pool`` itself unless a replica is set."""
    stamps: StampReader
    """Item stamps for revalidations, read from ``reads``."""
    store: EventStore
    vocabulary: Vocabulary
    served: ServedProjection
    writer: GroupCommitWriter
    credentials: CredentialCache
    listener: Listener
    appended: PositionSignal
    feed: FeedHead
    key_limits: RateLimiter
    failure_limits: RateLimiter
    projections_changed: PositionSignal
    runner: RunnerSupervisor
    replica: ReadReplica | None = None
    """The replica ``reads`` is on, when one is set; ``None`` reads the primary."""
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def projection(self) -> ItemProjection:
        """The served item projection (as of the last append or start-up)."""
        current = self.served.current
        if current is None:
            msg = "the served projection is loaded at start-up"
            raise RuntimeError(msg)
        return current

    async def migrations_current(self) -> bool:
        """Return whether every migration the code ships is applied."""
        async with self.pool.acquire() as connection:
            return not await pending(connection)


@contextlib.asynccontextmanager
async def running_services(settings: Settings) -> AsyncIterator[Services]:
    """Start the database pool, listener and writer; stop them on exit."""
    with database_url(settings) as dsn:
        pool = await create_pool(
            dsn, min_size=settings.pool_min, max_size=settings.pool_max
        )
        try:
            async with pool.acquire() as connection:
                await apply_migrations(connection)
            async with _read_pool(settings, pool) as reads:
                services = _assemble(settings, dsn, pool, reads)
                await _start(services)
                try:
                    yield services
                finally:
                    await _stop(services)
        finally:
            await pool.close()


@contextlib.asynccontextmanager
async def _read_pool(
    settings: Settings, pool: asyncpg.Pool
) -> AsyncIterator[asyncpg.Pool]:
    if settings.read_database_url is None:
        yield pool
        return
    # The replica's pool connects only when a read needs it: the service
    # starts, and takes webhooks, while the replica is down.
    reads = await create_pool(
        settings.read_database_url, min_size=0, max_size=settings.pool_max
    )
    try:
        yield reads
    finally:
        await reads.close()


def _assemble(
    settings: Settings, dsn: str, pool: asyncpg.Pool, reads: asyncpg.Pool
) -> Services:
    vocabulary = Vocabulary.load(settings.vocabulary_file)
    store = EventStore(redelivery_window=settings.redelivery_window)
    served = ServedProjection(store, vocabulary)
    bootstrap = [
        bootstrap_token(mode, secret)
        for mode, secret in (
            ("live", settings.webhook_token_live),
            ("test", settings.webhook_token_test),
        )
        if secret
    ]
    appended = PositionSignal()
    projections_changed = PositionSignal()
    replica = ReadReplica(pool, reads) if reads is not pool else None
    return Services(
        settings=settings,
        dsn=dsn,
        pool=pool,
        reads=reads,
        stamps=StampReader(reads),
        store=store,
        vocabulary=vocabulary,
        served=served,
        writer=GroupCommitWriter(
            pool,
            store,
            served,
            commit_delay=settings.commit_delay,
            batch_size=settings.commit_batch,
        ),
        credentials=CredentialCache(pool, bootstrap=bootstrap),
        listener=Listener(dsn),
        appended=appended,
        feed=FeedHead(reads, appended, replica=replica),
        key_limits=RateLimiter(settings.key_rate, settings.key_burst),
        failure_limits=RateLimiter(settings.failure_rate, settings.failure_burst),
        projections_changed=projections_changed,
        runner=RunnerSupervisor(dsn, store, vocabulary, appended, projections_changed),
        replica=replica,
    )


async def _start(services: Services) -> None:
    services.listener.subscribe(
        CREDENTIALS_CHANNEL, lambda _p: services.credentials.invalidate()
    )
    services.listener.subscribe(EVENTS_CHANNEL, services.appended.notice)
    services.listener.subscribe(
        PROJECTIONS_CHANNEL, lambda _payload: _follow_served(services)
    )
    services.listener.subscribe(
        PROJECTIONS_CHANNEL, services.projections_changed.notice
    )
    await services.listener.start()
    await services.credentials.reload()
    await _load_served(services)
    await services.writer.start()
    await services.feed.start()
    await services.runner.start()
    services.background.append(
        asyncio.create_task(
            _record_credential_use(services), name="ordertrail-last-used"
        )
    )
    log.info("service.started", vocabulary=services.vocabulary.source)


async def _stop(services: Services) -> None:
    for task in services.background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await services.runner.stop()
    await services.feed.stop()
    await services.writer.stop()
    await services.listener.stop()
    with contextlib.suppress(Exception):
        await services.credentials.record_use()
    log.info("service.stopped")


_refreshing: set[asyncio.Task[None]] = set()


def _follow_served(services: Services) -> None:
    # A swap or a skip changed the catalogue: the next append reloads in its
    # own transaction anyway, but reads (entity tags, past states) should not
    # wait for an append to see the new version.
    services.served.invalidate()
    task = asyncio.get_running_loop().create_task(_refresh_served(services))
    _refreshing.add(task)
    task.add_done_callback(_refreshing.discard)


async def _refresh_served(services: Services) -> None:
    try:
        async with services.pool.acquire() as connection:
            await services.served.refresh(connection)
    except (
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        LookupError,
    ) as error:
        log.warning("projection.reload_failed", error=str(error))


async def _load_served(services: Services) -> None:
    async with services.pool.acquire() as connection:
        await adopt_vocabulary(connection, PROJECTION_NAME, services.vocabulary)
        version = await catalogue.served(connection, PROJECTION_NAME)
        await services.served.load(connection, version.version)
    if version.vocabulary_digest != services.vocabulary.digest:
        # The served version keeps the vocabulary it was built with; a
        # changed file takes effect through a rebuild.
        log.warning(
            "projection.vocabulary_differs",
            projection=PROJECTION_NAME,
            version=version.version,
            configured=services.vocabulary.source,
            hint="run `ordertrail projections rebuild items` to apply it",
        )


async def _record_credential_use(services: Services, every: float = 10.0) -> None:
    # Last-used times are written in the background, a few seconds late, so
    # that checking a credential never costs a write.
    while True:
        await asyncio.sleep(every)
        try:
            await services.credentials.record_use()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("credentials.last_used_failed", error=str(error))
