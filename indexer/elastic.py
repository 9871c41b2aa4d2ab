"""Elasticsearch catalog store: items, deep/autoencoder vectors, visual words and keypoints.

One document per catalog item, its ``_id`` the item id, so writing an item again replaces it
and deleting twice is harmless: updates, deletions and a resumed indexing run are idempotent.
Vectors are ``dense_vector`` fields (HNSW, cosine) searched with filtered kNN; visual words are
whitespace tokens of a text field, so bag-of-words candidates are a BM25-scored bool/should of
term queries on the inverted index; the category path is indexed with a ``path_hierarchy``
tokenizer so one term query filters on a path prefix, and a ``keyword`` copy aggregates it.
Keypoints are a ``binary`` field (stored in ``_source``, not indexed), fetched for the top
candidates of a query only. The visual vocabulary is fitted on the stored keypoints and kept
as a file in ``models_dir`` beside the client (``CATALENS_ES_MODELS``); each document records
which vocabulary its words came from, so a refit or an interrupted run re-quantises exactly
the items that need it.

Code written against the embedded ``MetadataStore`` (the autoencoder, the anomaly audit) writes
per-item rows with ``transaction`` / ``put_feature``: here they become partial updates of the
item's document, a vector into its ``dense_vector`` field, a score into a ``float`` field.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.metadata import ItemRecord
from indexer.stores import ItemUpdate

log = logging.getLogger(__name__)

# Fields a search hit needs to become an ItemRecord; keypoints and vectors stay on the server.
RECORD_FIELDS = ["key", "id", "image", "category", "title", "attributes", "fingerprint"]
# Elasticsearch's default indices.query.bool.max_clause_count is at least 1024.
MAX_WORD_CLAUSES = 1000
# ``words_vocab`` of an item whose keypoints are stored but not yet quantised.
PENDING_WORDS = "pending"
# Keypoint blobs are ~60-80 kB an item in _source: fetch this many per request.
KEYPOINT_CHUNK = 128


def item_key(item_id: str) -> int:
    """A stable int64 key for an item id (63-bit blake2b), the same on every run and machine.

    Search code works on int64 keys; deriving them from the id needs no counter shared between
    indexing workers, and a re-indexed item keeps its key.
    """
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def words_text(words: np.ndarray | Sequence[int]) -> str:
    """Visual word ids as whitespace tokens (repeats kept: they are the term frequency)."""
    return " ".join(f"w{int(word)}" for word in np.asarray(words).ravel())


@dataclass
class ElasticSettings:
    """How the catalog index is laid out on the cluster."""

    index: str = "catalens"
    shards: int = 1
    replicas: int = 0
    hnsw_m: int = 16
    hnsw_ef_construction: int = 100
    refresh_interval: str = "1s"


def index_template(dims: dict[str, int], settings: ElasticSettings | None = None) -> dict[str, Any]:
    """The body of ``PUT _index_template/<index>``: settings, analysers and the item mapping."""
    from indexer.autoencoder import SCORE_FEATURE

    settings = settings or ElasticSettings()
    properties: dict[str, Any] = {
        "key": {"type": "long"},
        "id": {"type": "keyword"},
        "image": {"type": "keyword", "index": False},
        "fingerprint": {"type": "keyword", "index": False},
        "category": {
            "type": "keyword",
            "fields": {
                "tree": {"type": "text", "analyzer": "category_path", "search_analyzer": "keyword"},
            },
        },
        "title": {"type": "text", "fields": {"raw": {"type": "keyword", "ignore_above": 256}}},
        "attributes": {"type": "flattened"},
        "words": {
            "type": "text",
            "analyzer": "whitespace",
            "norms": True,
            "index_options": "freqs",
        },
        "keypoints": {"type": "binary"},
        "words_vocab": {"type": "keyword"},
        "updated_at": {"type": "date", "format": "epoch_second"},
        # The autoencoder's per-item anomaly score (train-ae, the audit): a number the cluster can sort.
        SCORE_FEATURE: {"type": "float"},
    }
    for feature, dim in sorted(dims.items()):
        properties[feature] = {
            "type": "dense_vector",
            "dims": int(dim),
            "index": True,
            "similarity": "cosine",
            "index_options": {"type": "hnsw", "m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction},
        }
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


def knn_body(
    feature: str, vector: np.ndarray, k: int, category: str | None = None,
    num_candidates: int | None = None, keys: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``Elasticsearch.search`` for an approximate kNN query.

    ``category`` filters on a path prefix; ``keys`` (an explicit allowed set) on item keys.
    """
    knn: dict[str, Any] = {
        "field": feature,
        "query_vector": [float(v) for v in np.asarray(vector, np.float32).ravel()],
        "k": int(k),
        # More candidates per shard than k buys recall; 10k is the server's ceiling.
        "num_candidates": int(min(10_000, num_candidates or max(100, 4 * k))),
    }
    filters = [f for f in (category_filter(category), {"terms": {"key": [int(x) for x in keys]}} if keys is not None else None) if f]
    if filters:
        knn["filter"] = filters[0] if len(filters) == 1 else {"bool": {"filter": filters}}
    return {"knn": knn, "size": int(k), "source": RECORD_FIELDS}


