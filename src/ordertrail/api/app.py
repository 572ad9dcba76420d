"""The litestar application: routes, lifespan, errors and OpenAPI."""

from __future__ import annotations

import contextlib
import itertools
import re
import secrets
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from ordertrail import __version__
from ordertrail.api.admin import AdminController
from ordertrail.api.audit import export_events
from ordertrail.api.conditional import DOOR, answered_at_door
from ordertrail.api.direct import answered_directly
from ordertrail.api.health import live, ready
from ordertrail.api.items import changes, items
from ordertrail.api.metrics import metrics
from ordertrail.api.orders import OrdersController
from ordertrail.api.problems import exception_handlers
from ordertrail.api.security import ROLE, admit
from ordertrail.api.services import running_services
from ordertrail.ingest.controller import receive_webhook
from ordertrail.lib.logging import configure_logging
from ordertrail.lib.settings import Settings

__all__ = ["create_app", "openapi_config"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def entry_middleware(app: ASGIApp) -> ASGIApp:
    """Name every request, admit it by its route's role, answer plain reads early.

    One pass over the raw headers serves all three. The request id goes into
    the answer's ``X-Request-Id``: a well-formed id sent by the client is kept
    so a caller can follow its request through; anything else is replaced by
    this process's prefix and a counter, unique and next to free. A route
    with a door (``ordertrail.api.conditional.Door``) has its plain GETs
    answered here, and a direct route (``ordertrail.api.direct``) its every
    request.
    """
    prefix = secrets.token_hex(4)
    counter = itertools.count(1)

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        sent = authorization = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                sent = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"if-none-match":
                # Repeated fields form one list (RFC 9110 5.3).
                tags = value.decode("latin-1")
                if_none_match = (
                    tags if if_none_match is None else f"{if_none_match}, {tags}"
                )
        if sent is None or not _REQUEST_ID.match(sent):
            sent = f"{prefix}-{next(counter):x}"
        request_id = sent
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        opt = scope["route_handler"].opt
        needed = opt.get(ROLE)
        if needed is not None:
            await admit(scope, authorization, needed)
        if await answered_directly(scope, receive, send_with_id):
            return
        door = opt.get(DOOR)
        if door is not None and await answered_at_door(
            scope, door, if_none_match, send_with_id
        ):
            return
        await app(scope, receive, send_with_id)

    return middleware


def openapi_config() -> OpenAPIConfig:
    """Return the OpenAPI description of the service."""
    return OpenAPIConfig(
        title="ordertrail",
        version=__version__,
        description=(
            "Receives Locally cart item webhooks, keeps each as an immutable event, "
            "and serves the projected state of every item and order."
        ),
        components=Components(
            security_schemes={
                "apiKey": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="An API key from `ordertrail keys create`.",
                ),
                "webhookToken": SecurityScheme(
                    type="apiKey",
                    name="locally-webhook-token",
                    security_scheme_in="header",
                    description="A webhook token from `ordertrail tokens create`.",
                ),
            }
        ),
        path="/schema",
        render_plugins=[ScalarRenderPlugin()],
    )


def _cors(settings: Settings) -> CORSConfig | None:
    # Off unless configured: the API serves back-end systems, not browsers.
    if not settings.cors_origins:
        return None
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    return CORSConfig(
        allow_origins=origins,
        allow_methods=["GET"],
        allow_headers=["Authorization", "If-None-Match"],
        expose_headers=["ETag", "X-Request-Id", "Retry-After"],
    )


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the application; the database is reached when it starts."""
    settings = settings if settings is not None else Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with running_services(settings) as services:
            app.state.services = services
            yield

    return Litestar(
        route_handlers=[
            receive_webhook,
            OrdersController,
            changes,
            items,
            AdminController,
            export_events,
            metrics,
            live,
            ready,
        ],
        cors_config=_cors(settings),
        lifespan=[lifespan],
        middleware=[entry_middleware],
        exception_handlers=exception_handlers,
        openapi_config=openapi_config(),
        debug=False,
        logging_config=None,
    )
