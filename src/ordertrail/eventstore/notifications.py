"""LISTEN/NOTIFY on a dedicated connection.

A pooled connection cannot listen: the pool would hand it to someone else
and the subscription would go with it. The listener owns one connection,
re-opens it when it drops, and on every reconnect tells each subscriber that
it may have missed something, so readers re-check instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
import structlog

from ordertrail.db.connection import Connection, connect

__all__ = ["Listener", "PositionSignal"]

log = structlog.get_logger("ordertrail.notifications")

# What a lost or refused connection raises, at connect or on the open
# connection. InternalClientError is among them: when the server ends a
# session while it is idle (a fast shutdown, a terminated backend), asyncpg
# refuses the next query with it until it notices the socket closed. Any of
# these must send the loop round to reconnect; one let through would end the
# listener, and with it every wake-up, for the life of the process.
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

Handler = Callable[[str | None], None]
"""Called with a notification's payload, or ``None`` after a reconnect."""


class Listener:
    """Keeps a LISTEN connection open and dispatches notifications."""

    def __init__(self, dsn: str, *, retry_delay: float = 1.0) -> None:
        self._dsn = dsn
        self._retry_delay = retry_delay
        self._handlers: dict[str, list[Handler]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Call ``handler`` for each notification on ``channel``."""
        self._handlers.setdefault(channel, []).append(handler)

    async def start(self) -> None:
        """Connect and keep listening in the background."""
        self._task = asyncio.create_task(self._run(), name="ordertrail-listener")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                connection = await connect(self._dsn)
            except _UNAVAILABLE as error:
                log.warning("listener.unavailable", error=str(error))
                await asyncio.sleep(self._retry_delay)
                continue
            try:
                await self._listen(connection)
            except _UNAVAILABLE as error:
                log.warning("listener.disconnected", error=str(error))
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await connection.close(timeout=1)
            await asyncio.sleep(self._retry_delay)

    async def _listen(self, connection: Connection) -> None:
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _c: lost.set())
        for channel in self._handlers:
            await connection.add_listener(channel, self._dispatch)
        self.connected.set()
        self._announce_gap()
        log.info("listener.connected", channels=sorted(self._handlers))
        # Notifications arrive through the callback; this task only has to
        # notice when the connection dies.
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), timeout=5.0)
            if not lost.is_set():
                await connection.execute("SELECT 1")

    def _dispatch(
        self, _connection: Connection, _pid: int, channel: str, payload: object
    ) -> None:
        for handler in self._handlers.get(channel, ()):
            handler(str(payload))

    def _announce_gap(self) -> None:
        for handlers in self._handlers.values():
            for handler in handlers:
                handler(None)


class PositionSignal:
    """Wakes tasks waiting for the log to grow past a position."""

    def __init__(self) -> None:
        self.latest = 0
        """The highest position announced so far."""
        self.count = 0
        """How many notices arrived: a waiter compares it with what it saw."""
        self._changed = asyncio.Event()

    def notice(self, payload: str | None) -> None:
        """Handle an events notification (or a reconnect, ``None``)."""
        if payload is not None and payload.isdigit():
            self.latest = max(self.latest, int(payload))
        self.count += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_after(self, seen: int, seconds: float) -> int:
        """Wait for a notice after the ``seen``-th; return the current count.

        Returns at once if one already arrived, so nothing announced while
        the caller was busy is missed.
        """
        if self.count == seen:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._changed.wait()
        return self.count

    async def wait(self, seconds: float) -> bool:
        """Wait until the next append or reconnect; False after ``seconds``."""
        changed = self._changed
        try:
            async with asyncio.timeout(seconds):
                await changed.wait()
        except TimeoutError:
            return False
        return True
