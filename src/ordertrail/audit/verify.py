"""Verifying the log: every chain, every checkpoint, and one against the other.

All of it reads one snapshot (a repeatable-read, read-only transaction), so
appends arriving meanwhile neither count nor confuse it. The steps:

1. Each checkpoint's signature, with the configured audit key; a checkpoint
   signed with another key is reported as unverifiable.
2. Each checkpoint's digest, recomputed from the heads it recorded. One pass
   over the recorded heads in digest order feeds every checkpoint's digest
   at once; the cost is one hash update per stream per checkpoint.
3. Every stream's chain, read from the table in (stream, version) order
   through a server-side cursor, one stream in memory at a time
   (``chains.py`` names what disagrees).
4. Every head a trusted checkpoint recorded must still be in the table with
   the same hash: a missing stream, a head behind the checkpoint (its tail
   was deleted) or a head with another hash (the stream was rewritten,
   hashes and all) is reported.
5. Every event at or below the latest trusted checkpoint's position must be
   covered by it: one that is not was inserted after the checkpoint.

A trusted checkpoint is one whose signature and digest both hold (or, with
no key configured, whose digest holds). Steps 3 to 5 can be narrowed to one
order or one mode; steps 1 and 2 always cover every checkpoint, since each
digest spans every stream.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import msgspec
import structlog

from ordertrail.audit.chains import (
    CHAIN_COLUMNS,
    ChainEvent,
    Finding,
    FindingKind,
    check_stream,
)
from ordertrail.audit.checkpoints import Checkpoint, list_checkpoints, recorded_heads
from ordertrail.audit.digest import AuditKey, HeadsDigest, entry
from ordertrail.db.connection import Connection

__all__ = ["VerifyReport", "verify_log"]

log = structlog.get_logger("ordertrail.audit")


class VerifyReport(msgspec.Struct, kw_only=True):
    """What a verification looked at and what it found."""

    events: int = 0
    streams: int = 0
    checkpoints: int = 0
    signatures_checked: bool = False
    """False when no audit key was configured: signatures were not checked."""
    scope: str = "the whole log"
    findings: list[Finding] = msgspec.field(default_factory=list)
    omitted: int = 0
    """Findings past the limit, counted but not kept."""
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """Whether nothing was found."""
        return not self.findings and not self.omitted


class _Findings:
    """Collects findings up to a limit, logging each one kept."""

    def __init__(self, report: VerifyReport, limit: int) -> None:
        self.report = report
        self.limit = limit

    def add(self, finding: Finding) -> None:
        if len(self.report.findings) >= self.limit:
            self.report.omitted += 1
            return
        self.report.findings.append(finding)
        # Each one at info: the summary below is the warning, and a command
        # line that prints every finding should not print it twice.
        log.info(
            "audit.tampering_found",
            kind=finding.kind.value,
            mode=finding.mode,
            order_id=finding.order_id,
            upc=finding.upc,
            version=finding.version,
            position=finding.position,
            checkpoint=finding.checkpoint,
            detail=finding.detail,
        )


async def verify_log(
    connection: Connection,
    *,
    key: AuditKey | None,
    order_id: str | None = None,
    mode: str | None = None,
    max_findings: int = 10_000,
    on_progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check chains and checkpoints; return the report (see the module docstring).

    ``connection`` must not be in a transaction. ``on_progress`` is called
    with the number of events checked so far, every 100,000 or so.
    """
    started = time.perf_counter()
    report = VerifyReport(
        signatures_checked=key is not None, scope=_scope(order_id, mode)
    )
    found = _Findings(report, max_findings)
    log.info("audit.verify_started", scope=report.scope)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        checkpoints = await list_checkpoints(connection)
        report.checkpoints = len(checkpoints)
        untrusted = _check_signatures(checkpoints, key, found)
        untrusted |= await _check_digests(connection, checkpoints, found)
        trusted = [c for c in checkpoints if c.id not in untrusted]
        await _check_chains(connection, report, found, (order_id, mode), on_progress)
        await _check_recorded_heads(connection, trusted, found, order_id, mode)
        await _check_coverage(connection, trusted, found, order_id, mode)
    report.seconds = time.perf_counter() - started

    if report.clean:
        log.info(
            "audit.verify_passed",
            scope=report.scope,
            events=report.events,
            streams=report.streams,
            checkpoints=report.checkpoints,
            signatures_checked=report.signatures_checked,
        )
    else:
        kinds = Counter(f.kind.value for f in report.findings)
        log.warning(
            "audit.verify_failed",
            scope=report.scope,
            findings=len(report.findings) + report.omitted,
            kinds=dict(sorted(kinds.items())),
        )
    return report


