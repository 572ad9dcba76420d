"""The servers under test, each a granian process on a free loopback port.

Both applications are served by the same command with the same options, so
that the server and its settings cancel out of every ratio. Each runs in its
own session: a Ctrl-C reaches the benchmark, which then stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["GRANIAN_OPTIONS", "HOST", "Server", "ServerFailed", "serve", "wait_ready"]

HOST = "127.0.0.1"

GRANIAN_OPTIONS = (
    "--interface", "asgi",
    "--http", "1",
    "--workers", "1",
    "--no-ws",
    "--log-level", "warning",
    "--factory",
)  # fmt: skip


class ServerFailed(RuntimeError):
    """A server exited or never became ready."""


@dataclass
class Server:
    """A running granian process serving one application."""

    name: str
    target: str
    port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def log_tail(self, limit: int = 4000) -> str:
        """Return the end of what the server wrote to stdout and stderr."""
        self.log.flush()
        text = Path(self.log.name).read_bytes()[-limit:]
        return text.decode("utf-8", "replace")


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def serve(
    name: str,
    target: str,
    environment: Mapping[str, str],
    options: Sequence[str] = (),
) -> Iterator[Server]:
    """Start granian serving the factory ``target``; stop it on exit.

    ``options`` go to granian after ``GRANIAN_OPTIONS``; give every server of
    one comparison the same ones.
    """
    port = free_port()
    command = [
        sys.executable, "-m", "granian", *GRANIAN_OPTIONS, *options,
        "--host", HOST, "--port", str(port), target,
    ]  # fmt: skip
    with tempfile.NamedTemporaryFile(prefix=f"ordertrail-bench-{name}-") as log:
        process = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
            command,
            env={**os.environ, **environment},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(name, target, port, process, log)
        try:
            yield server
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    # SIGINT lets granian run the application's shutdown (the writer drains).
    process.send_signal(signal.SIGINT)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        # The session holds granian's workers too; it is ours to end.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def wait_ready(server: Server, path: str, patience: float = 60.0) -> None:
    """Return once ``GET path`` answers 200; raise if the server dies first."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            msg = (
                f"{server.name} exited with {server.process.returncode}:\n"
                f"{server.log_tail()}"
            )
            raise ServerFailed(msg)
        with contextlib.suppress(OSError):
            if await _get_status(server.port, path) == 200:
                return
        await asyncio.sleep(0.1)
    msg = f"{server.name} not ready after {patience:.0f} s:\n{server.log_tail()}"
    raise ServerFailed(msg)


async def _get_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("latin-1"))
        status_line = await asyncio.wait_for(reader.readline(), 5)
    except TimeoutError:
        return 0
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = status_line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
