"""Who may call what: every operation of the OpenAPI document, every caller.

The operations come from the running app's own document, and each must have
a row in ``EXPECTED``: an endpoint added without deciding who may call it
fails here instead of going out open (or closed) by accident.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.auth.credentials import CredentialKind, Issued, Role
from ordertrail.lib.secrets import API_KEY_PREFIX, WEBHOOK_TOKEN_PREFIX, new_secret
from tests.integration.api_support import issue, problem, revoke, running_app
from tests.integration.helpers import TOKEN_HEADER, stored_events
from tests.support import UPC, WEBHOOK_PATH, bearer, new_order_id, webhook_body


class Access(enum.Enum):
    """What an operation asks of its caller."""

    OPEN = "nothing"
    READER = "an API key of the reader role or above"
    AUDITOR = "an API key of the auditor role or above"
    ADMIN = "an API key of the admin role"
    WEBHOOK = "a webhook token"


EXPECTED: dict[tuple[str, str], Access] = {
    ("POST", "/webhooks/locally"): Access.WEBHOOK,
    ("GET", "/v1/orders/{order_id}"): Access.READER,
    ("GET", "/v1/orders/{order_id}/items/{upc}"): Access.READER,
    ("GET", "/v1/orders/{order_id}/events"): Access.AUDITOR,
    ("GET", "/v1/changes"): Access.READER,
    ("GET", "/v1/items"): Access.READER,
    ("GET", "/v1/admin/quarantine"): Access.ADMIN,
    ("GET", "/v1/admin/projections"): Access.ADMIN,
    ("GET", "/v1/export"): Access.AUDITOR,
    ("GET", "/metrics"): Access.ADMIN,
    ("GET", "/health/live"): Access.OPEN,
    ("GET", "/health/ready"): Access.OPEN,
}

_ROLE_NEEDED = {
    Access.READER: Role.READER,
    Access.AUDITOR: Role.AUDITOR,
    Access.ADMIN: Role.ADMIN,
}


class Caller(enum.Enum):
    """Someone calling the service, and what they hold."""

    ANONYMOUS = "no credential"
    WRONG = "a made-up secret"
    EXPIRED = "an expired credential"
    REVOKED = "a revoked credential"
    READER = "a reader key"
    AUDITOR = "an auditor key"
    ADMIN = "an admin key"
    WEBHOOK = "a live webhook token"


@dataclass(frozen=True)
class Held:
    """The secrets a caller presents: as an API key and as a webhook token.

    A caller presents whatever it holds in the form the endpoint asks for, so
    an API key is also tried as a webhook token and the other way round.
    """

    as_key: str | None
    as_token: str | None


@dataclass(frozen=True)
class Service:
    """An app of this module's own, its callers, and an order to read."""

    client: AsyncTestClient[Litestar]
    callers: dict[Caller, Held]
    order_id: str


