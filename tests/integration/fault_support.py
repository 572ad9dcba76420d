"""Shared by the fault tests: Locally-like senders, the service, and log checks.

A sender posts one webhook per cart-item change, with the token in
``locally-webhook-token`` and no idempotency header, as Locally does. When it
gets no answer, or a 5xx, it sends the same body again, at most three more
times within a minute (Locally's own promise). Every attempt is recorded with
what came back, so a test can hold the log to account for each 202: the
event is there, where the answer said, stored once as a transition, and its
stream's versions and hash chain are whole.

Each attempt carries an ``X-Request-Id`` of its own, which the service keeps
as the event's request id. It takes no part in deciding redeliveries (only
the body does, since Locally sends no key); it only lets the checks find
which attempt produced which event.

The service runs as ``ordertrail serve`` in a process group of its own with
its log in a file; the runner's election is read from ``pg_locks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import psutil  # type: ignore[import-untyped]  # comes with the embedded server
import pytest

from ordertrail.eventstore.records import RecordedEvent, StreamKey
from ordertrail.projections.items import PROJECTION_NAME
from tests.integration.helpers import TOKEN_HEADER
from tests.integration.projection_support import (
    Service,
    environment,
    free_port,
    served_version,
    whole_log,
)
from tests.support import WEBHOOK_PATH, new_order_id, stream_chain_errors, webhook_body

__all__ = [
    "ELECTED",
    "LIFECYCLES",
    "LOCALLY_RETRY_DELAYS",
    "Attempt",
    "Load",
    "Webhook",
    "acknowledgement_faults",
    "elections",
    "log_tail",
    "logged_events",
    "plan_webhooks",
    "post_once",
    "redeliver",
    "runner_at_head",
    "runner_holders",
    "sending",
    "service_owning",
    "serving",
    "stream_faults",
    "transition_faults",
]

ELECTED = '"event":"projection.runner_elected"'
"""How a service's log line says it won the runner's election."""

LOCALLY_RETRY_DELAYS = (2.0, 6.0, 15.0)
"""Pauses before Locally's three further attempts: all within its minute,
and all well inside the default 120-second redelivery window."""

LIFECYCLES: tuple[tuple[str, ...], ...] = (
    ("ordered",),
    ("ordered", "confirmed"),
    ("ordered", "confirmed", "refunded"),
    ("ordered", "ready for pickup", "picked up"),
)
"""The status changes an item goes through, one lifecycle per item in turn."""


@dataclass(frozen=True)
class Attempt:
    """One POST of a webhook and what came back."""

    request_id: str
    target: str
    """The base URL of the service it was posted to."""
    sent_at: float
    """``time.monotonic()`` when the request left."""
    answered_at: float
    status: int | None
    """The HTTP status, or ``None`` when no answer came (refused, reset, timeout)."""
    content_type: str | None
    document: dict[str, Any] | None
    error: str | None

    @property
    def accepted(self) -> bool:
        """Whether the service said the event is committed."""
        return self.status == 202


@dataclass
class Webhook:
    """One change of one cart item, as Locally sends it, with every attempt."""

    order_id: str
    upc: str
    status: str
    body: bytes
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def stream(self) -> StreamKey:
        """The item's stream (live mode: the senders use a live token)."""
        return StreamKey("live", self.order_id, self.upc)

    @property
    def acceptance(self) -> Attempt | None:
        """The attempt answered 202, if one was."""
        return next((a for a in self.attempts if a.accepted), None)

    @property
    def settled(self) -> bool:
        """Whether Locally would stop sending it: it got a 2xx answer."""
        return any(a.status is not None and a.status < 300 for a in self.attempts)


