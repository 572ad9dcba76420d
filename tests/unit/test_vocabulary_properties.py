"""Properties of the status vocabulary, over generated status strings and files.

The examples of ``test_vocabulary.py`` say what a few spellings mean; these
say what holds for every spelling: how an alias may be written, that nothing
outside the file gains a meaning, that no string makes a look-up raise, and
that a vocabulary file either reads as written or is refused with a
``VocabularyError`` naming it.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ordertrail.domain.vocabulary import (
    Fulfilment,
    Meaning,
    Transition,
    Vocabulary,
    VocabularyError,
    normalise_status,
)

SHIPPED = Vocabulary.default()
_DOCUMENT = tomllib.loads(
    (resources.files("ordertrail.domain") / "statuses.toml").read_text()
)
SHIPPED_ALIASES: list[tuple[str, Meaning]] = [
    (
        alias,
        Meaning(
            Transition(entry["transition"]),
            Fulfilment(entry["fulfilment"]) if "fulfilment" in entry else None,
        ),
    )
    for entry in _DOCUMENT["status"]
    for alias in entry["aliases"]
]
KNOWN_FORMS = frozenset(SHIPPED.aliases())

# Runs of characters that are not letters, digits or "_" in any script, and
# "_" itself: what matching treats as one separator.
SEPARATORS = st.text(
    alphabet=st.sampled_from(
        " -_./:;,!?'\"()[]#*+~|\t\n\u00a0\u2013\u2014\u00b7\u3000"
    ),
    min_size=1,
    max_size=4,
)
# Every code point, lone surrogates and control characters included: a raw
# status is whatever Locally sent, and a rebuild looks each one up.
ANY_TEXT = st.text(alphabet=st.characters(codec=None), max_size=64)

EXAMPLES = settings(max_examples=300, deadline=None)


def spelled(alias: str, cases: list[bool], separators: list[str]) -> str:
    """Write ``alias`` with each letter's case flipped or not, words re-joined."""
    flipped = "".join(
        letter.swapcase() if flip else letter
        for letter, flip in zip(alias, cases + [False] * len(alias), strict=False)
    )
    words = normalise_status(flipped).split("_")
    joined = words[0]
    for index, word in enumerate(words[1:]):
        joined += separators[index % len(separators)] + word
    return separators[0] + joined + separators[-1]


@given(
    entry=st.sampled_from(SHIPPED_ALIASES),
    cases=st.lists(st.booleans(), max_size=40),
    separators=st.lists(SEPARATORS, min_size=1, max_size=6),
)
@EXAMPLES
def test_any_spelling_of_a_shipped_alias_means_its_transition(
    entry: tuple[str, Meaning], cases: list[bool], separators: list[str]
) -> None:
    alias, meaning = entry

    assert SHIPPED.meaning(spelled(alias, cases, separators)) == meaning


def test_every_shipped_alias_means_the_transition_it_is_listed_under() -> None:
    assert SHIPPED_ALIASES
    for alias, meaning in SHIPPED_ALIASES:
        assert SHIPPED.meaning(alias) == meaning, alias
        assert SHIPPED.meaning(alias.upper()) == meaning, alias
        assert SHIPPED.meaning(alias.replace(" ", "-")) == meaning, alias


@given(raw=ANY_TEXT)
@EXAMPLES
def test_any_string_is_looked_up_without_raising(raw: str) -> None:
    meaning = SHIPPED.meaning(raw)

    assert meaning is None or isinstance(meaning, Meaning)
    # The remembered answer is the answer.
    assert SHIPPED.meaning(raw) == meaning
    assert Vocabulary.default().meaning(raw) == meaning


@given(raw=ANY_TEXT)
@EXAMPLES
def test_a_string_means_something_only_through_a_listed_alias(raw: str) -> None:
    form = normalise_status(raw)

    if form in KNOWN_FORMS:
        assert SHIPPED.meaning(raw) == SHIPPED.aliases()[form]
    else:
        assert SHIPPED.meaning(raw) is None


@given(
    entry=st.sampled_from(SHIPPED_ALIASES),
    extra=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1),
    before=st.booleans(),
)
@EXAMPLES
def test_an_alias_with_a_word_added_is_unknown(
    entry: tuple[str, Meaning], extra: str, before: bool
) -> None:
    alias, _ = entry
    raw = f"zq{extra} {alias}" if before else f"{alias} zq{extra}"

    assert SHIPPED.meaning(raw) is None


