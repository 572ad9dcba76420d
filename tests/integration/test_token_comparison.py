"""Checking a webhook token or an API key takes no longer for a closer guess.

The structure is what makes it so, and the first tests prove it
deterministically. A presented secret is never compared, sliced or hashed
as text: the only thing done with it is to encode it and take the SHA-256 of
all of it. Whatever is compared is that digest, with ``hmac.compare_digest``
where a stored digest is found; a secret the cache does not know is looked
up by the same digest, the only form in which the database holds it. A guess
sharing all but one character with a real secret gives a digest as unrelated
to the real one as any other, so how far a guess is right cannot show in the
time its check takes.

The last tests measure it: many interleaved timings of the check for a guess
that differs from a long real secret in its first character and one that
differs only in its last, against the same pair compared with a naive ``==``,
which stops at the first difference; once in the cache, and once through the
database look-up that a secret the cache does not know takes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn

import asyncpg
import pytest
from asyncpg.connection import LoggedQuery

from ordertrail.auth.credentials import (
    CredentialCache,
    CredentialKind,
    Issued,
    Role,
    create_credential,
)
from ordertrail.db.connection import create_pool

KINDS = [CredentialKind.WEBHOOK_TOKEN, CredentialKind.API_KEY]


async def create(
    pool: asyncpg.Pool, kind: CredentialKind, secret: str | None = None
) -> Issued:
    async with pool.acquire() as connection:
        return await create_credential(
            connection,
            kind,
            mode="live" if kind is CredentialKind.WEBHOOK_TOKEN else None,
            role=Role.READER if kind is CredentialKind.API_KEY else None,
            label="comparison tests",
            secret=secret,
        )


async def loaded_cache(pool: asyncpg.Pool) -> CredentialCache:
    """A cache as the service keeps one, loaded now and not reloaded.

    Misses are looked up in the database only once (the first), so that what
    is compared below is the in-memory check alone.
    """
    cache = CredentialCache(pool, refresh_interval=3600.0, miss_rate=1e-9)
    await cache.reload()
    return cache


async def looking_up_cache(pool: asyncpg.Pool) -> CredentialCache:
    """A cache loaded now that looks every secret it does not know up."""
    cache = CredentialCache(pool, refresh_interval=3600.0, miss_rate=1e9)
    await cache.reload()
    return cache


@dataclass(frozen=True)
class Watched:
    """A pool of one connection, and every query that connection sent."""

    pool: asyncpg.Pool
    sent: list[LoggedQuery]

    async def probes(self) -> list[LoggedQuery]:
        """The queries sent that carried values (a reload carries none)."""
        # asyncpg hands a finished query to its loggers on the next turn of
        # the event loop, not before the call that sent it returns.
        await asyncio.sleep(0)
        return [query for query in self.sent if query.args]


@pytest.fixture
async def watched_pool(database_url: str) -> AsyncIterator[Watched]:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    sent: list[LoggedQuery] = []
    try:
        async with pool.acquire() as connection:
            connection.add_query_logger(sent.append)
        yield Watched(pool, sent)
    finally:
        await pool.close()


async def active_digests(pool: asyncpg.Pool, kind: CredentialKind) -> set[bytes]:
    rows = await pool.fetch(
        "SELECT secret_sha256 FROM credentials WHERE kind = $1 "
        "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
        kind.value,
    )
    return {bytes(row["secret_sha256"]) for row in rows}


def other_than(character: str) -> str:
    return "A" if character != "A" else "B"


def guesses(secret: str) -> dict[str, str]:
    """Presented secrets sharing more or less of the real one."""
    return {
        "the secret": secret,
        "all but the last character": secret[:-1] + other_than(secret[-1]),
        "all but the first character": other_than(secret[0]) + secret[1:],
        "the secret less its last character": secret[:-1],
        "the secret and one more": secret + "x",
        "nothing in common": other_than(secret[0]) * len(secret),
    }


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class WatchedSecret(str):
    """A presented secret that notes each of its methods called on it."""

    noted: list[str]


# What could compare a secret, or part of it, with another as text.
_INSPECTIONS = (
    "__eq__",
    "__ne__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "__hash__",
    "__getitem__",
    "__iter__",
    "__contains__",
    "__len__",
    "__add__",
    "__mod__",
    "__format__",
    "__str__",
    "startswith",
    "endswith",
    "find",
    "index",
    "split",
    "partition",
    "strip",
    "lower",
    "casefold",
    "encode",
)


def _noting(name: str) -> Callable[..., Any]:
    method = getattr(str, name)

    def noted(self: WatchedSecret, *args: Any, **kwargs: Any) -> Any:
        self.noted.append(name)
        return method(self, *args, **kwargs)

    return noted


for _name in _INSPECTIONS:
    setattr(WatchedSecret, _name, _noting(_name))


def watched(text: str) -> WatchedSecret:
    secret = WatchedSecret(text)
    secret.noted = []
    return secret


@pytest.mark.parametrize("kind", KINDS)
async def test_a_presented_secret_is_only_ever_digested_whole(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, kind: CredentialKind
) -> None:
    issued = await create(pool, kind)
    cache = await loaded_cache(pool)
    stored = await active_digests(pool, kind)
    compared: list[tuple[object, object]] = []
    constant_time = hmac.compare_digest

    def recorded(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recorded)

    for what, text in guesses(issued.secret).items():
        presented = watched(text)
        compared.clear()

        found = await cache.verify(presented, kind)

        if text == issued.secret:
            assert found is not None, what
            assert found.id == issued.credential.id
            # The match is confirmed in constant time.
            assert (sha256(text), sha256(text)) in compared, what
        else:
            assert found is None, what
        # Its length was asked (an empty one is no secret) and it was encoded
        # for the digest: nothing else, no comparison, no slice, no hash.
        assert set(presented.noted) <= {"__len__", "encode"}, (what, presented.noted)
        assert "encode" in presented.noted, what
        # Whatever was compared is 32-byte digests: the whole guess's, and
        # stored ones.
        for pair in compared:
            assert sha256(text) in pair, what
            assert set(pair) <= stored | {sha256(text)}, what


@pytest.mark.parametrize("kind", KINDS)
async def test_the_database_holds_only_the_digest_and_is_searched_by_it(
    pool: asyncpg.Pool, kind: CredentialKind
) -> None:
    cache = await loaded_cache(pool)
    # Created after the cache loaded: only a look-up can find it.
    issued = await create(pool, kind)
    row = await pool.fetchval(
        "SELECT row_to_json(c)::text FROM credentials c WHERE id = $1",
        issued.credential.id,
    )

    found = await cache.verify(issued.secret, kind)

    assert issued.secret not in row
    assert sha256(issued.secret).hex() in row
    assert found is not None
    assert found.id == issued.credential.id


@pytest.mark.parametrize("kind", KINDS)
async def test_a_secret_the_cache_does_not_know_reaches_the_database_as_its_digest(
    watched_pool: Watched, kind: CredentialKind
) -> None:
    cache = await looking_up_cache(watched_pool.pool)
    # Created after the cache loaded: every guess near it is looked up.
    issued = await create(watched_pool.pool, kind)
    statements = set()

    for what, text in guesses(issued.secret).items():
        presented = watched(text)
        watched_pool.sent.clear()

        found = await cache.verify(presented, kind)

        if text == issued.secret:
            assert found is not None, what
            assert found.id == issued.credential.id
        else:
            assert found is None, what
        assert set(presented.noted) <= {"__len__", "encode"}, (what, presented.noted)
        # One probe, carrying the digest of the whole guess and the kind: no
        # prefix, no slice, nothing of the guess as text.
        (probe,) = await watched_pool.probes()
        assert probe.args == (sha256(text), kind.value), what
        assert text not in probe.query, what
        statements.add(probe.query)
    # One statement for every guess: a guess travels only as a parameter.
    assert len(statements) == 1


# Timing ----------------------------------------------------------------------

SECRET_LENGTH = 4 * 1024 * 1024
"""Long enough that comparing it whole takes a naive ``==`` a measurable time."""
PAIRS = 200
ATTEMPTS = 3


def median_extra_time(
    near: Callable[[], str],
    far: Callable[[], str],
    check: Callable[[str], object],
    pairs: int = PAIRS,
) -> float:
    """The median of how much longer checking ``near()`` took than ``far()``, in ns.

    Each pair is made afresh and checked back to back, both in a random
    order: where a string of megabytes lies in memory changes how fast it
    is read by as much as a naive comparison leaks, so no one pair of
    strings may stand for its kind. The time is the thread's own processor
    time, which other processes on a shared machine do not add to, and the
    median ignores the pairs that something else (an interrupt, a cache
    flushed) still hit.
    """
    extra: list[int] = []
    for _ in range(pairs):
        timings: dict[bool, int] = {}
        for is_near, presented in made_pair(near, far):
            started = time.thread_time_ns()
            check(presented)
            timings[is_near] = time.thread_time_ns() - started
        extra.append(timings[True] - timings[False])
    return statistics.median(extra)


def made_pair(
    near: Callable[[], str], far: Callable[[], str]
) -> list[tuple[bool, str]]:
    """A near and a far guess, made in a random order, to check in another.

    Each item says whether the guess is the near one.
    """
    made_first = random.random() < 0.5
    made = {
        is_near: near() if is_near else far()
        for is_near in (made_first, not made_first)
    }
    checked_first = random.random() < 0.5
    return [(is_near, made[is_near]) for is_near in (checked_first, not checked_first)]


async def median_extra_wall_time(
    near: Callable[[], str],
    far: Callable[[], str],
    check: Callable[[str], Awaitable[object]],
    pairs: int = PAIRS,
) -> float:
    """As :func:`median_extra_time`, for a check that waits on the database.

    Waiting takes no processor time, so this is the time on the wall: the
    database's share of a check counts, and so does whatever else the machine
    does meanwhile, which the median of many pairs checked back to back
    leaves out.
    """
    extra: list[int] = []
    for _ in range(pairs):
        timings: dict[bool, int] = {}
        for is_near, presented in made_pair(near, far):
            started = time.perf_counter_ns()
            await check(presented)
            timings[is_near] = time.perf_counter_ns() - started
        extra.append(timings[True] - timings[False])
    return statistics.median(extra)


def synchronously(
    check: Callable[[str], Coroutine[Any, Any, object]],
) -> Callable[[str], object]:
    # The check of a cached credential never waits on anything: drive the
    # coroutine to its end in place, without the event loop's own timing.
    def run(presented: str) -> object:
        coroutine = check(presented)
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        coroutine.close()
        raise AssertionError("the check waited on something")

    return run


def guesses_around(real: str) -> tuple[Callable[[], str], Callable[[], str]]:
    """Makers of a guess wrong in its last character and one wrong in its first."""
    last, first = other_than(real[-1]), other_than(real[0])

    def close() -> str:
        return real[:-1] + last

    def far() -> str:
        return first + real[1:]

    return close, far


def hides_the_match(checked: float, naive: float) -> bool:
    """Whether a check's extra time for the close guess hides how close it is.

    A naive comparison shows the leak plainly; the check must show a small
    fraction of it, if anything. A leak would show in every attempt; noise
    that hides it in one attempt does not recur.
    """
    return naive > 20_000 and abs(checked) < naive / 3


def fail_with(outcomes: list[tuple[float, float]], doing: str) -> NoReturn:
    """Fail, listing each attempt's extra time beside the naive comparison's."""
    pytest.fail(
        f"a guess sharing more of the secret took longer to {doing}: "
        + ", ".join(
            f"{checked / 1000:.1f} us more (naive == {naive / 1000:.1f} us)"
            for checked, naive in outcomes
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
async def test_a_closer_guess_is_not_checked_for_longer(
    pool: asyncpg.Pool, kind: CredentialKind
) -> None:
    real = secrets.token_urlsafe(SECRET_LENGTH)[:SECRET_LENGTH]
    await create(pool, kind, secret=real)
    cache = await loaded_cache(pool)
    close, far = guesses_around(real)

    # The one look-up of a miss in the database happens here, not in a timing.
    assert await cache.verify(far(), kind) is None
    check = synchronously(lambda presented: cache.verify(presented, kind))

    outcomes = []
    for _ in range(ATTEMPTS):
        checked = median_extra_time(close, far, check)
        naive = median_extra_time(close, far, lambda presented: presented == real)
        outcomes.append((checked, naive))
        if hides_the_match(checked, naive):
            return
    fail_with(outcomes, "check")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
async def test_a_closer_guess_is_not_looked_up_in_the_database_for_longer(
    watched_pool: Watched, kind: CredentialKind
) -> None:
    real = secrets.token_urlsafe(SECRET_LENGTH)[:SECRET_LENGTH]
    cache = await looking_up_cache(watched_pool.pool)
    # Only the database knows it: each guess below is looked up there.
    await create(watched_pool.pool, kind, secret=real)
    close, far = guesses_around(real)

    async def check(presented: str) -> object:
        return await cache.verify(presented, kind)

    async def compared_as_text(presented: str) -> object:
        return presented == real

    assert await check(far()) is None
    outcomes = []
    for _ in range(ATTEMPTS):
        watched_pool.sent.clear()
        checked = await median_extra_wall_time(close, far, check)
        looked_up = len(await watched_pool.probes())
        assert looked_up == 2 * PAIRS, "a guess was not looked up in the database"
        naive = await median_extra_wall_time(close, far, compared_as_text)
        outcomes.append((checked, naive))
        if hides_the_match(checked, naive):
            return
    fail_with(outcomes, "look up")
