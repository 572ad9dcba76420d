"""A closed-loop HTTP/1.1 load generator on asyncio protocols.

Each connection keeps one request in flight: it writes pre-built bytes, waits
for the whole response, and sends the next. Protocol callbacks instead of
streams, and no HTTP library, keep the cost per request to a write, a read
and a few slices, so that on a small machine the generator leaves the CPU to
the server it measures. Its own CPU time is reported so a reader can check.

Requests are pre-built bytes taken in turn, or, where each request depends on
the answer before it (walking a paged listing by its cursors), come from a
``Walk`` that each connection keeps for itself.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["LoadResult", "Walk", "run_load"]

_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
# Answers that never have a body, whatever their headers say (RFC 9112 6.3).
_BODILESS = frozenset({204, 304})


class Walk(Protocol):
    """The requests of one connection when each depends on the answer before."""

    def first(self) -> bytes:
        """Return the request to send on a fresh connection."""
        ...

    def next(self, status: int, body: bytes) -> bytes:
        """Return the request to send after an answer with ``status`` and ``body``."""
        ...


class _FramingError(Exception):
    """The server's response is not one this generator can frame."""


@dataclass
class LoadResult:
    """What one load run measured, inside its window unless said otherwise."""

    window: float
    """Seconds between the end of the warm-up and the end of the run."""
    accepted: int
    """Accepted responses (2xx unless told otherwise) completed inside the window."""
    rejected: Counter[int]
    """Other responses completed inside the window, by status."""
    failures: int
    """Requests inside the window lost to a dropped connection or bad framing."""
    latencies_ns: array.array[int]
    """Send-to-complete-response time of each accepted request in the window."""
    client_cpu: float
    """CPU seconds this process spent inside the window."""
    total_accepted: int
    """Accepted responses over the whole run: warm-up, window and drain."""
    unanswered: int
    """Requests sent but never answered over the whole run; they may be stored."""
    sent: int = 0
    """Requests sent over the whole run; a run started at ``first`` plus this
    takes up where this one stopped."""

    @property
    def errors(self) -> int:
        """Responses not accepted and failed requests inside the window."""
        return sum(self.rejected.values()) + self.failures

    @property
    def throughput(self) -> float:
        """Accepted requests per second inside the window."""
        return self.accepted / self.window if self.window > 0 else 0.0


@dataclass
class _Run:
    """The state all connections of one run share; one event loop, so no locks."""

    requests: Sequence[bytes]
    accept: Collection[int] | None = None
    """Statuses that count as accepted; ``None`` counts every 2xx."""
    next_index: int = 0
    recording: bool = False
    stopping: bool = False
    in_flight: int = 0
    accepted: int = 0
    rejected: Counter[int] = field(default_factory=Counter)
    failures: int = 0
    total_accepted: int = 0
    unanswered: int = 0
    latencies_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    opened_at: float = 0.0
    closed_at: float = 0.0
    cpu_at_open: float = 0.0
    cpu_at_close: float = 0.0

    def next_request(self) -> bytes:
        request = self.requests[self.next_index % len(self.requests)]
        self.next_index += 1
        return request

    def answered(self, status: int, latency_ns: int) -> None:
        self.in_flight -= 1
        accept = self.accept
        if (200 <= status < 300) if accept is None else (status in accept):
            self.total_accepted += 1
            if self.recording:
                self.accepted += 1
                self.latencies_ns.append(latency_ns)
        elif self.recording:
            self.rejected[status] += 1
        self._check_drained()

    def lost(self) -> None:
        self.in_flight -= 1
        self.unanswered += 1
        if self.recording:
            self.failures += 1
        self._check_drained()

    def _check_drained(self) -> None:
        if self.stopping and self.in_flight == 0:
            self.drained.set()


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(
        self, run: _Run, closed: asyncio.Future[None], walk: Walk | None = None
    ) -> None:
        self._run = run
        self._closed = closed
        self._walk = walk
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._sent_at = 0
        self._waiting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.send_next(self._walk.first() if self._walk is not None else None)

    def send_next(self, request: bytes | None = None) -> None:
        """Send ``request`` (by default the run's next), unless the run is stopping."""
        run = self._run
        if run.stopping or self._transport is None or self._transport.is_closing():
            return
        run.in_flight += 1
        self._waiting = True
        self._sent_at = time.perf_counter_ns()
        self._transport.write(request if request is not None else run.next_request())

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while self._waiting:
            end = buffer.find(_HEAD_END)
            if end < 0:
                return
            try:
                status, length = _parse_head(bytes(buffer[:end]))
            except (_FramingError, ValueError):
                self._abort()
                return
            size = end + len(_HEAD_END) + length
            if len(buffer) < size:
                return
            latency = time.perf_counter_ns() - self._sent_at
            following = None
            if self._walk is not None:
                body = bytes(buffer[end + len(_HEAD_END) : size])
                following = self._walk.next(status, body)
            del buffer[:size]
            self._waiting = False
            self._run.answered(status, latency)
            self.send_next(following)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiting:
            self._waiting = False
            self._run.lost()
        if not self._closed.done():
            self._closed.set_result(None)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _parse_head(head: bytes) -> tuple[int, int]:
    """Return the status and Content-Length of a response head."""
    if not head.startswith(b"HTTP/1.1 ") or len(head) < 12:
        raise _FramingError(head[:32])
    status = int(head[9:12])
    if status in _BODILESS or status < 200:
        return status, 0
    lowered = head.lower()
    start = lowered.find(_CONTENT_LENGTH)
    if start < 0:
        # Chunked or close-delimited bodies are not expected from a handler
        # that returns bytes; count them as failures rather than guess.
        raise _FramingError(head[:32])
    start += len(_CONTENT_LENGTH)
    end = lowered.find(b"\r\n", start)
    return status, int(lowered[start : end if end >= 0 else None])


