"""Checking an export file with no database: chains, versions, count, heads.

The file is read twice at most. The first pass checks each line as it goes,
keeping only the last version and hash of each stream: every event must
hash to its ``hash`` after its ``previous_hash`` and link to the stream's
event before it, versions must follow each other, positions must rise and
stay inside the exported range. Streams that fail are read again in a second
pass, whole, and classified with the same code that checks the table
(``chains.py``). Last, the summary line must agree with the lines: the count,
the positions, and every stream's head.

In an export that starts after position 1, a stream's first event in the
range may rightly have a version above 1; its ``previous_hash`` is then taken
as given, since the event it names is outside the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import msgspec
import structlog

from ordertrail.audit.chains import (
    ChainEvent,
    Finding,
    FindingKind,
    check_stream,
    content_hash,
)
from ordertrail.audit.digest import HeadsDigest
from ordertrail.audit.export import ExportedEvent, ExportHeader
from ordertrail.eventstore.hashing import GENESIS

__all__ = ["ExportCheck", "verify_export"]

log = structlog.get_logger("ordertrail.audit")

StreamKey = tuple[str, str, str]


class _HeaderLine(msgspec.Struct, frozen=True):
    export: ExportHeader


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """The last line's content."""

    format: str
    count: int
    first_position: int | None
    last_position: int | None
    from_position: int
    to_position: int
    mode: str | None
    heads: list[tuple[str, str, str, int, str]]
    streams: int
    heads_digest: str


class _SummaryLine(msgspec.Struct, frozen=True):
    summary: Summary


class ExportCheck(msgspec.Struct, kw_only=True):
    """What the check of an export file found."""

    path: str
    events: int = 0
    streams: int = 0
    heads_digest: str | None = None
    """The digest of the heads the event lines end at, recomputed."""
    summary: bool = False
    findings: list[Finding] = msgspec.field(default_factory=list)
    omitted: int = 0

    @property
    def clean(self) -> bool:
        """Whether nothing was found."""
        return not self.findings and not self.omitted


class _Head:
    __slots__ = ("flagged", "hash", "line", "position", "version")

    def __init__(self, event: ChainEvent, line: int, *, flagged: bool) -> None:
        self.version = event.version
        self.hash = event.hash
        self.position = event.position
        self.line = line
        self.flagged = flagged


_events = msgspec.json.Decoder(ExportedEvent)
_headers = msgspec.json.Decoder(_HeaderLine)
_summaries = msgspec.json.Decoder(_SummaryLine)


def _chain_event(event: ExportedEvent) -> ChainEvent:
    return ChainEvent(
        mode=event.mode,
        order_id=event.order_id,
        upc=event.upc,
        version=event.version,
        position=event.position,
        event_type=event.event_type,
        raw_status=event.raw_status,
        raw_body=event.raw_body,
        body_sha256=bytes.fromhex(event.body_sha256),
        received_at=datetime.fromisoformat(event.received_at),
        previous_hash=bytes.fromhex(event.previous_hash),
        hash=bytes.fromhex(event.hash),
    )


