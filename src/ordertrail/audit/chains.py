"""Recomputing one stream's hash chain, and naming what disagrees.

A stream's events, read back in version order, should be versions 1, 2, 3 ...
with positions rising, each event's ``hash`` equal to the hash of its own
content after its ``previous_hash`` (``eventstore/hashing.py``), and each
``previous_hash`` equal to the hash of the version before (32 zero bytes for
the first). Tampering breaks this in recognisable ways:

- a changed body or status: the event no longer matches its own hash
  (``content_changed``); when only the raw body changed, its ``body_sha256``
  says so too;
- a deleted event in the middle: a version is missing (``version_gap``); the
  link across the gap is broken, which the gap already explains;
- two version numbers swapped: each event's content hashes correctly under
  the other's version (``versions_swapped``); one renumbered event hashes
  under a version it does not carry (``version_renumbered``);
- an event replaced by one whose hash was recomputed: the next event no
  longer links to it (``chain_broken``);
- events whose contents were exchanged whole: versions no longer rise with
  positions (``position_order``).

A stream whose tail was cut off, or that was deleted whole, is still a valid
chain: only a checkpoint that recorded its head can tell (``verify.py``).
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Sequence
from datetime import datetime

import msgspec

from ordertrail.eventstore.hashing import GENESIS, canonical, chain_hash
from ordertrail.eventstore.records import RecordedEvent

__all__ = [
    "CHAIN_COLUMNS",
    "ChainEvent",
    "Finding",
    "FindingKind",
    "chain_event",
    "check_stream",
    "content_hash",
]

# Trying every version a tampered event might have been hashed as costs one
# hash each; streams are an item's few reports, so this bound is never near.
_MOST_VERSIONS_TRIED = 1024


class FindingKind(enum.StrEnum):
    """What kind of disagreement a check found."""

    CONTENT_CHANGED = "content_changed"
    BODY_DIGEST_MISMATCH = "body_digest_mismatch"
    CHAIN_BROKEN = "chain_broken"
    VERSION_GAP = "version_gap"
    VERSIONS_SWAPPED = "versions_swapped"
    VERSION_RENUMBERED = "version_renumbered"
    DUPLICATE_VERSION = "duplicate_version"
    POSITION_ORDER = "position_order"
    HEAD_BEHIND_CHECKPOINT = "head_behind_checkpoint"
    STREAM_MISSING = "stream_missing"
    HEAD_REWRITTEN = "head_rewritten"
    UNRECORDED_EVENT = "unrecorded_event"
    CHECKPOINT_HEADS_ALTERED = "checkpoint_heads_altered"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_SIGNING_KEY = "unknown_signing_key"
    MALFORMED_LINE = "malformed_line"
    HEADER_MISSING = "header_missing"
    SUMMARY_MISSING = "summary_missing"
    POSITION_OUT_OF_RANGE = "position_out_of_range"
    POSITIONS_NOT_ASCENDING = "positions_not_ascending"
    COUNT_MISMATCH = "count_mismatch"
    HEAD_MISMATCH = "head_mismatch"
    HEADS_DIGEST_MISMATCH = "heads_digest_mismatch"


class Finding(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One thing a check found wrong, with where it is."""

    kind: FindingKind
    detail: str
    mode: str | None = None
    order_id: str | None = None
    upc: str | None = None
    version: int | None = None
    position: int | None = None
    checkpoint: int | None = None
    other_position: int | None = None
    """The other event involved, when there are two (a swap)."""
    line: int | None = None
    """The line of an export file, counting from 1."""

    def describe(self) -> str:
        """Return the finding as one line of text."""
        where = []
        if self.order_id is not None:
            where.append(f"{self.mode} order {self.order_id} upc {self.upc}")
        if self.version is not None:
            where.append(f"version {self.version}")
        if self.position is not None:
            where.append(f"position {self.position}")
        if self.checkpoint is not None:
            where.append(f"checkpoint {self.checkpoint}")
        if self.line is not None:
            where.append(f"line {self.line}")
        place = ", ".join(where)
        return (
            f"{self.kind.value}: {place}: {self.detail}"
            if place
            else (f"{self.kind.value}: {self.detail}")
        )