def _scope(order_id: str | None, mode: str | None) -> str:
    if order_id is None and mode is None:
        return "the whole log"
    parts = [f"order {order_id}"] if order_id is not None else []
    parts += [f"mode {mode}"] if mode is not None else []
    return ", ".join(parts)


def _check_signatures(
    checkpoints: list[Checkpoint], key: AuditKey | None, found: _Findings
) -> set[int]:
    untrusted: set[int] = set()
    if key is None:
        return untrusted
    for checkpoint in checkpoints:
        if checkpoint.key_id != key.key_id:
            untrusted.add(checkpoint.id)
            found.add(
                Finding(
                    kind=FindingKind.UNKNOWN_SIGNING_KEY,
                    checkpoint=checkpoint.id,
                    position=checkpoint.position,
                    detail=f"signed with key {checkpoint.key_id}, not with the "
                    f"configured key {key.key_id}: its signature cannot be checked",
                )
            )
        elif not key.signed(
            checkpoint.signature,
            checkpoint.position,
            checkpoint.stream_count,
            checkpoint.digest,
            checkpoint.created_at,
        ):
            untrusted.add(checkpoint.id)
            found.add(
                Finding(
                    kind=FindingKind.BAD_SIGNATURE,
                    checkpoint=checkpoint.id,
                    position=checkpoint.position,
                    detail="the signature does not match its position, stream count, "
                    "digest and time: the checkpoint was forged or altered",
                )
            )
    return untrusted


async def _check_digests(
    connection: Connection, checkpoints: list[Checkpoint], found: _Findings
) -> set[int]:
    if not checkpoints:
        return set()
    digests = [HeadsDigest() for _ in checkpoints]
    index = {checkpoint.id: i for i, checkpoint in enumerate(checkpoints)}

    def feed(key: tuple[str, str, str], rows: list[tuple[int, bytes]]) -> None:
        # rows: (checkpoint index, encoded head), rising. Each checkpoint
        # from the first that recorded the stream carries its latest head.
        following = 0
        current = rows[0][1]
        for i in range(rows[0][0], len(digests)):
            while following + 1 < len(rows) and rows[following + 1][0] <= i:
                following += 1
                current = rows[following][1]
            digests[i].add_entry(key, current)

    stream: tuple[str, str, str] | None = None
    rows: list[tuple[int, bytes]] = []
    async for checkpoint_id, mode, order_id, upc, version, head in recorded_heads(
        connection
    ):
        key = (mode, order_id, upc)
        if key != stream:
            if stream is not None:
                feed(stream, rows)
            stream, rows = key, []
        rows.append((index[checkpoint_id], entry(mode, order_id, upc, version, head)))
    if stream is not None:
        feed(stream, rows)

    untrusted: set[int] = set()
    for checkpoint, digest in zip(checkpoints, digests, strict=True):
        recomputed = (digest.digest(), digest.count)
        if recomputed != (checkpoint.digest, checkpoint.stream_count):
            untrusted.add(checkpoint.id)
            found.add(
                Finding(
                    kind=FindingKind.CHECKPOINT_HEADS_ALTERED,
                    checkpoint=checkpoint.id,
                    position=checkpoint.position,
                    detail=f"its recorded heads ({digest.count} streams) hash to "
                    f"{digest.digest().hex()}, but it states {checkpoint.stream_count} "
                    f"streams with digest {checkpoint.digest.hex()}: recorded heads "
                    "were added, changed or removed",
                )
            )
    return untrusted