@pytest.fixture(scope="module")
async def service(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[Service]:
    # Limits off: this module fails authentication on purpose, many times
    # from one address, and the walk is about answers, not about budgets.
    async with running_app(database_url, key_rate=0, failure_rate=0) as client:
        keys = {
            role: await issue(client, pool, CredentialKind.API_KEY, role=role)
            for role in Role
        }
        token = await issue(client, pool, CredentialKind.WEBHOOK_TOKEN, mode="live")
        expired_key, expired_token = await _expired(client, pool)
        revoked_key, revoked_token = await _revoked(client, pool)
        order_id = new_order_id()
        created = await client.post(
            WEBHOOK_PATH,
            content=webhook_body(order_id),
            headers={TOKEN_HEADER: token.secret},
        )
        assert created.status_code == 202

        def both(issued: Issued) -> Held:
            return Held(issued.secret, issued.secret)

        callers = {
            Caller.ANONYMOUS: Held(None, None),
            Caller.WRONG: Held(
                new_secret(API_KEY_PREFIX), new_secret(WEBHOOK_TOKEN_PREFIX)
            ),
            Caller.EXPIRED: Held(expired_key.secret, expired_token.secret),
            Caller.REVOKED: Held(revoked_key.secret, revoked_token.secret),
            Caller.READER: both(keys[Role.READER]),
            Caller.AUDITOR: both(keys[Role.AUDITOR]),
            Caller.ADMIN: both(keys[Role.ADMIN]),
            Caller.WEBHOOK: both(token),
        }
        yield Service(client, callers, order_id)


async def _expired(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool
) -> tuple[Issued, Issued]:
    gone = timedelta(seconds=-1)
    key = await issue(
        client, pool, CredentialKind.API_KEY, role=Role.ADMIN, expires_in=gone
    )
    token = await issue(
        client, pool, CredentialKind.WEBHOOK_TOKEN, mode="live", expires_in=gone
    )
    return key, token


async def _revoked(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool
) -> tuple[Issued, Issued]:
    # Each works first, so the refusal afterwards is the revocation reaching
    # the running service, not a credential it never knew.
    key = await issue(client, pool, CredentialKind.API_KEY, role=Role.ADMIN)
    token = await issue(client, pool, CredentialKind.WEBHOOK_TOKEN, mode="live")
    before = await client.get("/v1/admin/quarantine", headers=bearer(key.secret))
    assert before.status_code == 200
    await revoke(client, pool, key)
    await revoke(client, pool, token)
    return key, token


def documented_operations(app: Litestar) -> list[tuple[str, str]]:
    """Every (method, path) the app's OpenAPI document describes."""
    operations = []
    for path, item in (app.openapi_schema.paths or {}).items():
        for method in ("get", "put", "post", "delete", "patch", "head", "options"):
            if getattr(item, method, None) is not None:
                operations.append((method.upper(), path))
    return operations


def expected_status(access: Access, caller: Caller) -> int:
    """The status ``caller`` must get from an operation that asks ``access``."""
    if access is Access.OPEN:
        return 200
    if access is Access.WEBHOOK:
        return 202 if caller is Caller.WEBHOOK else 401
    role = {
        Caller.READER: Role.READER,
        Caller.AUDITOR: Role.AUDITOR,
        Caller.ADMIN: Role.ADMIN,
    }.get(caller)
    if role is None:
        return 401
    return 200 if role.allows(_ROLE_NEEDED[access]) else 403


async def call(
    service: Service, method: str, path: str, caller: Caller
) -> httpx.Response:
    """Call one operation as ``caller``, presenting what it holds."""
    held = service.callers[caller]
    url = path.format(order_id=service.order_id, upc=UPC)
    if EXPECTED.get((method, path)) is Access.WEBHOOK:
        headers = {TOKEN_HEADER: held.as_token} if held.as_token else {}
        # A fresh item per delivery, so no call depends on the ones before.
        body = webhook_body(service.order_id, upc=f"access-{uuid.uuid4().hex[:8]}")
        return await service.client.request(method, url, content=body, headers=headers)
    headers = bearer(held.as_key) if held.as_key else {}
    return await service.client.request(method, url, headers=headers)


def test_every_documented_operation_has_an_expectation(service: Service) -> None:
    documented = set(documented_operations(service.client.app))

    assert documented - EXPECTED.keys() == set(), "operations nobody decided about"
    assert EXPECTED.keys() - documented == set(), "expectations for no operation"


@pytest.mark.parametrize("caller", list(Caller), ids=lambda c: c.name.lower())
async def test_each_caller_gets_what_its_credential_allows(
    service: Service, caller: Caller
) -> None:
    wrong: list[str] = []
    for method, path in documented_operations(service.client.app):
        access = EXPECTED.get((method, path))
        if access is None:
            wrong.append(f"{method} {path}: no expectation")
            continue
        response = await call(service, method, path, caller)
        expected = expected_status(access, caller)
        if response.status_code != expected:
            wrong.append(
                f"{method} {path} ({access.value}) as {caller.value}: "
                f"{response.status_code}, expected {expected}"
            )
            continue
        wrong.extend(
            f"{method} {path} as {caller.value}: {fault}"
            for fault in _faults(response, access)
        )
    assert wrong == []


def _faults(response: httpx.Response, access: Access) -> list[str]:
    """What is wrong with the shape of an answer whose status was right."""
    faults = []
    status = response.status_code
    content_type = response.headers.get("content-type", "")
    if status >= 400:
        if not content_type.startswith("application/problem+json"):
            faults.append(f"{status} answered as {content_type!r}")
            return faults
        document = msgspec.json.decode(response.content)
        if document.get("status") != status:
            faults.append(f"problem status {document.get('status')} on a {status}")
        name = {401: ("unauthorized", "unauthenticated"), 403: ("forbidden",)}
        if document.get("type", "").rpartition(":")[2] not in name[status]:
            faults.append(f"problem type {document.get('type')!r} on a {status}")
    elif not content_type.startswith(
        ("application/json", "application/x-ndjson", "text/plain")
    ):
        # The export streams JSON lines and metrics are Prometheus text;
        # everything else answers one JSON document.
        faults.append(f"{status} answered as {content_type!r}")
    # The read API speaks HTTP authentication (RFC 9110 11.6.1): a 401 names
    # the scheme, so a client knows to send a Bearer key. The webhook's own
    # challenge is checked on its own below.
    if status == 401 and access is not Access.WEBHOOK:
        challenge = response.headers.get("www-authenticate", "")
        if not challenge.lower().startswith("bearer"):
            faults.append(f"401 with WWW-Authenticate {challenge!r}")
    return faults


async def test_a_refused_delivery_names_how_to_authenticate(service: Service) -> None:
    # RFC 9110 15.5.2: a server generating a 401 MUST send WWW-Authenticate
    # with at least one challenge for the target resource.
    response = await call(service, "POST", WEBHOOK_PATH, Caller.ANONYMOUS)

    problem(response, 401)
    assert response.headers.get("www-authenticate")


async def test_an_api_key_is_not_a_webhook_token(
    service: Service, pool: asyncpg.Pool
) -> None:
    order_id = new_order_id()
    admin = service.callers[Caller.ADMIN].as_key
    assert admin is not None

    response = await service.client.post(
        WEBHOOK_PATH, content=webhook_body(order_id), headers={TOKEN_HEADER: admin}
    )

    problem(response, 401)
    assert await stored_events(pool, order_id) == []


async def test_a_webhook_token_is_not_an_api_key(service: Service) -> None:
    token = service.callers[Caller.WEBHOOK].as_token
    assert token is not None

    for path in (f"/v1/orders/{service.order_id}", "/v1/changes", "/v1/items"):
        response = await service.client.get(path, headers=bearer(token))
        problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "bearer"],
    ids=["empty", "scheme-only", "scheme-blank", "basic", "other-scheme", "lower"],
)
async def test_malformed_authorization_is_unauthenticated(
    service: Service, authorization: str
) -> None:
    response = await service.client.get(
        "/v1/items", headers={"Authorization": authorization}
    )

    document = problem(response, 401)
    assert document["type"] == "urn:ordertrail:problem:unauthorized"
    assert response.headers["www-authenticate"] == 'Bearer realm="ordertrail"'


async def test_the_bearer_scheme_is_case_insensitive(service: Service) -> None:
    # RFC 9110 11.1: authentication scheme names are case-insensitive.
    key = service.callers[Caller.READER].as_key
    response = await service.client.get(
        "/v1/items", headers={"Authorization": f"bEaReR {key}"}
    )

    assert response.status_code == 200


async def test_a_refused_caller_learns_nothing_about_the_order(
    service: Service,
) -> None:
    # A 401 or 403 must not say whether the order exists: the answer to a
    # made-up order and to a real one are the same.
    for caller in (Caller.ANONYMOUS, Caller.WRONG, Caller.READER):
        real = await call(service, "GET", "/v1/orders/{order_id}/events", caller)
        held = service.callers[caller]
        made_up = await service.client.get(
            f"/v1/orders/{new_order_id()}/events",
            headers=bearer(held.as_key) if held.as_key else {},
        )
        assert real.status_code == made_up.status_code
        assert _comparable(real) == _comparable(made_up)


def _comparable(response: httpx.Response) -> dict[str, Any]:
    document = msgspec.json.decode(response.content)
    assert isinstance(document, dict)
    document.pop("request_id", None)
    return document