class ChainEvent(msgspec.Struct, frozen=True, array_like=True):
    """The columns of an event that its chain depends on, in this order."""

    mode: str
    order_id: str
    upc: str
    version: int
    position: int
    event_type: str
    raw_status: str
    raw_body: bytes
    body_sha256: bytes
    received_at: datetime
    previous_hash: bytes
    hash: bytes


CHAIN_COLUMNS = ", ".join(ChainEvent.__struct_fields__)
"""The SELECT list whose rows build a ``ChainEvent`` positionally."""


def chain_event(event: RecordedEvent) -> ChainEvent:
    """Return the chain columns of a stored event."""
    return ChainEvent(
        mode=event.mode,
        order_id=event.order_id,
        upc=event.upc,
        version=event.version,
        position=event.position,
        event_type=event.event_type,
        raw_status=event.raw_status,
        raw_body=event.raw_body,
        body_sha256=event.body_sha256,
        received_at=event.received_at,
        previous_hash=event.previous_hash,
        hash=event.hash,
    )


def content_hash(event: ChainEvent, version: int | None = None) -> bytes:
    """Return the hash ``event`` should carry, as ``version`` if given."""
    return chain_hash(
        event.previous_hash,
        canonical(
            mode=event.mode,
            order_id=event.order_id,
            upc=event.upc,
            version=event.version if version is None else version,
            event_type=event.event_type,
            raw_status=event.raw_status,
            raw_body=event.raw_body,
            received_at=event.received_at,
        ),
    )


def check_stream(
    events: Sequence[ChainEvent], *, anchored: bool = False
) -> list[Finding]:
    """Return what is wrong with one stream's events, given in version order.

    ``anchored`` is for a stream seen from the middle (an export that starts
    after its first event): the first event's ``previous_hash`` is then
    taken on trust, and versions before it are not expected.
    """
    if not events or _clean(events, anchored=anchored):
        return []
    return _Classifier(events, anchored=anchored).findings()


def _clean(events: Sequence[ChainEvent], *, anchored: bool) -> bool:
    # The common case, in one pass: everything as it should be.
    first = events[0]
    expected = first.version if anchored else 1
    previous = first.previous_hash if anchored else GENESIS
    position = -1
    for event in events:
        if (
            event.version != expected
            or event.previous_hash != previous
            or event.position <= position
            or content_hash(event) != event.hash
            or hashlib.sha256(event.raw_body).digest() != event.body_sha256
        ):
            return False
        expected += 1
        previous = event.hash
        position = event.position
    return True