def default_models_dir(index: str) -> Path:
    """Where what is fitted on an Elasticsearch catalog (the vocabulary) is kept on this machine."""
    default = Path.home() / ".cache" / "catalens" / "elasticsearch" / index / "models"
    return Path(os.environ.get("CATALENS_ES_MODELS", default))


def words_body(
    words: np.ndarray, k: int, category: str | None = None, keys: Sequence[int] | None = None
) -> dict[str, Any] | None:
    """Keyword arguments of ``Elasticsearch.search`` for bag-of-words candidates, or None.

    ``category`` filters on a path prefix; ``keys`` (an explicit allowed set) on item keys.
    """
    unique, counts = np.unique(np.asarray(words, np.int64).ravel(), return_counts=True)
    if len(unique) == 0:
        return None
    # A query word repeated in the image counts more; keep the most frequent if there are too many.
    order = np.argsort(-counts, kind="stable")[:MAX_WORD_CLAUSES]
    should = [{"term": {"words": {"value": f"w{int(unique[i])}", "boost": float(counts[i])}}} for i in order]
    query: dict[str, Any] = {"bool": {"should": should, "minimum_should_match": 1}}
    filters = [f for f in (category_filter(category), {"terms": {"key": [int(x) for x in keys]}} if keys is not None else None) if f]
    if filters:
        query["bool"]["filter"] = filters
    return {"query": query, "size": int(k), "source": ["key"]}


class CategoryKeys(np.ndarray):
    """The keys of the items under a category prefix, remembering the prefix.

    The search engine resolves a category filter to keys; queries given this exact array
    filter with one term on the category path instead of listing every key, which a large
    category would push past the cluster's 65,536-term limit. Slices and other arrays made
    from it forget the prefix (they may be subsets) and are filtered key by key.
    """

    category: str | None

    def __new__(cls, keys: Iterable[int], category: str) -> CategoryKeys:
        array = np.asarray(list(keys) if not isinstance(keys, np.ndarray) else keys, np.int64).view(cls)
        array.category = category
        return array

    def __array_finalize__(self, obj: Any) -> None:
        self.category = None


def _filter_terms(category: str | None, keys: Sequence[int] | None) -> tuple[str | None, Sequence[int] | None]:
    """(category, keys) for a query: a ``CategoryKeys`` becomes its category prefix."""
    if isinstance(keys, CategoryKeys) and keys.category is not None and category in (None, keys.category):
        return keys.category, None
    return category, keys


def item_document(update: ItemUpdate) -> dict[str, Any]:
    item = update.item
    document: dict[str, Any] = {
        "key": item_key(item.id),
        "id": item.id,
        "image": str(item.image),
        "fingerprint": update.fingerprint,
        "category": item.category,
        "title": item.title,
        "attributes": item.attributes,
        "updated_at": int(time.time()),
    }
    for feature, vector in update.vectors.items():
        document[feature] = [float(v) for v in np.asarray(vector, np.float32).ravel()]
    if update.words is not None:
        document["words"] = words_text(update.words)
    if update.keypoints is not None:
        document["keypoints"] = base64.b64encode(update.keypoints).decode("ascii")
    if update.keypoints is not None or update.words is not None:
        # Words of an unnamed vocabulary are as good as none: the next run quantises them.
        document["words_vocab"] = update.vocabulary_id if update.words is not None and update.vocabulary_id else PENDING_WORDS
    return document


