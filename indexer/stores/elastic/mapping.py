"""What catalens sends to Elasticsearch: the index template, item documents, query bodies.

One document per catalog item, ``_id`` the item id. A global feature is a ``dense_vector``
field of its name (HNSW, cosine). A local feature ``f`` is three fields: ``f`` (the
serialised keypoints, ``binary``: stored, never indexed), ``f_words`` (its visual words as
whitespace tokens, so word candidates are a BM25-scored bool/should of term queries) and
``f_vocab`` (the vocabulary the words came from, ``pending`` before they are quantised). The
category path is indexed with a ``path_hierarchy`` tokenizer (one term filters on a prefix)
beside a ``keyword`` copy for aggregations. Text search reads ``search_text`` (the item's id,
title, category and attribute values) and, for a text feature ``f``, ``f_read`` (the words read
from its image; ``f`` keeps them as read, unindexed), both through the ``folded`` analyser (lower
case, ASCII folding: mjölk is mjolk) and queried with ``match``, ``fuzziness: AUTO``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catalens.indexer.stores import ItemFilter, ItemUpdate, item_key
from catalens.indexer.stores.text import ItemText, read_words

# Fields a search hit needs to become an ItemRecord; keypoints and vectors stay on the server.
RECORD_FIELDS = ["key", "id", "image", "category", "title", "attributes", "fingerprint"]
# Elasticsearch's default indices.query.bool.max_clause_count is at least 1024.
MAX_WORD_CLAUSES = 1000
# ``<feature>_vocab`` of an item whose keypoints are stored but not yet quantised.
PENDING_WORDS = "pending"


@dataclass
class ElasticSettings:
    """How the catalog index is laid out on the cluster."""

    index: str = "catalens"
    shards: int = 1
    replicas: int = 0
    hnsw_m: int = 16
    hnsw_ef_construction: int = 100
    refresh_interval: str = "1s"


def words_field(feature: str) -> str:
    return f"{feature}_words"


def vocab_field(feature: str) -> str:
    return f"{feature}_vocab"


def words_text(words: np.ndarray | Sequence[int]) -> str:
    """Visual word ids as whitespace tokens (repeats kept: they are the term frequency)."""
    return " ".join(f"w{int(word)}" for word in np.asarray(words).ravel())


SEARCH_TEXT = "search_text"
FOLDED = {"type": "text", "analyzer": "folded"}


def read_field(feature: str) -> str:
    return f"{feature}_read"


def text_properties(feature: str) -> dict[str, Any]:
    """A text feature's fields: the words as read (kept, not indexed), and their searchable form."""
    return {feature: {"type": "text", "index": False}, read_field(feature): FOLDED}


def document_text(item_id: str, title: str, category: str, attributes: Any) -> str:
    """The ``search_text`` of an item: its normalised id, title, category levels and attribute values."""
    return " ".join(part for part in ItemText.of(item_id, title, category, attributes).fields() if part)


def text_body(query: str, k: int, fields: Sequence[str], filter: ItemFilter | None = None) -> dict[str, Any]:
    """Keyword arguments of ``Elasticsearch.search`` for a text query: one fuzzy ``match`` a field."""
    should = [{"match": {field: {"query": query, "fuzziness": "AUTO"}}} for field in (SEARCH_TEXT, *fields)]
    body: dict[str, Any] = {"bool": {"should": should, "minimum_should_match": 1}}
    clauses = filter_clauses(filter)
    if clauses:
        body["bool"]["filter"] = clauses
    return {"query": body, "size": int(k), "source": ["key"]}