def plan_webhooks(
    orders: int, items_per_order: int, *, messages: int = 0, seed: int = 7
) -> list[Webhook]:
    """Webhooks for ``orders`` carts of ``items_per_order`` UPCs each.

    Items take the lifecycles in turn, so some get one status and others
    three. The list is in rounds, every item's first status (shuffled), then
    every second one, and so on, so an item's changes arrive in order but
    far apart, as Locally's would. ``messages`` adds that many message
    webhooks per item to the second round, each with a body of its own: they
    race the item's other changes to the same stream.
    """
    rounds: list[list[Webhook]] = [[] for _ in range(3)]
    lifecycles = itertools.cycle(LIFECYCLES)
    for _ in range(orders):
        order_id = new_order_id()
        for index in range(items_per_order):
            upc = f"{601842400000 + index:012d}"
            for step, status in enumerate(next(lifecycles)):
                rounds[step].append(_webhook(order_id, upc, status))
            for number in range(messages):
                rounds[1].append(
                    _webhook(order_id, upc, "new message", message=number + 1)
                )
    shuffler = random.Random(seed)
    planned: list[Webhook] = []
    for webhooks in rounds:
        shuffler.shuffle(webhooks)
        planned.extend(webhooks)
    return planned


def _webhook(order_id: str, upc: str, status: str, **extra: Any) -> Webhook:
    body = webhook_body(order_id, upc=upc, status=status, **extra)
    return Webhook(order_id, upc, status, body)


# The service -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    database_url: str, log: Path, **variables: str
) -> AsyncIterator[Service]:
    """``ordertrail serve`` on a free port in a group of its own, logging to ``log``.

    The log explains a failure: the tests quote its end when the service
    does not come up, and a failing test leaves it in its temporary folder.
    """
    port = free_port()
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ordertrail",
            "serve",
            env=environment(database_url, ORDERTRAIL_PORT=str(port), **variables),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    service = Service(process, f"http://127.0.0.1:{port}")
    try:
        await _until_ready(service, log)
        yield service
    finally:
        await service.stop()


async def _until_ready(service: Service, log: Path) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        while time.monotonic() < deadline:
            if service.process.returncode is not None:
                pytest.fail(f"the service exited: {log_tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/health/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    pytest.fail(f"the service did not become ready: {log_tail(log)}")


def log_tail(log: Path, characters: int = 3000) -> str:
    """The end of a service's log."""
    return log.read_text(errors="replace")[-characters:]


# Sending -----------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """Senders at work."""

    stop: asyncio.Event
    """Set it to have the senders take no new webhook."""
    tasks: list[asyncio.Task[None]]

    async def finished(self) -> None:
        """Wait until every webhook was sent, and retried as far as it takes."""
        await asyncio.gather(*self.tasks)


@contextlib.asynccontextmanager
async def sending(
    webhooks: Sequence[Webhook],
    targets: Sequence[str],
    token: str,
    *,
    clients: int = 64,
    retry_delays: Sequence[float] = (),
    answer_within: float = 10.0,
    on_answer: Callable[[Attempt], None] | None = None,
) -> AsyncIterator[Load]:
    """Send ``webhooks`` from ``clients`` concurrent senders while the body runs.

    Each attempt goes to the next of ``targets`` (base URLs), round robin.
    The body gets the senders' ``Load``. On the way out they stop taking new
    webhooks; the ones in flight finish (their retries too) and are awaited,
    for ``answer_within`` (each request's bound) plus the retry delays at
    most. ``on_answer`` sees each attempt as soon as it is over, before any
    other sender runs.
    """
    queue: asyncio.Queue[Webhook] = asyncio.Queue()
    for webhook in webhooks:
        queue.put_nowait(webhook)
    stop = asyncio.Event()
    rotation = itertools.cycle(targets)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=answer_within, limits=limits) as http:

        async def sender() -> None:
            while not stop.is_set():
                try:
                    webhook = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await _deliver(
                    http, webhook, rotation, token, retry_delays, on_answer=on_answer
                )

        tasks = [asyncio.create_task(sender()) for _ in range(clients)]
        try:
            yield Load(stop, tasks)
        finally:
            stop.set()
            bound = answer_within + sum(retry_delays) + 10.0
            done, pending = await asyncio.wait(tasks, timeout=bound)
            for task in pending:
                task.cancel()
            for task in done:
                task.result()
            assert not pending, "senders still busy long after they were stopped"