class _Classifier:
    """Works out what happened to a stream that is not clean."""

    def __init__(self, events: Sequence[ChainEvent], *, anchored: bool) -> None:
        self.events = list(events)
        self.anchored = anchored
        self.found: list[Finding] = []
        highest = max(event.version for event in events)
        self.limit = min(highest + len(events), _MOST_VERSIONS_TRIED)
        self.hashed_as = [self._hashed_as(event) for event in events]

    def _hashed_as(self, event: ChainEvent) -> int | None:
        if content_hash(event) == event.hash:
            return event.version
        for version in range(1, self.limit + 1):
            if version != event.version and content_hash(event, version) == event.hash:
                return version
        return None

    def _finding(
        self,
        kind: FindingKind,
        event: ChainEvent,
        detail: str,
        other: ChainEvent | None = None,
    ) -> None:
        self.found.append(
            Finding(
                kind=kind,
                detail=detail,
                mode=event.mode,
                order_id=event.order_id,
                upc=event.upc,
                version=event.version,
                position=event.position,
                other_position=other.position if other is not None else None,
            )
        )

    def findings(self) -> list[Finding]:
        self._renumbered()
        self._changed()
        originals = self._in_original_order()
        self._versions(originals)
        self._links(originals)
        self._positions(originals)
        return self.found

    def _renumbered(self) -> None:
        renumbered = {
            index: original
            for index, original in enumerate(self.hashed_as)
            if original is not None and original != self.events[index].version
        }
        by_version: dict[int, int] = {}
        for index, event in enumerate(self.events):
            by_version.setdefault(event.version, index)
        paired: set[int] = set()
        for index, original in renumbered.items():
            if index in paired:
                continue
            event = self.events[index]
            other = by_version.get(original)
            if (
                other is not None
                and other not in paired
                and renumbered.get(other) == event.version
            ):
                paired |= {index, other}
                swapped = self.events[other]
                self._finding(
                    FindingKind.VERSIONS_SWAPPED,
                    event,
                    f"versions {event.version} (position {event.position}) and "
                    f"{swapped.version} (position {swapped.position}) were swapped: "
                    "each one's content hashes as the other's version",
                    swapped,
                )
            else:
                self._finding(
                    FindingKind.VERSION_RENUMBERED,
                    event,
                    f"carries version {event.version} but its content hashes as "
                    f"version {original}",
                )

    def _changed(self) -> None:
        for event, original in zip(self.events, self.hashed_as, strict=True):
            body_matches = hashlib.sha256(event.raw_body).digest() == event.body_sha256
            if original is None:
                detail = (
                    "hash mismatch: the raw body was changed (it no longer matches "
                    "its hash nor its body_sha256)"
                    if not body_matches
                    else "hash mismatch: a hashed field (raw status, receive time, "
                    "event type, stream key or version) was changed"
                )
                self._finding(FindingKind.CONTENT_CHANGED, event, detail)
            elif not body_matches:
                self._finding(
                    FindingKind.BODY_DIGEST_MISMATCH,
                    event,
                    "body_sha256 does not match the raw body, which still matches "
                    "the event's hash: body_sha256 was changed",
                )

    def _in_original_order(self) -> list[tuple[int, ChainEvent]]:
        # Renumbered events are put back where their content says they were,
        # so a swap does not also read as broken links and a gap.
        originals = [
            (original if original is not None else event.version, event)
            for event, original in zip(self.events, self.hashed_as, strict=True)
        ]
        return sorted(originals, key=lambda pair: (pair[0], pair[1].position))

    def _versions(self, originals: list[tuple[int, ChainEvent]]) -> None:
        expected = originals[0][0] if self.anchored else 1
        previous: int | None = None
        for version, event in originals:
            if version == previous:
                self._finding(
                    FindingKind.DUPLICATE_VERSION,
                    event,
                    f"a second event claims version {version}",
                )
                continue
            if version > expected:
                missing = (
                    f"version {expected} is"
                    if version == expected + 1
                    else f"versions {expected} to {version - 1} are"
                )
                before = f"after version {previous}" if previous else "at the start"
                self._finding(
                    FindingKind.VERSION_GAP,
                    event,
                    f"{missing} missing {before}: deleted from the stream",
                )
            expected = version + 1
            previous = version

    def _links(self, originals: list[tuple[int, ChainEvent]]) -> None:
        hashes: dict[int, bytes] = {}
        for version, event in originals:
            hashes.setdefault(version, event.hash)
        first_version = originals[0][0]
        for version, event in originals:
            if version == 1:
                expected: bytes | None = GENESIS
            elif self.anchored and version == first_version:
                expected = None
            else:
                expected = hashes.get(version - 1)
            # A missing predecessor is a gap, reported as such.
            if expected is not None and event.previous_hash != expected:
                self._finding(
                    FindingKind.CHAIN_BROKEN,
                    event,
                    f"previous_hash does not match the hash of version {version - 1}"
                    if version > 1
                    else "previous_hash of the first version is not the genesis hash",
                )

    def _positions(self, originals: list[tuple[int, ChainEvent]]) -> None:
        for (_, earlier), (version, later) in itertools.pairwise(originals):
            if later.position < earlier.position:
                self._finding(
                    FindingKind.POSITION_ORDER,
                    later,
                    f"version {version} was logged at position {later.position}, "
                    f"before version {earlier.version} at {earlier.position}: "
                    "events were reordered",
                )