def bulk_actions(index: str, updates: Iterable[ItemUpdate] = (), deletes: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """``helpers.bulk`` actions: whole-document ``index`` ops and ``delete`` ops, by item id."""
    for update in updates:
        yield {"_op_type": "index", "_index": index, "_id": update.item.id, "_source": item_document(update)}
    for item_id in deletes:
        yield {"_op_type": "delete", "_index": index, "_id": item_id}


def _record(source: dict[str, Any]) -> ItemRecord:
    return ItemRecord(
        key=int(source["key"]), id=source["id"], image=source.get("image", ""),
        category=source.get("category", ""), title=source.get("title", ""),
        attributes=source.get("attributes") or {}, fingerprint=source.get("fingerprint", ""),
    )


def _field(feature: str) -> str:
    """The document field that holds ``feature``'s rows (the local feature's are its keypoints)."""
    from indexer.local import FEATURE_NAME

    return "keypoints" if feature == FEATURE_NAME else feature


def holding(feature: str) -> dict[str, Any]:
    """The query for the documents that hold ``feature``.

    Keypoints are a binary field, stored but not indexed, so nothing can search on it: the
    ``words_vocab`` keyword that every document with keypoints carries answers instead.
    """
    from indexer.local import FEATURE_NAME

    return {"exists": {"field": "words_vocab" if feature == FEATURE_NAME else feature}}


def field_value(kind: str | None, feature: str, blob: bytes) -> Any:
    """A ``MetadataStore`` feature row (float32 bytes) as a field of the mapped ``kind`` holds it."""
    if kind == "dense_vector":
        return np.frombuffer(blob, np.float32).tolist()
    if kind == "float":
        (value,) = np.frombuffer(blob, np.float32)
        return float(value)
    raise ValueError(f"{feature!r} rows cannot be written as partial updates: its field is {kind or 'not mapped'}")


def feature_blob(value: Any) -> bytes:
    """A field's value as the embedded store keeps the row: base64 text decoded, numbers as float32."""
    if isinstance(value, str):
        return base64.b64decode(value)
    return np.asarray(value, np.float32).tobytes()


class ElasticStore:
    """``CatalogStore`` in an Elasticsearch index (one document per item, ``_id`` = item id)."""

    backend = "es"

    def __init__(
        self,
        client: Any,
        settings: ElasticSettings | None = None,
        chunk_size: int = 200,
        max_retries: int = 5,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.client = client
        self.settings = settings or ElasticSettings()
        self.chunk_size, self.max_retries = chunk_size, max_retries
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self._sleep = sleep
        self._dims: dict[str, int] | None = None

    @classmethod
    def connect(cls, url: str, index: str = "catalens", request_timeout: float = 30.0, **options: Any) -> ElasticStore:
        from elasticsearch import Elasticsearch

        client = Elasticsearch(url, request_timeout=request_timeout, retry_on_timeout=True, max_retries=3)
        settings = ElasticSettings(index=index, **{k: options.pop(k) for k in list(options) if k in ElasticSettings.__dataclass_fields__})
        return cls(client, settings, **options)

    @property
    def index(self) -> str:
        return self.settings.index

    # --- schema

    def ensure_index(self, dims: dict[str, int]) -> None:
        """Create the template and the index for these vector dimensions (no-op if they exist)."""
        existing = self.dims() if self.client.indices.exists(index=self.index) else None
        if existing is not None:
            mismatched = {f: d for f, d in dims.items() if existing.get(f) not in (None, d)}
            if mismatched:
                raise ValueError(
                    f"Elasticsearch index {self.index!r} has vectors {existing}, not {mismatched}; a vector field "
                    "keeps its dims: keep the settings, or use another index (CATALENS_ES_INDEX)"
                )
            # New vector fields, or fields of a newer catalens, can be added to a live index;
            # existing documents lack them until they are written again.
            wanted = index_template({**existing, **dims}, self.settings)["template"]["mappings"]["properties"]
            missing = {name: spec for name, spec in wanted.items() if name not in self._properties()}
            if missing:
                self.client.indices.put_mapping(index=self.index, properties=missing)
                self._dims = None
            return
        template = index_template(dims, self.settings)
        self.client.indices.put_index_template(name=self.index, **template)
        self.client.indices.create(index=self.index)
        self._dims = dict(dims)
        log.info("created Elasticsearch index %s with vectors %s", self.index, dims)

    def _properties(self) -> dict[str, Any]:
        mapping = self.client.indices.get_mapping(index=self.index)
        return next(iter(mapping.values()))["mappings"].get("properties", {})

    def dims(self) -> dict[str, int]:
        if self._dims is None:
            properties = self._properties()
            self._dims = {name: int(spec["dims"]) for name, spec in properties.items() if spec.get("type") == "dense_vector"}
        return dict(self._dims)

    def refresh(self) -> None:
        """Make written documents searchable now (tests, the end of an indexing run)."""
        self.client.indices.refresh(index=self.index)

    # --- queries

    def count(self) -> int:
        return int(self.client.count(index=self.index)["count"])

    def knn(self, feature, vectors, k, category=None, keys=None):
        """As ``CatalogStore.knn``; ``keys`` restricts the search to those item keys."""
        queries = np.atleast_2d(np.asarray(vectors, np.float32))
        category, keys = _filter_terms(category, keys)
        allowed = None if keys is None else np.asarray(keys, np.int64)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        keys = np.full((len(queries), k), -1, np.int64)
        for row, vector in enumerate(queries):
            body = knn_body(feature, vector, k, category, keys=allowed)
            hits = self.client.search(index=self.index, **body)["hits"]["hits"]
            for column, hit in enumerate(hits[:k]):
                # Elasticsearch reports cosine similarity as (1 + cos) / 2; give back cos, as FAISS does.
                scores[row, column] = 2.0 * float(hit["_score"]) - 1.0
                keys[row, column] = int(hit["_source"]["key"])
        return scores, keys

    def word_candidates(self, words, k, category=None, keys=None):
        """As ``CatalogStore.word_candidates``; ``keys`` restricts the search to those item keys.

        Scores are BM25 divided by the best hit's, so in (0, 1] as the embedded tf-idf cosine
        is: local search ranks any verified match (8+ inliers) above every unverified one.
        """
        body = words_body(words, k, *_filter_terms(category, keys))
        if body is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        hits = self.client.search(index=self.index, **body)["hits"]["hits"]
        found = np.array([int(hit["_source"]["key"]) for hit in hits], np.int64)
        scores = np.array([float(hit["_score"]) for hit in hits], np.float32)
        if len(scores) and scores[0] > 0:
            scores /= scores[0]
        return found, scores

    def keypoints(self, keys):
        from indexer.local import FEATURE_NAME

        return self.feature_blobs(FEATURE_NAME, keys)

    def feature_blobs(self, feature: str, keys: Iterable[int] | None = None) -> dict[int, bytes]:
        """``MetadataStore.feature_blobs``: each item's ``feature`` row as bytes, by key.

        Vectors and scores come back as float32 bytes, keypoints as their blob; every item
        holding ``feature`` when ``keys`` is None.
        """
        field = _field(feature)
        if keys is None:
            sources = self._scan(holding(feature), ["key", field])
        else:
            # Keypoint blobs are the largest rows: their chunk size bounds every request's answer.
            sources = self._by_key(keys, ["key", field], KEYPOINT_CHUNK)
        # An image without keypoints stores an empty blob: as before, it has none to fetch.
        return {int(source["key"]): feature_blob(source[field]) for source in sources if source.get(field) not in (None, "")}

    def feature_keys(self, feature: str) -> set[int]:
        """``MetadataStore.feature_keys``: keys of the items holding ``feature``, rows unread."""
        return {int(source["key"]) for source in self._scan(holding(feature), ["key"])}

    def local_items(self, exclude_vocabulary: str | None = None) -> dict[int, str]:
        """key -> id of the items with stored keypoints (not yet quantised with ``exclude_vocabulary``)."""
        from indexer.local import FEATURE_NAME

        query: dict[str, Any] = {"bool": {"filter": [holding(FEATURE_NAME)]}}
        if exclude_vocabulary is not None:
            query["bool"]["must_not"] = [{"term": {"words_vocab": exclude_vocabulary}}]
        return {int(source["key"]): source["id"] for source in self._scan(query, ["key", "id"])}

    def set_words(self, words: dict[str, np.ndarray], vocabulary_id: str) -> None:
        """Partial updates: item id -> its visual words under vocabulary ``vocabulary_id``."""
        self._update({item_id: {"words": words_text(ids), "words_vocab": vocabulary_id} for item_id, ids in words.items()})

    def items(self, keys):
        return {int(source["key"]): _record(source) for source in self._by_key(keys, RECORD_FIELDS, 1000)}

    def all_items(self) -> list[ItemRecord]:
        """``MetadataStore.all_items``: every stored item's record, ordered by key."""
        return sorted(self.records().values(), key=lambda record: record.key)

    def item_by_id(self, item_id):
        from elasticsearch import NotFoundError

        try:
            response = self.client.get(index=self.index, id=item_id, source_includes=RECORD_FIELDS)
        except NotFoundError:
            return None
        return _record(response["_source"])

    def categories(self):
        response = self.client.search(
            index=self.index, size=0, aggs={"categories": {"terms": {"field": "category", "size": 65_536}}}
        )
        return {bucket["key"]: int(bucket["doc_count"]) for bucket in response["aggregations"]["categories"]["buckets"]}

    def keys_in_category(self, prefix):
        query = category_filter(prefix) or {"match_all": {}}
        keys = sorted(int(source["key"]) for source in self._scan(query, ["key"]))
        return CategoryKeys(keys, prefix.strip("/")) if category_filter(prefix) else np.array(keys, np.int64)

    def vectors(self, feature: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """``MetadataStore.vectors``: every item's ``feature`` vector (keys, rows), ordered by key.

        What classification fits on; one scan of the index (items without the field are left out).
        """
        blobs = self.feature_blobs(feature)
        keys = np.array(sorted(blobs), np.int64)
        rows = np.frombuffer(b"".join(blobs[int(key)] for key in keys), np.float32).reshape(len(keys), dim)
        return keys, rows

    def fingerprints(self):
        sources = self._scan({"match_all": {}}, ["key", "id", "fingerprint"])
        return {source["id"]: (int(source["key"]), source.get("fingerprint", "")) for source in sources}

    def _scan(self, query: dict[str, Any], fields: list[str]) -> Iterator[dict[str, Any]]:
        """``fields`` of every document matching ``query``, through a scroll."""
        from elasticsearch import helpers

        for hit in helpers.scan(self.client, index=self.index, query={"query": query, "_source": fields}):
            yield hit["_source"]

    def _by_key(self, keys: Iterable[int], fields: list[str], chunk: int) -> Iterator[dict[str, Any]]:
        """``fields`` of the documents of these item keys, ``chunk`` keys a request."""
        keys = [int(key) for key in keys]
        for start in range(0, len(keys), chunk):
            part = keys[start : start + chunk]
            response = self.client.search(index=self.index, query={"terms": {"key": part}}, size=len(part), source=fields)
            for hit in response["hits"]["hits"]:
                yield hit["_source"]

    # --- writes

    def upsert_items(self, updates):
        updates = list(updates)
        self._bulk(list(bulk_actions(self.index, updates=updates)))
        return [item_key(update.item.id) for update in updates]

    def delete_items(self, ids):
        ids = list(dict.fromkeys(ids))
        self._bulk(list(bulk_actions(self.index, deletes=ids)))
        return [item_key(item_id) for item_id in ids]

    @contextmanager
    def transaction(self) -> Iterator[dict[int, dict[str, bytes]]]:
        """``MetadataStore.transaction`` for feature rows: ``put_feature`` buffers, the exit sends.

        The buffer (key -> feature -> row) goes out as one partial update per item, in bulk
        chunks retried with back-off; a block that raises sends nothing, as a rollback keeps
        nothing. Sending twice is harmless: each update sets fields of the document named by
        the item's id.
        """
        rows: dict[int, dict[str, bytes]] = {}
        yield rows
        self._write_rows(rows)

    def put_feature(self, rows: dict[int, dict[str, bytes]], feature: str, key: int, data: bytes) -> None:
        """``MetadataStore.put_feature`` inside ``transaction``: ``data`` is a float32 vector or score."""
        rows.setdefault(int(key), {})[feature] = data

    def _write_rows(self, rows: Mapping[int, Mapping[str, bytes]]) -> None:
        if not rows:
            return
        kinds = {name: spec.get("type") for name, spec in self._properties().items()}
        # Documents are named by item id; the rows by key: one lookup per chunk of keys.
        ids = {int(source["key"]): source["id"] for source in self._by_key(rows, ["key", "id"], 1000)}
        if len(ids) < len(rows):
            log.warning("%d item(s) were deleted before their rows could be written", len(rows) - len(ids))
        self._update({
            ids[key]: {_field(name): field_value(kinds.get(_field(name)), name, blob) for name, blob in fields.items()}
            for key, fields in rows.items() if key in ids
        })

    def delete_feature(self, feature: str) -> None:
        """``MetadataStore.delete_feature``: the field leaves every document; its mapping stays.

        One update-by-query on the cluster. A document written meanwhile is skipped (conflicts
        proceed) rather than failing the whole request: an indexing run that rewrote it wrote
        it whole, from the current models.
        """
        field = _field(feature)
        self.client.update_by_query(
            index=self.index, query=holding(feature), conflicts="proceed", refresh=True, slices="auto",
            script={"source": "ctx._source.remove(params.field)", "lang": "painless", "params": {"field": field}},
        )

    def _bulk(self, actions: list[dict[str, Any]]) -> None:
        """Send ``actions`` in chunks; retry a chunk with exponential back-off on failure.

        ``streaming_bulk`` already retries single documents the cluster rejects with 429 (too
        busy); a chunk that fails as a whole (connection lost, node restarting) is sent again
        here, which is safe because every action names its document by item id.
        """
        from elasticsearch import ApiError, TransportError, helpers

        for start in range(0, len(actions), self.chunk_size):
            chunk = actions[start : start + self.chunk_size]
            for attempt in range(self.max_retries + 1):
                try:
                    errors = []
                    for ok, result in helpers.streaming_bulk(
                        self.client, chunk, chunk_size=self.chunk_size, raise_on_error=False,
                        max_retries=self.max_retries, initial_backoff=self.initial_backoff,
                        max_backoff=self.max_backoff,
                    ):
                        op, info = next(iter(result.items()))
                        # Deleting what is already gone is success: deletes are idempotent.
                        if not ok and not (op == "delete" and info.get("status") == 404):
                            errors.append(info)
                    if errors:
                        raise RuntimeError(f"Elasticsearch rejected {len(errors)} document(s), e.g. {errors[0]}")
                    break
                except (TransportError, ApiError) as error:
                    if attempt == self.max_retries:
                        raise
                    delay = min(self.max_backoff, self.initial_backoff * 2**attempt)
                    log.warning("bulk request failed (%s); retrying in %.0fs", error, delay)
                    self._sleep(delay)

    def records(self) -> dict[str, ItemRecord]:
        """Every stored item's record (no vectors): what an indexing run compares the catalog with."""
        return {source["id"]: _record(source) for source in self._scan({"match_all": {}}, RECORD_FIELDS)}

    def update_metadata(self, items: Sequence[Any]) -> None:
        """Partial updates of category/title/attributes, vectors untouched."""
        self._update({item.id: {"category": item.category, "title": item.title, "attributes": item.attributes} for item in items})

    def _update(self, documents: Mapping[str, dict[str, Any]]) -> None:
        """Partial updates, item id -> the fields to set; the document's other fields stay."""
        self._bulk([
            {"_op_type": "update", "_index": self.index, "_id": item_id, "doc": fields}
            for item_id, fields in documents.items()
        ])


class _ElasticVectors:
    """The ``FaissVectorStore`` search surface over one dense_vector field."""

    def __init__(self, store: ElasticStore, feature: str):
        self.store, self.feature = store, feature

    @property
    def ntotal(self) -> int:
        return self.store.count()

    def search(self, queries: np.ndarray, k: int, allowed_keys: np.ndarray | None = None):
        return self.store.knn(self.feature, queries, k, keys=allowed_keys)


class _ElasticWords:
    """The ``BagOfWords.search`` surface over the ``words`` field: a scored term query."""

    def __init__(self, store: ElasticStore):
        self.store = store

    def search(self, words: np.ndarray, k: int, allowed: np.ndarray | None = None):
        return self.store.word_candidates(words, k, keys=allowed)


class ElasticIndexView:
    """Enough of ``CatalogIndex`` for search, classification and anomaly code to run on a cluster.

    ``SearchEngine(ElasticIndexView(store))`` answers every mode from Elasticsearch with no
    change to the engine: ``deep`` and ``ae`` through ``vector_store(name)`` (filtered kNN),
    ``local`` and ``fused`` through ``local_index()`` (the vocabulary from ``models_dir``, word
    candidates from a term query) and the store's ``feature_blobs`` (keypoints of the
    candidates being verified only). Item lookups and category filters go to the store, which
    has the ``MetadataStore`` methods that code uses. Code that refits a feature (the
    autoencoder) calls the index's vector-store upkeep as well: here the cluster indexes
    vectors as they are written, so that upkeep maps the field and refreshes.
    """

    def __init__(self, store: ElasticStore, config: Any = None, models_dir: str | Path | None = None):
        from indexer.config import load_config

        self.store = store
        self.config = config or load_config()
        self.root = f"elasticsearch:{store.index}"
        # What is fitted on the catalog (heads, vocabulary) stays in files beside the client.
        self.models_dir = Path(models_dir or default_models_dir(store.index))
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._cache: dict[str, Any] = {}
        self._meta: dict[str, Any] = {}

    @property
    def meta(self) -> dict[str, Any]:
        """The cluster's vector dims, beside what this process noted (an autoencoder's summary)."""
        self._meta["dims"] = self.store.dims()
        return self._meta

    def set_dim(self, feature: str, dim: int) -> None:
        """Map ``feature`` as a ``dim``-d vector field; a field of other dims refuses (ValueError)."""
        self.store.ensure_index({feature: dim})

    def drop_vector_store(self, feature: str) -> None:
        """Nothing to drop: a mapped field stays on the index (``delete_feature`` empties it)."""

    def rebuild_vector_store(self, feature: str, dim: int) -> _ElasticVectors:
        """The cluster indexed the vectors as they were written: make them searchable now."""
        self.store.refresh()
        return self.vector_store(feature)

    def replace_vector_store(self, feature: str, store: _ElasticVectors) -> None:
        """Nothing to swap: the cluster is the vector store."""

    def save(self) -> None:
        """The cluster keeps what was written; make it searchable now."""
        self.store.refresh()

    def vector_store(self, feature: str) -> _ElasticVectors:
        if feature not in self.store.dims():
            from indexer.index import IndexUnavailableError

            raise IndexUnavailableError(f"{self.root}: this index has no {feature!r} vectors")
        return _ElasticVectors(self.store, feature)

    def local_index(self):
        """``indexer.local.LocalIndex`` whose word search is a term query on the cluster, or None."""
        from indexer.local import VOCAB_FILE, LocalConfig, LocalIndex, VisualVocabulary

        path = self.models_dir / VOCAB_FILE
        if not path.is_file():
            return None
        # Keyed by the file's mtime: an indexing run elsewhere that refits it is picked up.
        stamp = f"local_index:{path.stat().st_mtime_ns}"
        return self.cached(stamp, lambda: LocalIndex(
            VisualVocabulary.load(path)[0], _ElasticWords(self.store), LocalConfig.from_index(self)))

    def deep_extractor(self):
        from indexer.deep import DeepFeatureExtractor

        return self.cached("deep_extractor", lambda: DeepFeatureExtractor(
            self.config.backbone, runtime=self.config.runtime, batch_size=self.config.batch_size))

    def cached(self, name: str, build):
        with self.lock:
            if name not in self._cache:
                self._cache[name] = build()
            return self._cache[name]

    def close(self) -> None:
        self.store.client.close()


def index_catalog_to_elastic(
    catalog: Any,
    store: ElasticStore,
    config: Any = None,
    features: Sequence[Any] | None = None,
    prune: bool = True,
    progress: bool = True,
    models_dir: str | Path | None = None,
) -> Any:
    """Bring an Elasticsearch store in line with ``catalog``, as ``index_catalog`` does locally.

    Reuses the embedded pipeline: the same features (``features_for``: deep, then each
    extension's, such as local keypoints, colour and autoencoder codes once a model exists) and
    the same plan of what to extract (``plan_run``). ``iter_prepared`` decodes in worker
    processes, each feature's ``preparer``/``finish`` computes vectors (global features, one
    ``dense_vector`` field each) or blobs (the local feature: stored as keypoints). Every
    ``commit_every`` images go to the cluster in one bulk request keyed by item id, so a run
    that dies resumes where it stopped: items whose image fingerprint is already stored, with
    every feature, are skipped. An item extracted again is written whole, so rows derived from
    its old image (its anomaly score) go with the old document. Then ``update_visual_words``
    fits the vocabulary (into ``models_dir``) if needed and quantises the items that lack words.
    """
    from datasets.catalog import load_catalog
    from indexer.config import load_config
    from indexer.features import GlobalFeature, iter_prepared
    from indexer.pipeline import Failure, IndexReport, complete_keys, features_for, plan_run

    started = time.perf_counter()
    config = config or load_config()
    items = catalog if isinstance(catalog, list) else load_catalog(catalog)
    view = ElasticIndexView(store, config, models_dir)
    features = features_for(view) if features is None else features
    global_features = [f for f in features if isinstance(f, GlobalFeature)]
    local_features = [f for f in features if not isinstance(f, GlobalFeature)]
    store.ensure_index({f.name: f.dim for f in global_features})
    report = IndexReport(index=f"elasticsearch:{store.index}")

    existing = store.records()
    plan = plan_run(items, existing, complete_keys(store, features))
    store.update_metadata([item for item, _ in plan.metadata_only])
    report.failures.extend(plan.missing)
    report.unchanged, report.metadata_updated = plan.unchanged, len(plan.metadata_only)
    to_extract = plan.extract
    if prune:
        listed = {item.id for item in items}
        gone = [item_id for item_id in existing if item_id not in listed]
        report.removed = len(store.delete_items(gone)) if gone else 0

    pending: list[ItemUpdate] = []

    def commit() -> None:
        store.upsert_items(pending)
        for update in pending:
            if update.item.id in existing:
                report.updated += 1
            else:
                report.added += 1
        pending.clear()

    from tqdm import tqdm

    preparers = {feature.name: feature.preparer for feature in features}
    draft = max(getattr(feature, "draft_size", 0) or 0 for feature in features) or None
    with tqdm(total=len(to_extract), unit="img", desc="indexing", disable=not progress) as bar:
        for batch in iter_prepared(
            [item.image for item, _ in to_extract], preparers, batch_size=config.batch_size,
            num_workers=config.num_workers, max_pixels=config.max_pixels, draft_size=draft,
        ):
            finished = {feature.name: feature.finish(batch.prepared[feature.name]) for feature in features}
            for row, position in enumerate(batch.positions):
                item, fingerprint = to_extract[position]
                update = ItemUpdate(item, fingerprint, {f.name: finished[f.name][row] for f in global_features})
                if local_features:
                    update.keypoints = finished[local_features[0].name][row]
                pending.append(update)
            for position, error in batch.errors.items():
                item, _ = to_extract[position]
                report.failures.append(Failure(str(item.image), item.id, error))
            report.extracted += len(batch.positions)
            bar.update(len(batch.positions) + len(batch.errors))
            if len(pending) >= config.commit_every:
                commit()
    if pending:
        commit()
    store.refresh()
    if local_features:
        update_visual_words(view)
    report.seconds = time.perf_counter() - started
    log.info(
        "indexed into %s: %d added, %d updated, %d metadata-only, %d removed, %d unchanged, %d failed in %.1fs",
        report.index, report.added, report.updated, report.metadata_updated, report.removed,
        report.unchanged, len(report.failures), report.seconds,
    )
    return report


def update_visual_words(view: ElasticIndexView) -> int:
    """Fit the visual vocabulary on stored keypoints when due, then give items their words.

    The rule is the embedded index's (``indexer.local.LocalExtension``): fit once, refit when
    the catalog has grown ``refit_growth`` times. Items whose ``words_vocab`` is not the current
    vocabulary (new, re-extracted, or all of them after a refit) are quantised in chunks and
    written with partial updates; a run that dies half-way leaves the rest for the next one.
    Returns how many items were quantised.
    """
    from indexer.local import VOCAB_FILE, LocalConfig, item_descriptors, refreshed_vocabulary

    started = time.perf_counter()
    store, config = view.store, LocalConfig.from_index(view)
    local = store.local_items()
    path = view.models_dir / VOCAB_FILE
    if not local:
        path.unlink(missing_ok=True)
        return 0
    vocabulary = refreshed_vocabulary(view, path, sorted(local), config)
    todo = store.local_items(exclude_vocabulary=vocabulary.id_)
    keys = sorted(todo)
    for start in range(0, len(keys), KEYPOINT_CHUNK):
        described = item_descriptors(view, keys[start : start + KEYPOINT_CHUNK])
        if not described:
            continue
        # One call per chunk: per-image calls pay faiss's thread start-up each time.
        assigned = vocabulary.transform(np.concatenate([d.descriptors for d in described.values()]))
        bounds = np.cumsum([0] + [len(d) for d in described.values()])
        store.set_words(
            {todo[key]: assigned[a:b] for key, a, b in zip(described, bounds[:-1], bounds[1:], strict=True)},
            vocabulary.id_,
        )
    store.refresh()
    log.info("visual words: %d items quantised in %.1fs", len(todo), time.perf_counter() - started)
    return len(todo)