async def redeliver(
    webhooks: Iterable[Webhook],
    target: str,
    token: str,
    *,
    delays: Sequence[float] = LOCALLY_RETRY_DELAYS,
    clients: int = 64,
) -> None:
    """Send again each webhook that has no 2xx answer, as Locally retries."""
    unsettled = [webhook for webhook in webhooks if not webhook.settled]
    gate = asyncio.Semaphore(clients)
    rotation = itertools.cycle([target])
    async with httpx.AsyncClient(timeout=10.0) as http:

        async def again(webhook: Webhook) -> None:
            async with gate:
                await _deliver(http, webhook, rotation, token, delays, first=False)

        await asyncio.gather(*(again(webhook) for webhook in unsettled))


async def _deliver(
    http: httpx.AsyncClient,
    webhook: Webhook,
    targets: Iterator[str],
    token: str,
    retry_delays: Sequence[float],
    *,
    on_answer: Callable[[Attempt], None] | None = None,
    first: bool = True,
) -> None:
    pauses = [0.0, *retry_delays] if first else list(retry_delays)
    for pause in pauses:
        await asyncio.sleep(pause)
        attempt = await post_once(http, next(targets), webhook.body, token)
        webhook.attempts.append(attempt)
        if on_answer is not None:
            on_answer(attempt)
        if attempt.status is not None and attempt.status < 500:
            return


async def post_once(
    http: httpx.AsyncClient, target: str, body: bytes, token: str
) -> Attempt:
    """POST ``body`` to the service at ``target`` once; record what came back."""
    request_id = uuid.uuid4().hex
    headers = {
        TOKEN_HEADER: token,
        "content-type": "application/json",
        "x-request-id": request_id,
    }
    sent_at = time.monotonic()
    try:
        answer = await http.post(
            f"{target}{WEBHOOK_PATH}", content=body, headers=headers
        )
    except httpx.TransportError as error:
        return Attempt(
            request_id, target, sent_at, time.monotonic(), None, None, None, repr(error)
        )
    document = None
    with contextlib.suppress(msgspec.DecodeError):
        decoded = msgspec.json.decode(answer.content)
        document = decoded if isinstance(decoded, dict) else None
    return Attempt(
        request_id,
        target,
        sent_at,
        time.monotonic(),
        answer.status_code,
        answer.headers.get("content-type"),
        document,
        None,
    )


# The projection runner's election ----------------------------------------------

_RUNNER_HOLDERS = """
    SELECT activity.pid, activity.application_name, activity.client_port
    FROM pg_locks held JOIN pg_stat_activity activity ON activity.pid = held.pid
    WHERE held.locktype = 'advisory' AND held.granted AND held.objsubid = 2
      AND held.database = (
          SELECT oid FROM pg_database WHERE datname = current_database()
      )
      AND held.classid = hashtext('ordertrail.runner')::oid
      AND held.objid = hashtext($1)::oid
"""


async def runner_holders(
    pool: asyncpg.Pool, projection: str = PROJECTION_NAME
) -> list[asyncpg.Record]:
    """The sessions holding the lock that elects ``projection``'s runner.

    ``pg_try_advisory_lock(int, int)`` shows in ``pg_locks`` with its two
    keys as ``classid`` and ``objid`` and ``objsubid`` 2; each row names the
    backend, its application name and the client port of the connection
    that holds it.
    """
    return await pool.fetch(_RUNNER_HOLDERS, projection)


async def runner_at_head(pool: asyncpg.Pool) -> bool:
    """Whether the served version's checkpoint is at the last event of the log.

    The last event in the runners' read order, (transaction id, position),
    is not always the highest position: with appends in flight at once, a
    transaction can draw the higher positions and still take the lower
    transaction id, and so come earlier in that order.
    """
    last = await pool.fetchrow(
        "SELECT transaction_id, position FROM events "
        "ORDER BY transaction_id DESC, position DESC LIMIT 1"
    )
    served = await served_version(pool)
    assert last is not None
    return (served.checkpoint_xid, served.checkpoint_position) == (
        last["transaction_id"],
        last["position"],
    )


def elections(log: Path) -> int:
    """How many times the service logging to ``log`` won the runner's election."""
    return log.read_text().count(ELECTED)