@given(raw=ANY_TEXT)
@EXAMPLES
def test_case_folding_does_not_change_a_meaning(raw: str) -> None:
    assert SHIPPED.meaning(raw.casefold()) == SHIPPED.meaning(raw)


@given(raw=ANY_TEXT)
@EXAMPLES
def test_the_normalised_form_is_its_own_normalised_form(raw: str) -> None:
    form = normalise_status(raw)

    assert normalise_status(form) == form
    assert not form.startswith("_")
    assert not form.endswith("_")
    assert "__" not in form


# Vocabulary files ------------------------------------------------------------

TRANSITIONS = st.sampled_from(list(Transition))
FULFILMENTS = st.none() | st.sampled_from(list(Fulfilment))
# Aliases that hold a letter or digit, so that each names something.
ALIASES = st.text(
    alphabet=st.characters(codec="utf-8", categories=["L", "Nd", "Zs", "Pd"]),
    min_size=1,
    max_size=24,
).filter(lambda alias: normalise_status(alias) != "")


def toml_string(text: str) -> str:
    # A JSON string is a TOML basic string once DEL, which TOML wants escaped
    # and JSON does not, is escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_entry(
    transition: Transition, fulfilment: Fulfilment | None, aliases: list[str]
) -> str:
    lines = ["[[status]]", f"transition = {toml_string(transition.value)}"]
    if fulfilment is not None:
        lines.append(f"fulfilment = {toml_string(fulfilment.value)}")
    lines.append(f"aliases = [{', '.join(toml_string(a) for a in aliases)}]")
    return "\n".join(lines) + "\n"


@given(
    entries=st.lists(
        st.tuples(TRANSITIONS, FULFILMENTS, st.lists(ALIASES, max_size=5)),
        max_size=6,
    )
)
@EXAMPLES
def test_a_file_reads_as_written_or_is_refused_for_a_clash(
    entries: list[tuple[Transition, Fulfilment | None, list[str]]],
) -> None:
    text = "".join(toml_entry(*entry) for entry in entries)
    listed: dict[str, set[Meaning]] = {}
    for transition, fulfilment, aliases in entries:
        for alias in aliases:
            listed.setdefault(normalise_status(alias), set()).add(
                Meaning(transition, fulfilment)
            )

    if any(len(meanings) > 1 for meanings in listed.values()):
        with pytest.raises(VocabularyError, match="two meanings"):
            Vocabulary.parse(text, source="generated.toml")
        return
    vocabulary = Vocabulary.parse(text, source="generated.toml")
    for form, (meaning,) in listed.items():
        assert vocabulary.meaning(form) == meaning
        assert vocabulary.meaning(form.replace("_", " - ")) == meaning
        # Upper case reads the same wherever case folding undoes it (it does
        # not for a dotless i, whose capital folds to a dotted one).
        if form.upper().casefold() == form:
            assert vocabulary.meaning(form.upper()) == meaning
    assert set(vocabulary.aliases()) == set(listed)


# Any TOML document at all: scalars, arrays and tables where the vocabulary
# wants others, nested a few levels.
TOML_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.sampled_from([t.value for t in Transition] + [f.value for f in Fulfilment])
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["transition", "fulfilment", "aliases", "note"]),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    assert isinstance(value, dict)
    pairs = (f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None)
    return "{" + ", ".join(pairs) + "}"


@given(
    status=TOML_VALUES, others=st.dictionaries(st.sampled_from(["x", "y"]), TOML_VALUES)
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_document_reads_or_is_refused_with_a_vocabulary_error(
    status: Any, others: dict[str, Any]
) -> None:
    document = {"status": status, **others}
    text = "\n".join(
        f"{k} = {toml_value(v)}" for k, v in document.items() if v is not None
    )

    refusal: str | None = None
    try:
        vocabulary = Vocabulary.parse(text, source="generated.toml")
    except VocabularyError as error:
        refusal = str(error)
    if refusal is not None:
        assert refusal.startswith("generated.toml: ")
        return
    # What was accepted gives each alias a meaning, and nothing else one.
    for form, meaning in vocabulary.aliases().items():
        assert form
        assert vocabulary.meaning(form) == meaning
    assert vocabulary.meaning("") is None