def _where(
    alias: str, order_id: str | None, mode: str | None, first: int
) -> tuple[str, list[str]]:
    """Return SQL conditions narrowing to the scope, and their parameters."""
    conditions: list[str] = []
    parameters: list[str] = []
    if order_id is not None:
        conditions.append(f"{alias}.order_id = ${first + len(parameters)}")
        parameters.append(order_id)
    if mode is not None:
        conditions.append(f"{alias}.mode = ${first + len(parameters)}")
        parameters.append(mode)
    return "".join(f" AND {c}" for c in conditions), parameters


async def _check_chains(
    connection: Connection,
    report: VerifyReport,
    found: _Findings,
    scope: tuple[str | None, str | None],
    on_progress: Callable[[int], None] | None,
) -> None:
    order_id, mode = scope
    where, parameters = _where("e", order_id, mode, 1)
    query = (
        f"SELECT {CHAIN_COLUMNS} FROM events e WHERE true{where} "
        "ORDER BY e.mode, e.order_id, e.upc, e.version"
    )
    stream: tuple[str, str, str] | None = None
    events: list[ChainEvent] = []
    async for row in connection.cursor(query, *parameters, prefetch=5000):
        event = ChainEvent(*row)
        key = (event.mode, event.order_id, event.upc)
        if key != stream:
            if events:
                _check_one(events, report, found)
            stream, events = key, []
        events.append(event)
        report.events += 1
        if on_progress is not None and report.events % 100_000 == 0:
            on_progress(report.events)
    if events:
        _check_one(events, report, found)


def _check_one(
    events: list[ChainEvent], report: VerifyReport, found: _Findings
) -> None:
    report.streams += 1
    for finding in check_stream(events):
        found.add(finding)


_RECORDED_MISMATCHES = """
    SELECT h.checkpoint_id, h.mode, h.order_id, h.upc, h.version, h.hash,
           e.hash AS found_hash,
           (SELECT max(x.version) FROM events x
            WHERE x.order_id = h.order_id AND x.mode = h.mode AND x.upc = h.upc
           ) AS head_version
    FROM audit_checkpoint_heads h
    LEFT JOIN events e
      ON e.order_id = h.order_id AND e.mode = h.mode AND e.upc = h.upc
     AND e.version = h.version
    WHERE h.checkpoint_id = ANY($1::bigint[])
      AND e.hash IS DISTINCT FROM h.hash{where}
    ORDER BY h.mode, h.order_id, h.upc, h.checkpoint_id
"""


class _Mismatch(msgspec.Struct, frozen=True):
    """A recorded head the table no longer holds as recorded."""

    checkpoint_id: int
    version: int
    hash: bytes
    found_hash: bytes | None
    """The hash of the event at that version now, if there is one."""
    head_version: int | None
    """The stream's highest version now, if any event of it remains."""


async def _check_recorded_heads(
    connection: Connection,
    trusted: list[Checkpoint],
    found: _Findings,
    order_id: str | None,
    mode: str | None,
) -> None:
    if not trusted:
        return
    where, parameters = _where("h", order_id, mode, 2)
    rows = await connection.fetch(
        _RECORDED_MISMATCHES.format(where=where), [c.id for c in trusted], *parameters
    )
    by_stream: dict[tuple[str, str, str], list[_Mismatch]] = {}
    for row in rows:
        by_stream.setdefault((row["mode"], row["order_id"], row["upc"]), []).append(
            _Mismatch(
                row["checkpoint_id"],
                row["version"],
                row["hash"],
                row["found_hash"],
                row["head_version"],
            )
        )
    for stream, mismatches in by_stream.items():
        for finding in _recorded_findings(stream, mismatches):
            found.add(finding)


