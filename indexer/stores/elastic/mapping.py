"""What catalens sends to Elasticsearch: the index template, item documents, query bodies.

One document per catalog item, ``_id`` the item id. A global feature is a ``dense_vector``
field of its name (HNSW, cosine). A local feature ``f`` is three fields: ``f`` (the
serialised keypoints, ``binary``: stored, never indexed), ``f_words`` (its visual words as
whitespace tokens, so word candidates are a BM25-scored bool/should of term queries) and
``f_vocab`` (the vocabulary the words came from, ``pending`` before they are quantised). The
category path is indexed with a ``path_hierarchy`` tokenizer (one term filters on a prefix)
beside a ``keyword`` copy for aggregations.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catalens.indexer.stores import ItemFilter, ItemUpdate, item_key

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
                   settings: ElasticSettings | None = None) -> dict[str, Any]:
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
    }
    for feature in local_features:
        properties.update(local_properties(feature))
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
                    "analyzer": {"category_path": {"type": "custom", "tokenizer": "category_path"}},
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
        "updated_at": int(time.time()),
    }
    for feature, row in update.rows.items():
        if isinstance(row, np.ndarray):
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


def feature_blob(value: Any) -> bytes:
    """A field's value as the item store returns rows: base64 text decoded, numbers as float32."""
    if isinstance(value, str):
        return base64.b64decode(value)
    return np.asarray(value, np.float32).tobytes()