class _Checker:
    def __init__(self, path: Path, expect_digest: str | None, limit: int) -> None:
        self.path = path
        self.expect_digest = expect_digest
        self.limit = limit
        self.result = ExportCheck(path=str(path))
        self.header: ExportHeader | None = None
        self.summary: Summary | None = None
        self.heads: dict[StreamKey, _Head] = {}
        self.first_position: int | None = None
        self.last_position = 0

    def add(self, finding: Finding) -> None:
        if len(self.result.findings) >= self.limit:
            self.result.omitted += 1
        else:
            self.result.findings.append(finding)

    @property
    def anchored(self) -> bool:
        return self.header is None or self.header.from_position > 1

    def lines(self) -> Iterator[tuple[int, bytes]]:
        with self.path.open("rb") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    yield number, line

    def first_pass(self) -> None:
        for number, line in self.lines():
            if number == 1 and self._read_header(line):
                continue
            if self.summary is not None:
                self.add(
                    Finding(
                        kind=FindingKind.MALFORMED_LINE,
                        line=number,
                        detail="a line follows the summary line",
                    )
                )
                continue
            event = self._read_event(number, line)
            if event is not None:
                self._check_event(number, event)

    def _read_header(self, line: bytes) -> bool:
        try:
            self.header = _headers.decode(line).export
        except msgspec.DecodeError:
            self.add(
                Finding(
                    kind=FindingKind.HEADER_MISSING,
                    line=1,
                    detail='the first line is not the {"export": ...} header; the '
                    "range and mode it states cannot be checked",
                )
            )
            return False
        return True

    def _read_event(self, number: int, line: bytes) -> ChainEvent | None:
        try:
            return _chain_event(_events.decode(line))
        except (msgspec.DecodeError, ValueError) as event_error:
            try:
                self.summary = _summaries.decode(line).summary
            except msgspec.DecodeError:
                self.add(
                    Finding(
                        kind=FindingKind.MALFORMED_LINE,
                        line=number,
                        detail=f"neither an event nor the summary: {event_error}",
                    )
                )
            return None

    def _check_event(self, number: int, event: ChainEvent) -> None:
        self.result.events += 1
        self._check_place(number, event)
        key = (event.mode, event.order_id, event.upc)
        head = self.heads.get(key)
        if head is None:
            links = (event.version == 1 and event.previous_hash == GENESIS) or (
                self.anchored and event.version > 1
            )
            self.heads[key] = head = _Head(event, number, flagged=not links)
        else:
            links = (
                event.version == head.version + 1 and event.previous_hash == head.hash
            )
            head.flagged = head.flagged or not links
            head.version, head.hash = event.version, event.hash
            head.position, head.line = event.position, number
        if (
            content_hash(event) != event.hash
            or hashlib.sha256(event.raw_body).digest() != event.body_sha256
        ):
            head.flagged = True

    def _check_place(self, number: int, event: ChainEvent) -> None:
        if event.position <= self.last_position:
            self.add(
                Finding(
                    kind=FindingKind.POSITIONS_NOT_ASCENDING,
                    line=number,
                    position=event.position,
                    detail=f"position {event.position} follows position "
                    f"{self.last_position}: lines were moved or repeated",
                )
            )
        if self.first_position is None:
            self.first_position = event.position
        self.last_position = max(self.last_position, event.position)
        header = self.header
        if header is not None and (
            not header.from_position <= event.position <= header.to_position
            or (header.mode is not None and event.mode != header.mode)
        ):
            self.add(
                Finding(
                    kind=FindingKind.POSITION_OUT_OF_RANGE,
                    line=number,
                    position=event.position,
                    mode=event.mode,
                    order_id=event.order_id,
                    upc=event.upc,
                    detail=f"outside the exported range {header.from_position} to "
                    f"{header.to_position} (mode {header.mode or 'any'})",
                )
            )

    def second_pass(self) -> None:
        flagged = {key for key, head in self.heads.items() if head.flagged}
        if not flagged:
            return
        streams: dict[StreamKey, list[ChainEvent]] = {key: [] for key in flagged}
        lines: dict[int, int] = {}
        for number, line in self.lines():
            try:
                exported = _events.decode(line)
            except msgspec.DecodeError:
                continue
            key = (exported.mode, exported.order_id, exported.upc)
            if key in streams:
                try:
                    streams[key].append(_chain_event(exported))
                except ValueError:
                    continue
                lines[exported.position] = number
        for key in sorted(flagged):
            events = sorted(streams[key], key=lambda e: (e.version, e.position))
            for finding in check_stream(events, anchored=self.anchored):
                found_at = lines.get(finding.position) if finding.position else None
                self.add(msgspec.structs.replace(finding, line=found_at))

    def check_summary(self) -> None:
        self.result.streams = len(self.heads)
        digest = HeadsDigest()
        for key in sorted(self.heads):
            head = self.heads[key]
            digest.add(*key, head.version, head.hash)
        self.result.heads_digest = digest.digest().hex()
        if self.expect_digest is not None and (
            self.expect_digest.lower() != self.result.heads_digest
        ):
            self.add(
                Finding(
                    kind=FindingKind.HEADS_DIGEST_MISMATCH,
                    detail=f"the heads the lines end at hash to "
                    f"{self.result.heads_digest}, not to the expected "
                    f"{self.expect_digest.lower()}",
                )
            )

        summary = self.summary
        if summary is None:
            self.add(
                Finding(
                    kind=FindingKind.SUMMARY_MISSING,
                    detail="the file ends without its summary line: it was cut short",
                )
            )
            return
        self.result.summary = True
        self._check_totals(summary)
        self._check_heads(summary)

    def _check_totals(self, summary: Summary) -> None:
        stated = (summary.count, summary.first_position, summary.last_position)
        actual = (
            self.result.events,
            self.first_position,
            self.last_position if self.result.events else None,
        )
        if stated != actual:
            self.add(
                Finding(
                    kind=FindingKind.COUNT_MISMATCH,
                    detail=f"the summary states {summary.count} events from position "
                    f"{summary.first_position} to {summary.last_position}; the file "
                    f"holds {actual[0]} from {actual[1]} to {actual[2]}",
                )
            )

    def _check_heads(self, summary: Summary) -> None:
        listed = HeadsDigest()
        seen: set[StreamKey] = set()
        for mode, order_id, upc, version, hash_hex in summary.heads:
            key = (mode, order_id, upc)
            seen.add(key)
            try:
                listed.add(mode, order_id, upc, version, bytes.fromhex(hash_hex))
            except ValueError as error:
                self.add(Finding(kind=FindingKind.MALFORMED_LINE, detail=str(error)))
                return
            head = self.heads.get(key)
            if head is None:
                self._head_mismatch(
                    key,
                    version,
                    f"the summary lists the stream at version {version}, but no "
                    "line holds an event of it: its events were removed",
                )
            elif (head.version, head.hash.hex()) != (version, hash_hex):
                self._head_mismatch(
                    key,
                    head.version,
                    f"the summary gives its head as version {version} hash "
                    f"{hash_hex}; the lines end at version {head.version} hash "
                    f"{head.hash.hex()}",
                )
        for key in sorted(set(self.heads) - seen):
            self._head_mismatch(
                key,
                self.heads[key].version,
                "the lines hold events of a stream the summary does not list",
            )
        if listed.digest().hex() != summary.heads_digest or listed.count != (
            summary.streams
        ):
            self.add(
                Finding(
                    kind=FindingKind.HEADS_DIGEST_MISMATCH,
                    detail=f"the summary's {listed.count} heads hash to "
                    f"{listed.digest().hex()}, but it states {summary.streams} "
                    f"streams with digest {summary.heads_digest}",
                )
            )

    def _head_mismatch(self, key: StreamKey, version: int, detail: str) -> None:
        mode, order_id, upc = key
        self.add(
            Finding(
                kind=FindingKind.HEAD_MISMATCH,
                mode=mode,
                order_id=order_id,
                upc=upc,
                version=version,
                detail=detail,
            )
        )


def verify_export(
    path: Path, *, expect_digest: str | None = None, max_findings: int = 10_000
) -> ExportCheck:
    """Check the export at ``path``; ``expect_digest`` is a checkpoint's digest.

    An expected digest only makes sense for an export of both modes from
    position 1 to that checkpoint's position.
    """
    checker = _Checker(path, expect_digest, max_findings)
    checker.first_pass()
    checker.second_pass()
    checker.check_summary()
    result = checker.result
    if result.clean:
        log.info(
            "audit.export_verified",
            path=str(path),
            events=result.events,
            streams=result.streams,
        )
    else:
        log.warning(
            "audit.export_verify_failed",
            path=str(path),
            findings=len(result.findings) + result.omitted,
        )
    return result