def service_owning(services: Sequence[Service], port: int) -> list[Service]:
    """The services with a process (server or worker) that has this local port."""
    return [service for service in services if _owns_port(service, port)]


def _owns_port(service: Service, port: int) -> bool:
    try:
        leader = psutil.Process(service.pid)
        family = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            if any(c.laddr.port == port for c in process.net_connections("tcp")):
                return True
    return False


# Checking the log --------------------------------------------------------------


async def logged_events(pool: asyncpg.Pool) -> list[RecordedEvent]:
    """Every event in the log, committed or not yet settled."""
    async with pool.acquire() as connection:
        return await whole_log(connection)


def acknowledgement_faults(
    webhooks: Sequence[Webhook], events: Sequence[RecordedEvent]
) -> list[str]:
    """Say which 202 answers the log does not bear out (empty when all do).

    Each 202 must name an event that holds the attempt's request id, its
    stream and body, at the position, version and redelivery it announced.
    """
    by_request: dict[str, list[RecordedEvent]] = defaultdict(list)
    for event in events:
        by_request[event.request_id].append(event)
    faults = []
    for webhook in webhooks:
        for attempt in webhook.attempts:
            if not attempt.accepted:
                continue
            found = by_request.get(attempt.request_id, [])
            if len(found) != 1:
                faults.append(f"202 {attempt.request_id} stored {len(found)} times")
                continue
            (event,) = found
            said = attempt.document or {}
            stored = {
                "position": event.position,
                "version": event.version,
                "redelivery_of": event.redelivery_of,
            }
            announced = {name: said.get(name) for name in stored}
            if stored != announced or event.raw_body != webhook.body:
                faults.append(
                    f"202 {attempt.request_id} said {announced}, the log has "
                    f"{stored} for {event.stream}"
                )
    return faults


def stream_faults(events: Sequence[RecordedEvent]) -> list[str]:
    """Say which streams have a gap, a repeated version or a broken chain."""
    streams: dict[StreamKey, list[RecordedEvent]] = defaultdict(list)
    for event in events:
        streams[event.stream].append(event)
    faults = []
    for stream, stored in streams.items():
        stored.sort(key=lambda event: event.version)
        faults += [f"{stream}: {error}" for error in stream_chain_errors(stored)]
        positions = [event.position for event in stored]
        if positions != sorted(positions):
            faults.append(f"{stream}: versions do not rise with positions")
    return faults


def transition_faults(
    webhooks: Sequence[Webhook], events: Sequence[RecordedEvent]
) -> list[str]:
    """Say which webhooks the log holds other than once as a transition.

    A webhook that got its 202 must be stored as exactly one transition
    (``redelivery_of`` null), every other copy flagged as a redelivery of
    that one. A webhook never accepted may be missing, never doubled. No
    copy may outnumber the attempts, and the log holds nothing unsent.
    """
    by_body: dict[tuple[StreamKey, bytes], list[RecordedEvent]] = defaultdict(list)
    for event in events:
        by_body[event.stream, event.raw_body].append(event)
    faults = []
    for webhook in webhooks:
        stored = by_body.pop((webhook.stream, webhook.body), [])
        faults += _copy_faults(webhook, stored)
    faults += [f"{stream}: stored but never sent: {body!r}" for stream, body in by_body]
    return faults


def _copy_faults(webhook: Webhook, stored: list[RecordedEvent]) -> list[str]:
    where = f"{webhook.stream} {webhook.status!r}"
    transitions = [event for event in stored if event.redelivery_of is None]
    faults = []
    if len(transitions) > 1:
        faults.append(f"{where}: stored {len(transitions)} times as a transition")
    elif not transitions and webhook.acceptance is not None:
        faults.append(f"{where}: accepted, yet no transition is stored")
    if transitions:
        original = transitions[0].position
        faults += [
            f"{where}: {event.position} repeats {event.redelivery_of}, not {original}"
            for event in stored
            if event.redelivery_of is not None and event.redelivery_of != original
        ]
    sent = {attempt.request_id for attempt in webhook.attempts}
    faults += [
        f"{where}: event {event.position} from no attempt of it"
        for event in stored
        if event.request_id not in sent
    ]
    return faults
