"""A crash under load loses nothing that was acknowledged.

A real ``ordertrail serve`` takes webhooks from 64 concurrent senders until
it is killed with SIGKILL, server and workers at once, in the middle of the
load. Whatever got a 202 before the crash must be in the log where the
answer said; the streams must be whole (versions 1, 2, 3..., chains valid).
The senders then do what Locally does with the deliveries that got no
answer: send the same body again, up to three more times within a minute,
to the restarted service. Each of those ends up stored exactly once as a
transition, whether the crash came before its commit (the retry is the
transition) or after it (the retry is a redelivery of it), and nothing
acknowledged is ever stored twice as a transition.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter

import asyncpg
import pytest

from ordertrail.audit.verify import verify_log
from ordertrail.eventstore.store import EVENTS_CHANNEL
from tests.integration.fault_support import (
    Attempt,
    Webhook,
    acknowledgement_faults,
    logged_events,
    plan_webhooks,
    redeliver,
    sending,
    stream_faults,
    transition_faults,
)
from tests.integration.projection_support import (
    OwnDatabase,
    Service,
    differing,
    projection_for,
    rows_of,
    running_service,
    scratch_fold,
    served_version,
    settle,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ACCEPTED_BEFORE_THE_CRASH = 600
"""202s to wait for before the kill: the load is well under way by then."""


async def test_kill_under_load_loses_nothing_acknowledged_and_retries_land_once(
    own: OwnDatabase,
) -> None:
    token = secrets.token_urlsafe(24)
    settings = {"ORDERTRAIL_WEBHOOK_TOKEN_LIVE": token}
    # 400 items, 1 to 3 changes each: about 900 webhooks, more than are
    # answered before the kill.
    webhooks = plan_webhooks(100, 4)

    async with running_service(own.url, **settings) as service:
        crash = _Crash(service)
        async with sending(
            webhooks, [service.base_url], token, on_answer=crash.count
        ) as load:
            crash.stop = load.stop
            await crash.wait(own.url, webhooks, within=60)
        await asyncio.wait_for(service.process.wait(), 10)

    sent = [webhook for webhook in webhooks if webhook.attempts]
    acknowledged = [webhook for webhook in sent if webhook.settled]
    unanswered = [webhook for webhook in sent if not webhook.settled]
    assert all(
        attempt.status is None for webhook in unanswered for attempt in webhook.attempts
    ), "an attempt was answered with an error before the crash"
    assert unanswered, "the kill came when no delivery was in flight"

    async with running_service(own.url, **settings) as restarted:
        events = await logged_events(own.pool)
        assert acknowledgement_faults(sent, events) == []
        assert stream_faults(events) == []
        # Some of the unanswered were committed before the crash took their
        # answers: their retries must say so.
        before_retry = {event.raw_body: event.position for event in events}

        started = time.monotonic()
        await redeliver(unanswered, restarted.base_url, token)
        retried_in = time.monotonic() - started

        assert all(webhook.settled for webhook in unanswered)
        # As Locally promises: three more attempts at most, within a minute
        # of the first, which went to the service before it was killed.
        assert max(len(webhook.attempts) for webhook in unanswered) <= 4
        spans = [w.attempts[-1].sent_at - w.attempts[0].sent_at for w in unanswered]
        assert max(spans) < 60, f"retried up to {max(spans):.1f} s after the first"
        assert _retry_answers(unanswered, before_retry) == []
        events = await logged_events(own.pool)
        assert acknowledgement_faults(sent, events) == []
        assert stream_faults(events) == []
        assert transition_faults(sent, events) == []
        await _assert_verified_and_projected(own)

    committed = sum(webhook.body in before_retry for webhook in unanswered)
    print(
        f"\nkill: {len(acknowledged)} acknowledged before the crash, "
        f"{len(unanswered)} unanswered ({committed} of them committed), "
        f"retried in {retried_in:.2f} s; {len(events)} events"
    )


class _Crash:
    """Kills the service the moment the database announces a commit.

    Once 600 deliveries are acknowledged, the next commit notification (sent
    by the writer's transaction, delivered as it commits) triggers the kill:
    the batch is durable, and its answers are being written at that very
    moment, so the crash takes some answers of committed deliveries, not
    only deliveries still queued.
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        self.accepted = 0
        self.stop: asyncio.Event | None = None
        self.happened = asyncio.Event()

    def count(self, attempt: Attempt) -> None:
        self.accepted += attempt.accepted

    def committed(self, *_notification: object) -> None:
        if self.accepted >= ACCEPTED_BEFORE_THE_CRASH and not self.happened.is_set():
            assert self.stop is not None
            self.stop.set()
            self.service.kill()
            self.happened.set()

    async def wait(self, url: str, webhooks: list[Webhook], within: float) -> None:
        listening = await asyncpg.connect(url)
        try:
            await listening.add_listener(EVENTS_CHANNEL, self.committed)
            await asyncio.wait_for(self.happened.wait(), within)
        except TimeoutError:
            answers = Counter(a.status for w in webhooks for a in w.attempts)
            pytest.fail(f"no crash within {within} s; answers so far: {answers}")
        finally:
            await listening.close()


def _retry_answers(unanswered: list[Webhook], before: dict[bytes, int]) -> list[str]:
    """Say which retries were not answered as what the log held before them.

    A retry of a delivery committed before the crash is a redelivery of that
    event; a retry of one that was not is the transition itself.
    """
    faults = []
    for webhook in unanswered:
        acceptance = webhook.acceptance
        assert acceptance is not None
        assert acceptance.document is not None
        repeats = acceptance.document["redelivery_of"]
        if repeats != before.get(webhook.body):
            faults.append(
                f"{webhook.stream} {webhook.status!r}: the retry repeats {repeats}, "
                f"the log held {before.get(webhook.body)}"
            )
    return faults


async def _assert_verified_and_projected(own: OwnDatabase) -> None:
    async with own.pool.acquire() as connection:
        report = await verify_log(connection, key=None)
        assert report.clean, report.findings

    # The view was written in each append's transaction: a crash cannot
    # leave it apart from the log.
    await settle(own.pool)
    served = await served_version(own.pool)
    async with own.pool.acquire() as connection:
        projection = await projection_for(connection, served.version)
        expected = await scratch_fold(connection, projection)
        actual = await rows_of(connection, served.table_name)
    assert differing(actual, expected) == []
