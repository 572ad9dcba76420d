"""Prometheus metrics: deliveries, append latency, projection lag."""

from __future__ import annotations

from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support import WEBHOOK_PATH, bearer, webhook_body


async def test_metrics_count_deliveries_and_show_projection_lag(
    client: AsyncTestClient[Litestar], live_token: str, admin_key: str, order_id: str
) -> None:
    accepted = await client.post(
        WEBHOOK_PATH,
        content=webhook_body(order_id),
        headers={"locally-webhook-token": live_token},
    )
    refused = await client.post(
        WEBHOOK_PATH,
        content=webhook_body(order_id),
        headers={"locally-webhook-token": "not-a-token"},
    )

    answer = await client.get("/metrics", headers=bearer(admin_key))

    assert (accepted.status_code, refused.status_code) == (202, 401)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert 'ordertrail_deliveries_total{mode="live",outcome="accepted"}' in text
    assert (
        'ordertrail_deliveries_total{mode="unknown",outcome="unauthenticated"}' in text
    )
    assert "ordertrail_append_seconds_bucket" in text
    assert 'ordertrail_projection_lag_events{projection="items"' in text
    assert "ordertrail_projection_head_position" in text


async def test_metrics_need_the_admin_role(
    client: AsyncTestClient[Litestar], reader_key: str
) -> None:
    refused = await client.get("/metrics", headers=bearer(reader_key))
    anonymous = await client.get("/metrics")

    assert (refused.status_code, anonymous.status_code) == (403, 401)
