"""structlog set-up: JSON lines with stable event names and no secrets.

Every line is one event with a dotted name (``webhook.accepted``) and
key-value fields. A processor drops any field whose name suggests a secret
and masks anything that looks like one of ordertrail's own secrets, so a
careless ``log.info(..., headers=...)`` cannot leak a token.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog

__all__ = ["configure_logging", "redact_secrets"]

_SECRET_FIELD = re.compile(
    r"token|secret|password|authorization|api_key|apikey|cookie", re.IGNORECASE
)
_SECRET_VALUE = re.compile(r"\bot[wk]_[A-Za-z0-9_-]{8,}")
_ALLOWED_FIELDS = frozenset({"token_id"})


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask fields named like secrets and values shaped like our secrets."""
    for key in list(event_dict):
        if key not in _ALLOWED_FIELDS and _SECRET_FIELD.search(key):
            event_dict[key] = "[redacted]"
            continue
        value = event_dict[key]
        if isinstance(value, str) and _SECRET_VALUE.search(value):
            event_dict[key] = _SECRET_VALUE.sub("[redacted]", value)
    return event_dict


def _to_json(event_dict: Any, **_options: Any) -> str:
    # msgspec renders a line several times faster than the json module, and
    # there is one line per delivery.
    return _encoder.encode(event_dict).decode()


_encoder = msgspec.json.Encoder(enc_hook=repr)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Route structlog and the standard library's loggers to stderr."""
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_to_json)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

    # Libraries (asyncpg, granian, uvicorn) log through the standard library;
    # render them the same way so the stream stays one JSON line per event.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.INFO))
