"""The status vocabulary: what each raw status string means.

Locally publishes one status string ("confirmed"); the rest of its vocabulary
is unknown. The mapping from raw strings to lifecycle transitions therefore
lives in a data file an operator can extend, and it is applied only by
projections: changing it needs a rebuild of the read models, never a change
to a stored event.
"""

from __future__ import annotations

import enum
import hashlib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = [
    "Fulfilment",
    "Meaning",
    "Transition",
    "Vocabulary",
    "VocabularyError",
    "normalise_status",
]


class Transition(enum.StrEnum):
    """A step of the item lifecycle that a status can stand for."""

    ORDERED = "ordered"
    CONFIRMED = "confirmed"
    SHIP_TO_STORE_REQUESTED = "ship_to_store_requested"
    SHIP_TO_STORE_SHIPPED = "ship_to_store_shipped"
    SHIP_TO_STORE_ARRIVED = "ship_to_store_arrived"
    SAME_DAY_DELIVERY_REQUESTED = "same_day_delivery_requested"
    SAME_DAY_DELIVERY_DISPATCHED = "same_day_delivery_dispatched"
    SAME_DAY_DELIVERY_DELIVERED = "same_day_delivery_delivered"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"
    PARTIALLY_REFUNDED = "partially_refunded"
    MESSAGED = "messaged"


class Fulfilment(enum.StrEnum):
    """How the item reaches the shopper."""

    UNKNOWN = "unknown"
    PICKUP = "pickup"
    DELIVERY = "delivery"
    SHIP_TO_STORE = "ship_to_store"
    SAME_DAY_DELIVERY = "same_day_delivery"


@dataclass(frozen=True, slots=True)
class Meaning:
    """The transition a status stands for, and the fulfilment it implies."""

    transition: Transition
    fulfilment: Fulfilment | None = None


class VocabularyError(ValueError):
    """The vocabulary file is malformed or contradicts itself."""


_SEPARATORS = re.compile(r"[\W_]+", re.UNICODE)
_REMEMBERED = 10_000


def normalise_status(raw: str) -> str:
    """Fold case and separators: ``"Ready-For Pickup"`` -> ``"ready_for_pickup"``."""
    return _SEPARATORS.sub("_", raw.casefold()).strip("_")


class Vocabulary:
    """A lookup from raw status strings to their lifecycle meaning."""

    __slots__ = ("_known", "_meanings", "digest", "source", "text")

    def __init__(self, meanings: dict[str, Meaning], *, source: str, text: str) -> None:
        self._meanings = meanings
        # Raw strings already looked up: Locally sends few distinct statuses,
        # and a rebuild asks about each of millions of events.
        self._known: dict[str, Meaning | None] = {}
        self.source = source
        """Where the vocabulary was read from."""
        self.text = text
        """The file's text, recorded with each projection version built from it."""
        self.digest = hashlib.sha256(text.encode()).hexdigest()
        """SHA-256 of the text: which vocabulary a view was built with."""

    @classmethod
    def default(cls) -> Vocabulary:
        """Return the vocabulary shipped with ordertrail."""
        text = (resources.files("ordertrail.domain") / "statuses.toml").read_text()
        return cls.parse(text, source="ordertrail/domain/statuses.toml")

    @classmethod
    def load(cls, path: str | Path | None) -> Vocabulary:
        """Return the vocabulary in ``path``, or the shipped one for ``None``."""
        if path is None:
            return cls.default()
        file = Path(path)
        return cls.parse(file.read_text(encoding="utf-8"), source=str(file))

    @classmethod
    def parse(cls, text: str, *, source: str) -> Vocabulary:
        """Build a vocabulary from the TOML text of a vocabulary file."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            msg = f"{source}: {error}"
            raise VocabularyError(msg) from None
        entries = document.get("status", [])
        if not isinstance(entries, list):
            msg = f"{source}: `status` must be an array of tables, each [[status]]"
            raise VocabularyError(msg)
        meanings: dict[str, Meaning] = {}
        for index, entry in enumerate(entries):
            where = f"{source}: status entry {index + 1}"
            meaning = _meaning_of(entry, where)
            for alias in _aliases_of(entry, where):
                key = normalise_status(alias)
                known = meanings.get(key)
                if known is not None and known != meaning:
                    msg = f"{source}: alias {alias!r} is listed for two meanings"
                    raise VocabularyError(msg)
                meanings[key] = meaning
        return cls(meanings, source=source, text=text)

    def meaning(self, raw_status: str) -> Meaning | None:
        """Return what ``raw_status`` stands for, or ``None`` if unrecognized."""
        try:
            return self._known[raw_status]
        except KeyError:
            meaning = self._meanings.get(normalise_status(raw_status))
            if len(self._known) < _REMEMBERED:
                self._known[raw_status] = meaning
            return meaning

    def aliases(self) -> dict[str, Meaning]:
        """Return every normalised alias with its meaning."""
        return dict(self._meanings)

    def sample_statuses(self) -> dict[Transition, str]:
        """Return one alias per transition, for test pushes and examples."""
        samples: dict[Transition, str] = {}
        for alias, meaning in self._meanings.items():
            if alias == meaning.transition.value:
                samples[meaning.transition] = alias
            else:
                samples.setdefault(meaning.transition, alias)
        return samples


def _meaning_of(entry: object, where: str) -> Meaning:
    if not isinstance(entry, dict):
        msg = f"{where}: not a table of transition, fulfilment and aliases"
        raise VocabularyError(msg)
    try:
        transition = Transition(str(entry["transition"]))
        fulfilment = entry.get("fulfilment")
        return Meaning(
            transition, Fulfilment(str(fulfilment)) if fulfilment is not None else None
        )
    except (KeyError, ValueError) as error:
        msg = f"{where}: {error}"
        raise VocabularyError(msg) from None


def _aliases_of(entry: dict[str, object], where: str) -> list[str]:
    aliases = entry.get("aliases", [])
    # A string where the array belongs would be read letter by letter, and a
    # number or table would be matched by its Python spelling: refuse both.
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        msg = f"{where}: `aliases` must be an array of strings"
        raise VocabularyError(msg)
    for alias in aliases:
        if not normalise_status(alias):
            # It would give a meaning to every status made of separators,
            # the empty one included.
            msg = f"{where}: alias {alias!r} has no letters or digits"
            raise VocabularyError(msg)
    return aliases
