"""The status vocabulary: matching raw strings to lifecycle meanings."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from ordertrail.domain.vocabulary import (
    Fulfilment,
    Meaning,
    Transition,
    Vocabulary,
    VocabularyError,
    normalise_status,
)

SHIPPED = Vocabulary.default()


def shipped_text() -> str:
    return (resources.files("ordertrail.domain") / "statuses.toml").read_text()


@pytest.mark.parametrize(
    "raw",
    [
        "Ready For Pickup",
        "ready-for-pickup",
        "READY_FOR_PICKUP",
        "  ready for  pickup! ",
    ],
)
def test_matching_ignores_case_and_separators(raw: str) -> None:
    assert SHIPPED.meaning(raw) == Meaning(Transition.CONFIRMED, Fulfilment.PICKUP)


def test_locallys_published_status_is_a_confirmation() -> None:
    # "confirmed" is the one status string Locally documents.
    assert SHIPPED.meaning("confirmed") == Meaning(Transition.CONFIRMED)


def test_normalised_form_folds_separators_into_single_underscores() -> None:
    assert normalise_status("Ship-To  Store__Shipped") == "ship_to_store_shipped"
    assert normalise_status("--Cancelled--") == "cancelled"


@pytest.mark.parametrize("raw", ["teleported", "", "   ", "confirmedd", "ready for"])
def test_unknown_status_has_no_meaning(raw: str) -> None:
    assert SHIPPED.meaning(raw) is None


def test_every_transition_has_an_alias_in_the_shipped_file() -> None:
    assert set(SHIPPED.sample_statuses()) == set(Transition)
    for transition, alias in SHIPPED.sample_statuses().items():
        meaning = SHIPPED.meaning(alias)
        assert meaning is not None
        assert meaning.transition is transition


def test_operator_file_extending_the_shipped_one_adds_aliases(tmp_path: Path) -> None:
    file = tmp_path / "statuses.toml"
    file.write_text(
        shipped_text()
        + '\n[[status]]\ntransition = "messaged"\naliases = ["Chat Ping"]\n',
        encoding="utf-8",
    )

    vocabulary = Vocabulary.load(file)

    assert vocabulary.meaning("chat-ping") == Meaning(Transition.MESSAGED)
    assert vocabulary.meaning("confirmed") == Meaning(Transition.CONFIRMED)
    assert vocabulary.source == str(file)
    assert vocabulary.digest != SHIPPED.digest


def test_operator_file_replaces_the_shipped_meanings(tmp_path: Path) -> None:
    # An operator's file is the whole vocabulary: a status it maps otherwise
    # takes its meaning, and one it leaves out is unrecognized.
    file = tmp_path / "statuses.toml"
    file.write_text(
        '[[status]]\ntransition = "ship_to_store_shipped"\n'
        'fulfilment = "ship_to_store"\naliases = ["shipped"]\n',
        encoding="utf-8",
    )

    vocabulary = Vocabulary.load(file)

    assert SHIPPED.meaning("shipped") == Meaning(
        Transition.COMPLETED, Fulfilment.DELIVERY
    )
    assert vocabulary.meaning("Shipped") == Meaning(
        Transition.SHIP_TO_STORE_SHIPPED, Fulfilment.SHIP_TO_STORE
    )
    assert vocabulary.meaning("confirmed") is None


def test_no_file_means_the_shipped_vocabulary() -> None:
    assert Vocabulary.load(None).aliases() == SHIPPED.aliases()


def test_alias_listed_for_two_meanings_is_refused() -> None:
    text = (
        '[[status]]\ntransition = "completed"\naliases = ["Shipped"]\n'
        '[[status]]\ntransition = "ship_to_store_shipped"\naliases = ["shipped!"]\n'
    )

    with pytest.raises(VocabularyError, match="two meanings"):
        Vocabulary.parse(text, source="operator.toml")


def test_adding_a_shipped_alias_with_another_meaning_is_refused() -> None:
    text = (
        shipped_text() + '\n[[status]]\ntransition = "ordered"\naliases = ["ready"]\n'
    )

    with pytest.raises(VocabularyError, match="'ready'"):
        Vocabulary.parse(text, source="operator.toml")


def test_alias_repeated_with_the_same_meaning_is_accepted() -> None:
    text = (
        '[[status]]\ntransition = "cancelled"\naliases = ["void"]\n'
        '[[status]]\ntransition = "cancelled"\naliases = ["VOID"]\n'
    )

    assert Vocabulary.parse(text, source="x").meaning("void") == Meaning(
        Transition.CANCELLED
    )


@pytest.mark.parametrize(
    "text",
    [
        "[[status]\n",
        '[[status]]\ntransition = "teleported"\naliases = ["x"]\n',
        '[[status]]\naliases = ["x"]\n',
        '[[status]]\ntransition = "ordered"\nfulfilment = "drone"\naliases = ["x"]\n',
    ],
    ids=["not-toml", "unknown-transition", "no-transition", "unknown-fulfilment"],
)
def test_malformed_file_is_refused_naming_its_source(text: str) -> None:
    with pytest.raises(VocabularyError, match=r"^operator\.toml: "):
        Vocabulary.parse(text, source="operator.toml")


def test_digest_follows_the_text() -> None:
    text = '[[status]]\ntransition = "ordered"\naliases = ["placed"]\n'

    first = Vocabulary.parse(text, source="a")
    same = Vocabulary.parse(text, source="b")
    changed = Vocabulary.parse(text.replace("placed", "put"), source="a")

    assert first.digest == same.digest
    assert first.digest != changed.digest
