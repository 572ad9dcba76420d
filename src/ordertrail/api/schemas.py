"""The committed contract: the OpenAPI document and the payload JSON Schema."""

from __future__ import annotations

from pathlib import Path

import msgspec

from ordertrail.api.app import create_app
from ordertrail.api.items import ChangePage
from ordertrail.ingest.payload import LocallyWebhook
from ordertrail.lib.settings import Settings
from ordertrail.projections.items import ItemView
from ordertrail.projections.orders import OrderView

__all__ = ["SCHEMA_FILES", "render_schemas", "stale_schemas", "write_schemas"]

SCHEMA_FILES = (
    "openapi.json",
    "webhook-payload.schema.json",
    "item-view.schema.json",
    "order-view.schema.json",
    "change-page.schema.json",
)


def _pretty(document: object) -> bytes:
    # Sorted keys: litestar collects response headers in a frozenset, whose
    # order changes with the process's hash seed.
    encoded = msgspec.json.encode(document, order="sorted")
    return msgspec.json.format(encoded, indent=2) + b"\n"


def render_schemas() -> dict[str, bytes]:
    """Return each schema file's content as the code defines it now."""
    app = create_app(Settings())
    openapi = app.openapi_schema.to_schema()
    documents = {
        "webhook-payload.schema.json": (LocallyWebhook, "Locally cart item webhook"),
        "item-view.schema.json": (ItemView, "ordertrail item view"),
        "order-view.schema.json": (OrderView, "ordertrail order view"),
        "change-page.schema.json": (ChangePage, "ordertrail change feed page"),
    }
    rendered = {"openapi.json": _pretty(openapi)}
    for name, (shape, title) in documents.items():
        schema = msgspec.json.schema(shape)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = title
        rendered[name] = _pretty(schema)
    return rendered


def write_schemas(folder: Path) -> list[Path]:
    """Write the schema files into ``folder``; return the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render_schemas().items():
        path = folder / name
        path.write_bytes(content)
        written.append(path)
    return written


def stale_schemas(folder: Path) -> list[str]:
    """Return the names of schema files in ``folder`` that differ from the code."""
    return [
        name
        for name, content in render_schemas().items()
        if not (folder / name).exists() or (folder / name).read_bytes() != content
    ]
