"""``ordertrail send-test``: post Locally-shaped sample webhooks.

Like the "Push Test Payload to Webhook" button of Locally Station, it sends
payloads shaped exactly like Locally's published example to an endpoint.
"""

from __future__ import annotations

import secrets

import click
import httpx
import msgspec

from ordertrail.domain.vocabulary import Vocabulary

__all__ = ["send_test"]


@click.command("send-test")
@click.option(
    "--url",
    default="http://127.0.0.1:8000/webhooks/locally",
    show_default=True,
    help="The webhook endpoint.",
)
@click.option(
    "--token",
    envvar="ORDERTRAIL_SEND_TEST_TOKEN",
    required=True,
    help="The locally-webhook-token to send (or ORDERTRAIL_SEND_TEST_TOKEN).",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    help="A status to send; repeat for several. Default: one per known "
    "transition, in lifecycle order.",
)
@click.option("--order-id", default=None, help="Default: a random Locally-like id.")
@click.option("--upc", default="601842495575", show_default=True)
def send_test(
    url: str, token: str, statuses: tuple[str, ...], order_id: str | None, upc: str
) -> None:
    """Post sample payloads and print each answer."""
    order_id = order_id or secrets.token_hex(3).upper()
    to_send = list(statuses) or list(Vocabulary.default().sample_statuses().values())
    failed = False
    with httpx.Client(timeout=10.0) as client:
        for status in to_send:
            body = msgspec.json.encode(
                {
                    "upc": upc,
                    "order_id": order_id,
                    "status": status,
                    "order_url": f"https://www.locally.com/api/v2/cart/{order_id}",
                }
            )
            try:
                answer = client.post(
                    url,
                    content=body,
                    headers={
                        "locally-webhook-token": token,
                        "content-type": "application/json",
                    },
                )
            except httpx.HTTPError as error:
                raise click.ClickException(f"{url}: {error}") from None
            failed = failed or answer.status_code >= 300
            click.echo(f"{status:>32}  {answer.status_code}  {answer.text}")
    if failed:
        raise SystemExit(1)
