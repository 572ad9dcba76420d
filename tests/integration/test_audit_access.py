"""The auditor role reads histories, past states and exports, and nothing more."""

from __future__ import annotations

from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.integration.helpers import TOKEN_HEADER, post_webhook
from tests.support import WEBHOOK_PATH, bearer, webhook_body


async def test_an_auditor_reads_histories_past_states_and_exports(
    client: AsyncTestClient[Litestar], live_token: str, auditor_key: str, order_id: str
) -> None:
    answer = await post_webhook(client, webhook_body(order_id), live_token)
    position = answer.json()["position"]

    events = await client.get(
        f"/v1/orders/{order_id}/events", headers=bearer(auditor_key)
    )
    past = await client.get(
        f"/v1/orders/{order_id}",
        headers=bearer(auditor_key),
        params={"as_of": str(position)},
    )
    export = await client.get(
        "/v1/export",
        headers=bearer(auditor_key),
        params={"from_position": position, "to_position": position},
    )

    assert (events.status_code, past.status_code, export.status_code) == (
        200,
        200,
        200,
    )


async def test_an_auditor_cannot_reach_the_admin_endpoints(
    client: AsyncTestClient[Litestar], auditor_key: str
) -> None:
    answer = await client.get("/v1/admin/quarantine", headers=bearer(auditor_key))

    assert answer.status_code == 403
    assert answer.json()["type"] == "urn:ordertrail:problem:forbidden"


async def test_an_auditor_key_cannot_write_to_the_log(
    client: AsyncTestClient[Litestar], auditor_key: str, order_id: str
) -> None:
    as_token = await client.post(
        WEBHOOK_PATH,
        content=webhook_body(order_id),
        headers={TOKEN_HEADER: auditor_key, "content-type": "application/json"},
    )
    as_bearer = await client.post(
        WEBHOOK_PATH,
        content=webhook_body(order_id),
        headers={**bearer(auditor_key), "content-type": "application/json"},
    )
    read_back = await client.get(f"/v1/orders/{order_id}", headers=bearer(auditor_key))

    assert (as_token.status_code, as_bearer.status_code) == (401, 401)
    assert read_back.status_code == 404


async def test_the_export_cannot_be_posted_to(
    client: AsyncTestClient[Litestar], auditor_key: str
) -> None:
    answer = await client.post("/v1/export", headers=bearer(auditor_key))

    assert answer.status_code == 405
