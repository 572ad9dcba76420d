"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.projection_support import OwnDatabase, own_database


@pytest.fixture
async def own(server_url: str) -> AsyncIterator[OwnDatabase]:
    """A migrated database of the test's own, the migrations' version 1 served.

    Every event and row in it is the test's.
    """
    async with own_database(server_url) as database:
        yield database