async def _keep_connected(
    host: str,
    port: int,
    run: _Run,
    walk: Walk | None = None,
    reconnect_delay: float = 0.05,
) -> None:
    """Hold one connection open until the run stops, reopening it if dropped."""
    loop = asyncio.get_running_loop()
    while not run.stopping:
        closed: asyncio.Future[None] = loop.create_future()
        try:
            transport, _ = await loop.create_connection(
                functools.partial(_Connection, run, closed, walk), host, port
            )
        except OSError:
            if run.recording:
                run.failures += 1
            await asyncio.sleep(reconnect_delay)
            continue
        try:
            await closed
        finally:
            transport.close()


async def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    connections: int,
    warmup: float,
    seconds: float,
    drain_timeout: float = 30.0,
    on_window_open: Callable[[], None] | None = None,
    on_window_close: Callable[[], None] | None = None,
    accept: Collection[int] | None = None,
    walks: Callable[[int], Walk] | None = None,
    first: int = 0,
) -> LoadResult:
    """Load ``host:port`` with ``requests`` in turn, over keep-alive connections.

    Requests run for ``warmup`` seconds unrecorded, then ``seconds`` recorded;
    then no new request is sent and those in flight are awaited, so that
    every request the server took is answered before the run returns. The
    callbacks run when the recorded window opens and closes.

    ``accept`` names the statuses that count as accepted (by default every
    2xx). With ``walks``, connection ``k`` takes its requests from
    ``walks(k)`` instead of from ``requests``, which may then be empty.
    ``first`` is the index in ``requests`` to start from; past the end they
    start again from the beginning.
    """
    if walks is None and not requests:
        msg = "run_load needs requests or walks"
        raise ValueError(msg)
    loop = asyncio.get_running_loop()
    run = _Run(requests, accept, next_index=first)
    closed = asyncio.Event()

    def open_window() -> None:
        if on_window_open is not None:
            on_window_open()
        run.opened_at = time.perf_counter()
        run.cpu_at_open = time.process_time()
        run.recording = True

    def close_window() -> None:
        run.recording = False
        run.closed_at = time.perf_counter()
        run.cpu_at_close = time.process_time()
        if on_window_close is not None:
            on_window_close()
        run.stopping = True
        if run.in_flight == 0:
            run.drained.set()
        closed.set()

    holders = [
        asyncio.create_task(
            _keep_connected(host, port, run, walks(k) if walks is not None else None)
        )
        for k in range(connections)
    ]
    loop.call_later(warmup, open_window)
    loop.call_later(warmup + seconds, close_window)
    try:
        await closed.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.drained.wait(), drain_timeout)
    finally:
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)

    return LoadResult(
        window=run.closed_at - run.opened_at,
        accepted=run.accepted,
        rejected=run.rejected,
        failures=run.failures,
        latencies_ns=run.latencies_ns,
        client_cpu=run.cpu_at_close - run.cpu_at_open,
        total_accepted=run.total_accepted,
        # A request still in flight when the drain gave up is unanswered too;
        # one lost with its connection has already moved from one to the other.
        unanswered=run.unanswered + run.in_flight,
        sent=run.next_index - first,
    )
