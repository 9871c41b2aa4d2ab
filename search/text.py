"""Search by words: typed text, and the words the ``text`` feature reads on a query photo.

The item store ranks (BM25 over ids, titles, categories, attributes and the words read from
each item's images, typos allowed: ``ItemStore.search_text``). Here those scores become
evidence for fused search, relative to the best match of the query, so a weight means the
same whatever the words' BM25 scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from catalens.indexer.stores import ItemFilter

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.search.query import Query


def text_search(catalog: Catalog, text: str, k: int, filter: ItemFilter | None) -> tuple[np.ndarray, np.ndarray]:
    """(keys, BM25 scores) of the ``k`` items best matching ``text``, best first."""
    if not text or not text.strip():
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return catalog.items.search_text(text, k, filter)


def text_evidence(catalog: Catalog, text: str, k: int, filter: ItemFilter | None) -> dict[int, float]:
    """Each of the ``k`` best text matches' score relative to the best, in (0, 1]."""
    keys, scores = text_search(catalog, text, k, filter)
    if not len(keys):
        return {}
    return dict(zip(keys.tolist(), (scores / scores[0]).tolist(), strict=True))


def query_text_evidence(catalog: Catalog, query: Query, typed_weight: float, feature_weights: dict[str, float],
                        k: int, filter: ItemFilter | None) -> dict[int, float]:
    """The weighted text evidence of a query: its typed text (``query.text``, ``typed_weight``) and
    the words each weighted text feature reads on its photo, summed per item."""
    total: dict[int, float] = {}
    sources = [(query.text, typed_weight)] if query.text else []
    sources += [(query.words_read(catalog, name), weight) for name, weight in feature_weights.items()
                if weight and query.image is not None]
    for text, weight in sources:
        for key, value in text_evidence(catalog, text, k, filter).items():
            total[key] = total.get(key, 0.0) + weight * value
    return total


def matched_words(catalog: Catalog, text: str, keys: list[int]) -> dict[int, list[str]]:
    """For each of ``keys``, its indexed terms that ``text`` matched (typos and compounds included),
    and from which field: what ``search --text --explain`` prints."""
    from catalens.indexer.stores.text import ItemText, matching_terms, query_terms

    records = catalog.items.items(keys)
    read = {name: catalog.items.rows(name, keys) for name in catalog.text_features()}
    fields = ("id", "title", "category", "attributes", "read")
    found: dict[int, list[str]] = {}
    for key in keys:
        record = records.get(int(key))
        if record is None:
            continue
        words = " ".join(rows[int(key)].decode("utf-8") for rows in read.values() if int(key) in rows)
        item = ItemText.of(record.id, record.title, record.category, record.attributes, words)
        matched = []
        for field, value in zip(fields, item.fields(), strict=True):
            present = list(dict.fromkeys(value.split()))
            for term in query_terms(text):
                matched += [f"{found_term} ({field})" for found_term in matching_terms(term, present)]
        found[int(key)] = list(dict.fromkeys(matched))
    return found


def text_ranking(catalog: Catalog, query: Query, feature: str, k: int,
                 filter: ItemFilter | None) -> tuple[np.ndarray, np.ndarray]:
    """The mode named after a text feature: items ranked by the words read on the photo alone."""
    return text_search(catalog, query.words_read(catalog, feature), k, filter)