def _recorded_findings(
    stream: tuple[str, str, str], mismatches: list[_Mismatch]
) -> list[Finding]:
    mode, order_id, upc = stream
    latest = max(mismatches, key=lambda m: (m.version, m.checkpoint_id))
    recorded = (
        f"checkpoint {latest.checkpoint_id} recorded its head at version "
        f"{latest.version} (hash {latest.hash.hex()})"
    )
    if latest.head_version is None:
        return [
            Finding(
                kind=FindingKind.STREAM_MISSING,
                version=latest.version,
                checkpoint=latest.checkpoint_id,
                detail=f"{recorded}; no event of the stream remains: the whole "
                "stream was deleted",
                mode=mode,
                order_id=order_id,
                upc=upc,
            )
        ]
    findings = []
    if latest.head_version < latest.version:
        findings.append(
            Finding(
                kind=FindingKind.HEAD_BEHIND_CHECKPOINT,
                version=latest.head_version,
                checkpoint=latest.checkpoint_id,
                detail=f"the stream ends at version {latest.head_version}, but "
                f"{recorded}: versions {latest.head_version + 1} to {latest.version} "
                "were deleted from its tail",
                mode=mode,
                order_id=order_id,
                upc=upc,
            )
        )
    for mismatch in mismatches:
        # A recorded version that is gone from a stream that goes on past it
        # was deleted from the middle: the chain check reports that gap.
        if mismatch.found_hash is not None:
            findings.append(
                Finding(
                    kind=FindingKind.HEAD_REWRITTEN,
                    version=mismatch.version,
                    checkpoint=mismatch.checkpoint_id,
                    detail=f"version {mismatch.version} hashes to "
                    f"{mismatch.found_hash.hex()}, but checkpoint "
                    f"{mismatch.checkpoint_id} recorded {mismatch.hash.hex()}: the "
                    "stream was rewritten with recomputed hashes",
                    mode=mode,
                    order_id=order_id,
                    upc=upc,
                )
            )
    return findings


_UNCOVERED = """
    WITH recorded AS (
        SELECT DISTINCT ON (h.order_id, h.mode, h.upc)
               h.order_id, h.mode, h.upc, h.version
        FROM audit_checkpoint_heads h
        WHERE h.checkpoint_id = ANY($1::bigint[]){heads_where}
        ORDER BY h.order_id, h.mode, h.upc, h.checkpoint_id DESC
    )
    SELECT e.mode, e.order_id, e.upc, e.version, e.position, r.version AS recorded
    FROM events e
    LEFT JOIN recorded r
      ON r.order_id = e.order_id AND r.mode = e.mode AND r.upc = e.upc
    WHERE e.position <= $2 AND (r.version IS NULL OR e.version > r.version){where}
    ORDER BY e.position
    LIMIT $3
"""


async def _check_coverage(
    connection: Connection,
    trusted: list[Checkpoint],
    found: _Findings,
    order_id: str | None,
    mode: str | None,
) -> None:
    if not trusted:
        return
    latest = trusted[-1]
    heads_where, parameters = _where("h", order_id, mode, 4)
    where, _ = _where("e", order_id, mode, 4)
    rows = await connection.fetch(
        _UNCOVERED.format(heads_where=heads_where, where=where),
        [c.id for c in trusted],
        latest.position,
        found.limit + 1,
        *parameters,
    )
    for row in rows:
        recorded = row["recorded"]
        found.add(
            Finding(
                kind=FindingKind.UNRECORDED_EVENT,
                mode=row["mode"],
                order_id=row["order_id"],
                upc=row["upc"],
                version=row["version"],
                position=row["position"],
                checkpoint=latest.id,
                detail=f"at or below checkpoint {latest.id}'s position "
                f"{latest.position}, yet the checkpoint "
                + (
                    "does not know its stream"
                    if recorded is None
                    else f"recorded the stream only up to version {recorded}"
                )
                + ": it was inserted after the checkpoint",
            )
        )
