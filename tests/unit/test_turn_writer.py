"""Log lines logged during one turn of the event loop are written together."""

from __future__ import annotations

import asyncio
import io

from ordertrail.lib.logging import TurnWriter


class CountingStream(io.StringIO):
    """A text stream that counts the writes it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_without_a_running_loop_a_line_is_written_at_once() -> None:
    stream = CountingStream()
    writer = TurnWriter(stream)

    writer.info('{"event":"one"}')
    writer.msg('{"event":"two"}')

    assert stream.getvalue() == '{"event":"one"}\n{"event":"two"}\n'
    assert stream.writes == 2


async def test_the_lines_of_one_turn_go_out_in_one_write_after_it() -> None:
    stream = CountingStream()
    writer = TurnWriter(stream)

    for n in range(3):
        writer.info(f'{{"event":"line","n":{n}}}')
    assert stream.getvalue() == ""

    await asyncio.sleep(0)

    assert stream.getvalue().splitlines() == [
        '{"event":"line","n":0}',
        '{"event":"line","n":1}',
        '{"event":"line","n":2}',
    ]
    assert stream.writes == 1


async def test_lines_from_tasks_of_one_turn_keep_their_order() -> None:
    stream = CountingStream()
    writer = TurnWriter(stream)

    async def answer(n: int) -> None:
        writer.info(f"line {n}")

    await asyncio.gather(*(answer(n) for n in range(10)))
    await asyncio.sleep(0)

    assert stream.getvalue().splitlines() == [f"line {n}" for n in range(10)]


async def test_a_line_written_outside_the_loop_comes_after_those_pending() -> None:
    stream = CountingStream()
    writer = TurnWriter(stream)
    writer.info("in the loop")

    await asyncio.to_thread(writer.info, "from a thread")

    assert stream.getvalue().splitlines() == ["in the loop", "from a thread"]


async def test_flush_writes_what_is_pending_once() -> None:
    stream = CountingStream()
    writer = TurnWriter(stream)
    writer.warning("pending")

    writer.flush()
    await asyncio.sleep(0)

    assert stream.getvalue() == "pending\n"
    assert stream.writes == 1
