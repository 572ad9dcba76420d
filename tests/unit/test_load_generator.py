"""The benchmarks' load generator sends its requests in turn, from where told."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ordertrail.bench.load import run_load

_ANSWER = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n"


def _request(number: int) -> bytes:
    body = str(number).encode()
    return b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


@contextlib.asynccontextmanager
async def _recording_server() -> AsyncIterator[tuple[int, list[int]]]:
    """Yield a loopback port answering every request 202, and the bodies seen."""
    received: list[int] = []

    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r")[0])
                received.append(int(await reader.readexactly(length)))
                writer.write(_ANSWER)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, received


async def test_a_run_starts_at_first_and_wraps_around() -> None:
    requests = [_request(number) for number in range(5)]
    async with _recording_server() as (port, received):
        result = await run_load(
            "127.0.0.1", port, requests, connections=1, warmup=0, seconds=0.2, first=3
        )

    assert result.sent == len(received) > len(requests)
    assert received[:7] == [3, 4, 0, 1, 2, 3, 4]


async def test_runs_chained_by_sent_send_each_request_once() -> None:
    requests = [_request(number) for number in range(100_000)]
    async with _recording_server() as (port, received):
        first = await run_load(
            "127.0.0.1", port, requests, connections=4, warmup=0, seconds=0.1
        )
        second = await run_load(
            "127.0.0.1",
            port,
            requests,
            connections=4,
            warmup=0,
            seconds=0.1,
            first=first.sent,
        )

    sent = first.sent + second.sent
    assert sent < len(requests), "the runs wrapped around; send fewer"
    assert sorted(received) == list(range(sent))
