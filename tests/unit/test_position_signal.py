"""PositionSignal: waking readers when the log grows."""

from __future__ import annotations

import asyncio

from ordertrail.eventstore.notifications import PositionSignal


async def test_wait_times_out_without_a_notice() -> None:
    assert await PositionSignal().wait(0.01) is False


async def test_notice_wakes_every_waiter_and_records_the_position() -> None:
    signal = PositionSignal()
    waiters = [asyncio.create_task(signal.wait(1.0)) for _ in range(3)]
    await asyncio.sleep(0)

    signal.notice("42")

    assert await asyncio.gather(*waiters) == [True, True, True]
    assert signal.latest == 42


def test_latest_position_never_goes_back() -> None:
    signal = PositionSignal()

    signal.notice("42")
    signal.notice("17")

    assert signal.latest == 42


async def test_reconnect_wakes_waiters_without_a_position() -> None:
    # After a reconnect notifications may have been missed: readers re-check.
    signal = PositionSignal()
    waiter = asyncio.create_task(signal.wait(1.0))
    await asyncio.sleep(0)

    signal.notice(None)

    assert await waiter is True
    assert signal.latest == 0


async def test_a_notice_before_waiting_does_not_wake_a_later_wait() -> None:
    signal = PositionSignal()
    signal.notice("5")

    assert await signal.wait(0.01) is False
