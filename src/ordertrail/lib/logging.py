"""structlog set-up: JSON lines with stable event names and no secrets.

Every line is one event with a dotted name (``webhook.accepted``) and
key-value fields. A processor drops any field whose name suggests a secret
and masks anything that looks like one of ordertrail's own secrets or like
the password in a URL, so a careless ``log.info(..., headers=...)`` cannot
leak a token, nor an error message quoting a database URL its password.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import re
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import msgspec
import structlog

__all__ = ["TurnWriter", "configure_logging", "redact_secrets"]

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


class TurnWriter:
    """A structlog logger that writes the lines of one event-loop turn at once.

    Every delivery logs a line. Written one by one, each line is a system
    call on the event loop's thread, and each call hands the GIL to the
    server's own threads, so the loop waits to get it back: under load that
    cost the ingest path more than building the line. Lines logged while a
    loop runs are gathered and written together once the loop has run what
    was ready, which is right after a committed batch answered its requests.
    Without a running loop (commands, start-up, another thread) a line is
    written at once.

    A process killed outright loses at most the lines of the turn it was in;
    what they record is in the database already.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._pending: list[str] = []
        # A line from another thread writes the pending ones first.
        self._lock = threading.Lock()
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        """Write ``message`` as one line, now or at the end of this turn."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            self._write(message + "\n")
            return
        with self._lock:
            if not self._pending:
                loop.call_soon(self.flush)
            self._pending.append(message)

    # structlog calls the method named after the level.
    debug = info = warning = warn = error = err = critical = exception = msg

    def flush(self) -> None:
        """Write the lines gathered so far."""
        with self._lock:
            lines, self._pending = self._pending, []
        if lines:
            self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()


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
        logger_factory=_logger_factory(sys.stderr),
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


@functools.lru_cache(maxsize=4)
def _logger_factory(file: TextIO) -> Callable[..., TurnWriter]:
    # configure_logging runs for every app a process creates (the tests make
    # many): one writer per stream, shared by every structlog logger, keeps
    # all their lines in one order.
    writer = TurnWriter(file)

    def factory(*_names: Any) -> TurnWriter:
        return writer

    return factory
