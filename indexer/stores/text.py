"""Words as every store compares them: one normal form, an item's searchable text, and which
indexed terms a query term matches despite a typo.

Both backends index the same text: the item's id, title, category levels and attribute
values, and the words the ``text`` feature read from its image. Case and diacritics are folded
(Swedish ``Mjölk`` and an OCR's ``MJOLK`` are one term), so matching never depends on how a
pack or a catalog spells its accents.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_NOT_WORD = re.compile(r"[^0-9a-z]+")
# Letters NFKD does not decompose into a base letter and a mark.
_FOLDED = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "ß": "ss", "ð": "d", "þ": "th", "ł": "l", "đ": "d"})
# A query term this long or longer also matches indexed terms that contain it: Swedish writes
# compounds as one word (standardmjölk, apelsinjuice), and an OCR often runs words together.
MIN_INFIX = 4


def normalise(text: str) -> str:
    """Lower case, diacritics removed, anything but letters and digits as one space."""
    text = unicodedata.normalize("NFKD", str(text).casefold().translate(_FOLDED))
    text = "".join(character for character in text if not unicodedata.combining(character))
    return _NOT_WORD.sub(" ", text.translate(_FOLDED)).strip()


def terms(text: str) -> list[str]:
    return normalise(text).split()


def attribute_text(attributes: Any) -> str:
    """Every value of an item's attributes (nested ones too) as words; keys say nothing of the item."""
    if isinstance(attributes, dict):
        return " ".join(attribute_text(value) for value in attributes.values())
    if isinstance(attributes, (list, tuple)):
        return " ".join(attribute_text(value) for value in attributes)
    return "" if attributes is None or isinstance(attributes, bool) else str(attributes)


@dataclass(frozen=True)
class ItemText:
    """An item's searchable fields, normalised. ``words`` are those read from its image."""

    ident: str
    title: str
    category: str
    attributes: str
    words: str = ""

    @classmethod
    def of(cls, item_id: str, title: str, category: str, attributes: Any, words: str = "") -> ItemText:
        return cls(normalise(item_id), normalise(title), normalise(category), normalise(attribute_text(attributes)),
                   read_words(words))

    def fields(self) -> tuple[str, str, str, str, str]:
        return self.ident, self.title, self.category, self.attributes, self.words


def read_words(lines: str) -> str:
    """Words read from an image (one detected line a line), normalised, with each pair of
    neighbouring fragments also joined: an OCR splits a logo's letters where they are spaced
    (GOD MOR GON), and the joined pair (morgon) is the word a user types."""
    fragments = [normalise(line) for line in lines.splitlines()]
    fragments = [fragment for fragment in fragments if fragment]
    joined = ["".join(pair) for pair in zip(fragments, fragments[1:], strict=False)]
    return " ".join([*fragments, *(word.replace(" ", "") for word in joined)])


# BM25 weight of each field, in ``ItemText.fields`` order: a title or a category naming the
# query is stronger evidence than the same word read off a pack among twenty others.
FIELD_WEIGHTS = (1.0, 3.0, 2.0, 1.5, 1.0)


def edits_allowed(term: str) -> int:
    """Elasticsearch's ``fuzziness: AUTO``: no typo in 1-2 characters, one in 3-5, two beyond."""
    return 0 if len(term) <= 2 else 1 if len(term) <= 5 else 2


def within_edits(a: str, b: str, limit: int) -> bool:
    """Whether the optimal-string-alignment distance (a swap of neighbours is one edit) is <= ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return False
    if a == b:
        return True
    if limit == 0:
        return False
    previous2: list[int] | None = None
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if previous2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > limit:
            return False
        previous2, previous = previous, current
    return previous[-1] <= limit


def matching_terms(term: str, vocabulary: Iterable[str]) -> list[str]:
    """The indexed terms ``term`` matches: itself, those within ``edits_allowed`` typos, and those
    containing it (``MIN_INFIX`` characters or more)."""
    limit = edits_allowed(term)
    found = []
    for known in vocabulary:
        if known == term or within_edits(term, known, limit) or (len(term) >= MIN_INFIX and term in known):
            found.append(known)
    return found


def query_terms(query: str) -> list[str]:
    """A query's distinct normalised terms, in order."""
    return list(dict.fromkeys(terms(query)))


def fts_expression(expansions: Sequence[str]) -> str:
    """An SQLite FTS5 MATCH expression: any of the terms (normalised terms need no escaping beyond quotes)."""
    return " OR ".join(f'"{term}"' for term in dict.fromkeys(expansions))