def vector_property(dim: int, settings: ElasticSettings) -> dict[str, Any]:
    return {
        "type": "dense_vector", "dims": int(dim), "index": True, "similarity": "cosine",
        "index_options": {"type": "hnsw", "m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction},
    }


def local_properties(feature: str) -> dict[str, Any]:
    return {
        feature: {"type": "binary"},
        words_field(feature): {"type": "text", "analyzer": "whitespace", "norms": True, "index_options": "freqs"},
        vocab_field(feature): {"type": "keyword"},
    }


def index_template(dims: dict[str, int], local_features: Sequence[str] = (),
                   settings: ElasticSettings | None = None, text_features: Sequence[str] = ()) -> dict[str, Any]:
    """The body of ``PUT _index_template/<index>``: settings, analysers and the item mapping."""
    settings = settings or ElasticSettings()
    properties: dict[str, Any] = {
        "key": {"type": "long"},
        "id": {"type": "keyword"},
        "image": {"type": "keyword", "index": False},
        "fingerprint": {"type": "keyword", "index": False},
        "category": {
            "type": "keyword",
            "fields": {"tree": {"type": "text", "analyzer": "category_path", "search_analyzer": "keyword"}},
        },
        "title": {"type": "text", "fields": {"raw": {"type": "keyword", "ignore_above": 256}}},
        "attributes": {"type": "flattened"},
        "updated_at": {"type": "date", "format": "epoch_second"},
        SEARCH_TEXT: FOLDED,
    }
    for feature in local_features:
        properties.update(local_properties(feature))
    for feature in text_features:
        properties.update(text_properties(feature))
    for feature, dim in sorted(dims.items()):
        properties[feature] = vector_property(dim, settings)
    return {
        "index_patterns": [settings.index],
        "priority": 200,
        "template": {
            "settings": {
                "number_of_shards": settings.shards,
                "number_of_replicas": settings.replicas,
                "refresh_interval": settings.refresh_interval,
                "analysis": {
                    "tokenizer": {"category_path": {"type": "path_hierarchy", "delimiter": "/"}},
                    "analyzer": {
                        "category_path": {"type": "custom", "tokenizer": "category_path"},
                        "folded": {"type": "custom", "tokenizer": "standard", "filter": ["lowercase", "asciifolding"]},
                    },
                },
            },
            "mappings": {"dynamic": "strict", "properties": properties},
        },
    }


def category_filter(prefix: str | None) -> dict[str, Any] | None:
    """A filter on whole category levels: 'Packages/Milk' matches 'Packages/Milk/Arla', not 'Packages/Milky'."""
    if not prefix or not prefix.strip("/"):
        return None
    return {"term": {"category.tree": prefix.strip("/")}}


def filter_clauses(filter: ItemFilter | None) -> list[dict[str, Any]]:
    """An ``ItemFilter`` as query clauses: one term for a category, a terms list for explicit keys.

    Filters this backend makes for a category carry no keys, so a large category never turns
    into a terms list past the cluster's 65,536-term limit.
    """
    if filter is None:
        return []
    clauses = [clause for clause in (category_filter(filter.category),) if clause]
    if filter.keys is not None:
        clauses.append({"terms": {"key": [int(key) for key in filter.keys]}})
    return clauses


def knn_body(feature: str, vector: np.ndarray, k: int, filter: ItemFilter | None = None,
             num_candidates: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``Elasticsearch.search`` for an approximate kNN query."""
    knn: dict[str, Any] = {
        "field": feature,
        "query_vector": [float(v) for v in np.asarray(vector, np.float32).ravel()],
        "k": int(k),
        # More candidates per shard than k buys recall; 10k is the server's ceiling.
        "num_candidates": int(min(10_000, num_candidates or max(100, 4 * k))),
    }
    clauses = filter_clauses(filter)
    if clauses:
        knn["filter"] = clauses[0] if len(clauses) == 1 else {"bool": {"filter": clauses}}
    return {"knn": knn, "size": int(k), "source": RECORD_FIELDS}


def words_body(feature: str, words: np.ndarray, k: int, filter: ItemFilter | None = None) -> dict[str, Any] | None:
    """Keyword arguments of ``Elasticsearch.search`` for bag-of-words candidates, or None."""
    unique, counts = np.unique(np.asarray(words, np.int64).ravel(), return_counts=True)
    if len(unique) == 0:
        return None
    # A query word repeated in the image counts more; keep the most frequent if there are too many.
    order = np.argsort(-counts, kind="stable")[:MAX_WORD_CLAUSES]
    field = words_field(feature)
    should = [{"term": {field: {"value": f"w{int(unique[i])}", "boost": float(counts[i])}}} for i in order]
    query: dict[str, Any] = {"bool": {"should": should, "minimum_should_match": 1}}
    clauses = filter_clauses(filter)
    if clauses:
        query["bool"]["filter"] = clauses
    return {"query": query, "size": int(k), "source": ["key"]}


def item_document(update: ItemUpdate) -> dict[str, Any]:
    """The whole document of an item: its fields, its vectors, its keypoints (words pending)."""
    item = update.item
    document: dict[str, Any] = {
        "key": item_key(item.id), "id": item.id, "image": str(item.image), "fingerprint": update.fingerprint,
        "category": item.category, "title": item.title, "attributes": item.attributes,
        "updated_at": int(time.time()), SEARCH_TEXT: document_text(item.id, item.title, item.category, item.attributes),
    }
    for feature, row in update.rows.items():
        if isinstance(row, str):  # words read from the image
            document[feature] = row
            document[read_field(feature)] = read_words(row)
        elif isinstance(row, np.ndarray):
            document[feature] = [float(v) for v in np.asarray(row, np.float32).ravel()]
        else:
            document[feature] = base64.b64encode(bytes(row)).decode("ascii")
            document[vocab_field(feature)] = PENDING_WORDS
    return document


def bulk_actions(index: str, updates: Iterable[ItemUpdate] = (), deletes: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """``helpers.bulk`` actions: whole-document ``index`` ops and ``delete`` ops, by item id."""
    for update in updates:
        yield {"_op_type": "index", "_index": index, "_id": update.item.id, "_source": item_document(update)}
    for item_id in deletes:
        yield {"_op_type": "delete", "_index": index, "_id": item_id}


def field_value(kind: str | None, feature: str, blob: bytes) -> Any:
    """A stored row (float32 bytes, or a local feature's blob) as a field of the mapped ``kind`` holds it."""
    if kind == "dense_vector":
        return np.frombuffer(blob, np.float32).tolist()
    if kind == "float":
        (value,) = np.frombuffer(blob, np.float32)
        return float(value)
    if kind == "binary":
        return base64.b64encode(blob).decode("ascii")
    raise ValueError(f"{feature!r} rows cannot be written as partial updates: its field is {kind or 'not mapped'}")


def feature_blob(value: Any, kind: str | None = None) -> bytes:
    """A field's value as the item store returns rows: words as UTF-8, base64 text decoded, numbers as float32."""
    if kind == "text":
        return str(value).encode("utf-8")
    if isinstance(value, str):
        return base64.b64decode(value)
    return np.asarray(value, np.float32).tobytes()
