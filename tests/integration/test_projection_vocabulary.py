"""A new status alias reaches the read model through a rebuild, and stays.

A running service (its own app, on a database of this test's own) keeps
serving while the operator's ``ordertrail projections rebuild`` runs as a
process of its own with the new vocabulary file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.services import Services
from ordertrail.auth.credentials import CredentialKind, Role
from ordertrail.domain.vocabulary import Vocabulary
from tests.integration.api_support import issue, running_app
from tests.integration.helpers import get_item, post_webhook
from tests.integration.projection_support import (
    OwnDatabase,
    ordertrail,
    served_version,
    view_source,
)
from tests.support import bearer, new_order_id, webhook_body

ALIAS = "good to go"
"""A status the shipped vocabulary does not know."""


TAUGHT = (
    Vocabulary.default().text
    + f'\n[[status]]\ntransition = "confirmed"\naliases = ["{ALIAS}"]\n'
)
"""The shipped vocabulary plus the alias."""


@pytest.fixture
def taught(tmp_path: Path) -> Path:
    """The operator's vocabulary file."""
    file = tmp_path / "statuses.toml"
    file.write_text(TAUGHT, encoding="utf-8")
    return file


class Shop:
    """A running service and the credentials to talk to it."""

    def __init__(self, client: AsyncTestClient[Litestar], token: str, key: str):
        self.client = client
        self.token = token
        self.key = key

    @property
    def services(self) -> Services:
        services = self.client.app.state.services
        assert isinstance(services, Services)
        return services

    async def deliver(self, order_id: str, status: str) -> None:
        answer = await post_webhook(
            self.client, webhook_body(order_id, status=status), self.token
        )
        assert answer.status_code == 202, answer.text

    async def item(self, order_id: str) -> dict[str, object]:
        answer = await get_item(self.client, self.key, order_id)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert isinstance(body, dict)
        return body


@pytest.fixture
async def shop(own: OwnDatabase) -> AsyncIterator[Shop]:
    """A service started with the shipped vocabulary."""
    async with running_app(own.url) as client:
        token = await issue(client, own.pool, CredentialKind.WEBHOOK_TOKEN, mode="live")
        key = await issue(client, own.pool, CredentialKind.API_KEY, role=Role.READER)
        yield Shop(client, token.secret, key.secret)


async def rebuild_with(own: OwnDatabase, vocabulary: Path) -> None:
    done = await ordertrail(
        own.url,
        "projections",
        "rebuild",
        "items",
        ORDERTRAIL_VOCABULARY_FILE=str(vocabulary),
    )
    assert done.returncode == 0, done.stderr


async def test_an_alias_and_a_rebuild_turn_unrecognized_reports_into_transitions(
    own: OwnDatabase, shop: Shop, taught: Path
) -> None:
    earlier, unknown_only = new_order_id(), new_order_id()
    await shop.deliver(earlier, "ordered")
    await shop.deliver(earlier, ALIAS)
    await shop.deliver(unknown_only, ALIAS)
    before = await shop.item(earlier)
    assert before["state"] == "ordered"
    assert before["unrecognized_statuses"] == {ALIAS: 1}

    await rebuild_with(own, taught)

    served = await served_version(own.pool)
    assert served.version == 2
    assert served.vocabulary == TAUGHT
    assert served.vocabulary_digest == Vocabulary.parse(TAUGHT, source="t").digest
    assert await view_source(own.pool) == "item_view_v2"
    after = await shop.item(earlier)
    assert (after["state"], after["last_transition"]) == ("confirmed", "confirmed")
    assert after["unrecognized_statuses"] == {}
    assert (await shop.item(unknown_only))["state"] == "confirmed"

    # The running service was started with the shipped vocabulary; its
    # writer now applies the served version's, from the next delivery on.
    later = new_order_id()
    await shop.deliver(later, ALIAS)
    fresh = await shop.item(later)
    assert (fresh["state"], fresh["unrecognized_statuses"]) == ("confirmed", {})
    assert shop.services.projection.version == 2
    assert shop.services.projection.vocabulary.digest == served.vocabulary_digest


async def test_an_item_a_rebuild_changed_is_not_answered_not_modified(
    own: OwnDatabase, shop: Shop, taught: Path
) -> None:
    order_id = new_order_id()
    await shop.deliver(order_id, ALIAS)
    first = await get_item(shop.client, shop.key, order_id)
    etag = first.headers["etag"]
    unchanged = await shop.client.get(
        f"/v1/orders/{order_id}/items/{first.json()['upc']}",
        headers={**bearer(shop.key), "If-None-Match": etag},
    )
    assert unchanged.status_code == 304

    await rebuild_with(own, taught)

    # Same stream version, different content: a poller holding the old tag
    # must be given the new state, with a new tag.
    again = await shop.client.get(
        f"/v1/orders/{order_id}/items/{first.json()['upc']}",
        headers={**bearer(shop.key), "If-None-Match": etag},
    )
    assert again.status_code == 200, "answered 304 with the state before the rebuild"
    assert again.json()["state"] == "confirmed"
    assert again.headers["etag"] != etag
