"""Locust users that load an ordertrail as Locally and POS integrators do.

Point it at any deployment::

    ORDERTRAIL_LOCUST_TOKEN=<live webhook token> \\
    ORDERTRAIL_LOCUST_API_KEY=<reader API key> \\
    locust -f tests/load/locustfile.py --host http://127.0.0.1:8000

``Shop`` sends cart items through their statuses as Locally's webhooks, and
sometimes sends one again as Locally's retry does; after a 202 it may read
the item back, which must show the acknowledged version at least. ``Pos``
revalidates items the shops have sent with their last ETag, as a polling
POS does, and fails on a version that goes backwards. Answers that break
the service's promises count as Locust failures. Without an API key the
shops read nothing back and the pollers stay idle.

With ``ORDERTRAIL_LOCUST_RECORD`` set, every 202 is appended to that file as
a JSON line (the answer, the body sent and whether it was a retry), so that
a test can hold the log against what was acknowledged.

Locust patches the standard library with gevent's when it loads this file,
so nothing else may import it: run it with ``locust`` only.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from typing import Any

from locust import FastHttpUser, between, constant, task

TOKEN = os.environ.get("ORDERTRAIL_LOCUST_TOKEN", "")
API_KEY = os.environ.get("ORDERTRAIL_LOCUST_API_KEY", "")
RECORD = os.environ.get("ORDERTRAIL_LOCUST_RECORD")
RETRY_SHARE = 0.1
"""Share of acknowledged deliveries that are sent again, as Locally retries."""
READ_BACK_SHARE = 0.2
"""Share of acknowledged deliveries whose item the shop reads back at once."""

# Statuses Locally sends for one cart item, in order; none repeats within a
# scenario, so that only the retries are redeliveries.
SCENARIOS = (
    ("ordered", "confirmed", "ready for pickup", "message", "picked up"),
    ("ordered", "in stock", "refunded"),
    ("ordered", "confirmed", "partial refund", "shopper message", "partially refunded"),
    ("ordered", "ship to store", "sts shipped", "arrived at store", "picked up"),
    ("placed", "same day delivery", "out for delivery", "same day delivery delivered"),
    ("ordered", "out of stock"),
)

WEBHOOK = "/webhooks/locally"
ITEM = "/v1/orders/[order_id]/items/[upc]"

sent_items: list[tuple[str, str]] = []
"""Items some shop has had acknowledged, for the pollers to read."""

_record_file = open(RECORD, "a", buffering=1) if RECORD else None  # noqa: SIM115


def _record(answer: dict[str, Any], body: str, *, retry: bool) -> None:
    if _record_file is not None:
        line = {"answer": answer, "body": body, "retry": retry}
        _record_file.write(json.dumps(line) + "\n")


def _item_path(order_id: str, upc: str) -> str:
    return f"/v1/orders/{order_id}/items/{upc}"


class Shop(FastHttpUser):
    """A shop's cart items, each sent through one scenario's statuses."""

    weight = 3
    wait_time = constant(0)

    @task
    def send_cart_item(self) -> None:
        order_id = f"L{uuid.uuid4().hex[:12].upper()}"
        upc = f"{random.randrange(10**11, 10**12)}"
        version = 0
        for status in random.choice(SCENARIOS):
            body = json.dumps(
                {
                    "upc": upc,
                    "order_id": order_id,
                    "status": status,
                    "order_url": f"https://www.locally.com/api/v2/cart/{order_id}",
                }
            )
            answer = self._deliver(body, order_id, upc, version + 1)
            if answer is None:
                return
            version = answer["version"]
            if version == 1:
                sent_items.append((order_id, upc))
            if random.random() < RETRY_SHARE:
                again = self._deliver(
                    body, order_id, upc, version + 1, repeats=answer["position"]
                )
                if again is None:
                    return
                version = again["version"]
            if API_KEY and random.random() < READ_BACK_SHARE:
                self._read_back(order_id, upc, version)

    def _deliver(
        self,
        body: str,
        order_id: str,
        upc: str,
        version: int,
        *,
        repeats: int | None = None,
    ) -> dict[str, Any] | None:
        """Send one delivery; return its 202's answer if it is as expected.

        ``repeats`` is the position of the delivery this one sends again.
        """
        retry = repeats is not None
        headers = {
            "locally-webhook-token": TOKEN,
            "content-type": "application/json",
        }
        name = f"{WEBHOOK} (retry)" if retry else WEBHOOK
        with self.client.post(
            WEBHOOK, data=body, headers=headers, name=name, catch_response=True
        ) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return None
            answer: dict[str, Any] = response.json()
            expected = (order_id, upc, version, retry, repeats)
            got = (
                answer.get("order_id"),
                answer.get("upc"),
                answer.get("version"),
                answer.get("redelivery"),
                answer.get("redelivery_of"),
            )
            if got != expected:
                response.failure(f"answered {got}, expected {expected}")
                return None
            _record(answer, body, retry=retry)
            return answer

    def _read_back(self, order_id: str, upc: str, version: int) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with self.client.get(
            _item_path(order_id, upc),
            headers=headers,
            name=f"{ITEM} (after its 202)",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif response.json()["version"] < version:
                response.failure(f"version {response.json()['version']} < {version}")


class Pos(FastHttpUser):
    """A POS integrator polling items by ETag."""

    weight = 1
    wait_time = between(0.01, 0.05)

    def on_start(self) -> None:
        # This poller's own view: its reads follow each other, so an item's
        # version may never go back between two of them.
        self.held: dict[tuple[str, str], tuple[str, int]] = {}

    @task
    def poll_item(self) -> None:
        if not sent_items or not API_KEY:
            return
        order_id, upc = random.choice(sent_items)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        tag, seen = self.held.get((order_id, upc), ("", 0))
        if tag:
            headers["If-None-Match"] = tag
        with self.client.get(
            _item_path(order_id, upc), headers=headers, name=ITEM, catch_response=True
        ) as response:
            if response.status_code == 304 and tag:
                response.success()
                return
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            version = response.json()["version"]
            if version < seen:
                response.failure(f"version {version} after {seen}")
                return
            self.held[(order_id, upc)] = (response.headers.get("etag", ""), version)
