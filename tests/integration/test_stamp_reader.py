"""Item stamps read for many concurrent revalidations in few statements."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from ordertrail.api.revalidation import Stamp, StampReader
from ordertrail.eventstore.records import StreamKey
from tests.integration.helpers import post_webhook
from tests.support import new_order_id, webhook_body


class CountingReader(StampReader):
    """A reader that counts its statements for many items."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.batches: list[int] = []

    async def _read_batch(self, items: Sequence[StreamKey]) -> list[Stamp | None]:
        self.batches.append(len(items))
        return await super()._read_batch(items)


async def stored_items(
    client: AsyncTestClient[Litestar], token: str, count: int
) -> list[StreamKey]:
    items = []
    for n in range(count):
        order_id = new_order_id()
        upc = f"{n:012d}"
        answer = await post_webhook(client, webhook_body(order_id, upc=upc), token)
        assert answer.status_code == 202, answer.text
        items.append(StreamKey("live", order_id, upc))
    return items


async def stamps_in_the_view(
    pool: asyncpg.Pool, items: Sequence[StreamKey]
) -> list[Stamp | None]:
    stamps: list[Stamp | None] = []
    for item in items:
        row = await pool.fetchrow(
            "SELECT change_xid, version FROM item_view "
            "WHERE mode = $1 AND order_id = $2 AND upc = $3",
            item.mode,
            item.order_id,
            item.upc,
        )
        stamps.append(None if row is None else (row[0], row[1]))
    return stamps


async def test_concurrent_requests_share_statements_and_get_their_own_stamps(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool, live_token: str
) -> None:
    stored = await stored_items(client, live_token, 20)
    missing = [StreamKey("live", new_order_id(), "000000000000") for _ in range(5)]
    # Every item asked for several times over, in a mixed order, and the
    # same items in test mode, where they have no rows.
    wanted = [
        *stored,
        *missing,
        *stored[::-1],
        *[StreamKey("test", i.order_id, i.upc) for i in stored],
    ]
    reader = CountingReader(pool)

    got = await asyncio.gather(*(reader.stamp(item) for item in wanted))

    assert got == await stamps_in_the_view(pool, wanted)
    assert all(stamp is not None for stamp in got[: len(stored)])
    assert got[len(stored) : len(stored) + len(missing)] == [None] * len(missing)
    # Two readers took the first two requests at once; the rest waited for
    # them and were read in batches.
    assert sum(reader.batches) == len(wanted) - 2
    assert len(reader.batches) < 5


async def test_a_lone_request_reads_its_own_stamp_at_once(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool, live_token: str
) -> None:
    (item,) = await stored_items(client, live_token, 1)
    reader = CountingReader(pool)

    stamp = await reader.stamp(item)

    assert [stamp] == await stamps_in_the_view(pool, [item])
    assert reader.batches == []


async def test_a_value_no_row_can_hold_fails_only_its_own_request(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool, live_token: str
) -> None:
    stored = await stored_items(client, live_token, 6)
    poisoned = StreamKey("live", "nul\x00in the order id", "000000000000")
    wanted = [*stored[:3], poisoned, *stored[3:]]
    reader = CountingReader(pool)

    got = await asyncio.gather(
        *(reader.stamp(item) for item in wanted), return_exceptions=True
    )

    assert isinstance(got[3], asyncpg.DataError)
    others = [stamp for n, stamp in enumerate(got) if n != 3]
    assert others == await stamps_in_the_view(pool, [*stored[:3], *stored[3:]])


async def test_a_stamp_asked_for_after_a_commit_sees_it(
    client: AsyncTestClient[Litestar], pool: asyncpg.Pool, live_token: str
) -> None:
    (item,) = await stored_items(client, live_token, 1)
    reader = StampReader(pool)
    before = await reader.stamp(item)
    body = webhook_body(item.order_id, upc=item.upc, status="refunded")

    # Revalidations in flight while the next webhook commits: the ones asked
    # for after its 202 must see it.
    waiting = [asyncio.ensure_future(reader.stamp(item)) for _ in range(10)]
    answer = await post_webhook(client, body, live_token)
    assert answer.status_code == 202
    after = await asyncio.gather(*(reader.stamp(item) for _ in range(10)))
    await asyncio.gather(*waiting)

    assert before is not None
    assert all(stamp is not None and stamp[1] == before[1] + 1 for stamp in after)


@pytest.mark.parametrize("size", [1, 3])
async def test_a_batch_of_the_waiting_fails_as_a_whole_when_the_database_fails(
    database_url: str, size: int
) -> None:
    # A pool that is closed stands for a database out of reach: every
    # request waiting on the statement gets the error, none hangs.
    closed = await asyncpg.create_pool(database_url, min_size=0, max_size=1)
    await closed.close()
    reader = StampReader(closed)
    items = [StreamKey("live", new_order_id(), "000000000000") for _ in range(size + 2)]

    got = await asyncio.wait_for(
        asyncio.gather(*(reader.stamp(i) for i in items), return_exceptions=True), 10
    )

    assert all(isinstance(outcome, asyncpg.InterfaceError) for outcome in got), got
