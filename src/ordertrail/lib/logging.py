"""structlog set-up: JSON lines with stable event names and no secrets.

Every line is one event with a dotted name (``webhook.accepted``) and
key-value fields. A processor drops any field whose name suggests a secret
and masks anything that looks like one of ordertrail's own secrets or like
the password in a URL, so a careless ``log.info(..., headers=...)`` cannot
leak a token, nor an error message quoting a database URL its password.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import msgspec
import structlog

__all__ = ["configure_logging", "redact_secrets"]

_SECRET_FIELD = re.compile(
    r"token|secret|password|authorization|api_key|apikey|cookie", re.IGNORECASE
)
_SECRET_VALUE = re.compile(r"\bot[wk]_[A-Za-z0-9_-]{8,}")
# The password of a URL's user information (a database URL in an error
# message): up to the last "@" before the host, since a password may hold one.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][\w+.-]*://[^/\s:@]*):[^/\s]*@")
_ALLOWED_FIELDS = frozenset({"token_id"})


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask fields named like secrets and values shaped like our secrets.

    Nested mappings and sequences (a headers dict, a list of pairs) are
    scrubbed too, so a secret cannot hide one level down.
    """
    # Every delivery logs a line, so the usual fields take the short way:
    # a name already judged, a number, a string with nothing to mask.
    for key, value in list(event_dict.items()):
        if _names_a_secret(key):
            event_dict[key] = _REDACTED
        elif value is None or value.__class__ in _PLAIN:
            continue
        elif value.__class__ is str:
            if "ot" in value or "://" in value:
                event_dict[key] = _scrub_text(value)
        else:
            event_dict[key] = _scrub(key, value, depth=0)
    return event_dict


_PLAIN = frozenset({int, bool, float})


@functools.lru_cache(maxsize=1024)
def _names_a_secret(key: str) -> bool:
    return key not in _ALLOWED_FIELDS and _SECRET_FIELD.search(key) is not None


_REDACTED = "[redacted]"
_DEEPEST = 6


def _scrub(key: object, value: Any, *, depth: int) -> Any:  # noqa: PLR0911 - one case each
    if isinstance(key, str) and _names_a_secret(key):
        return _REDACTED
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, bytes):
        return _scrub(key, value.decode("latin-1"), depth=depth)
    if depth >= _DEEPEST:
        return value
    if isinstance(value, Mapping):
        return {k: _scrub(k, v, depth=depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return _scrub_sequence(value, depth=depth + 1)
    return value


def _scrub_text(value: str) -> str:
    if "ot" in value:
        value = _SECRET_VALUE.sub(_REDACTED, value)
    if "://" in value:
        value = _URL_PASSWORD.sub(rf"\1:{_REDACTED}@", value)
    return value


def _scrub_sequence(items: list[Any] | tuple[Any, ...], *, depth: int) -> list[Any]:
    # A pair whose first item names a secret ("authorization", "Bearer ...")
    # is a header: mask its value.
    if len(items) == 2 and isinstance(items[0], str | bytes):
        name = items[0].decode("latin-1") if isinstance(items[0], bytes) else items[0]
        if _SECRET_FIELD.search(name):
            return [name, _REDACTED]
    return [_scrub(None, item, depth=depth) for item in items]


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
            # Last before rendering, so exception text is scrubbed too.
            redact_secrets,
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
                structlog.processors.format_exc_info,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.INFO))
