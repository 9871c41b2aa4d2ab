"""The Elasticsearch ``ItemStore``: one document per item, named by its id, through the official client.

Writing an item again replaces its document and deleting twice is harmless, so writes,
deletions and a resumed indexing run are idempotent. Bulk requests are sent in chunks and a
chunk that fails as a whole is retried with exponential back-off. Rows of items already stored
(what a model fitted on the catalog computed) are partial updates of their documents.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catalens.datasets.catalog import CatalogItem
from catalens.indexer.files import atomic_path
from catalens.indexer.stores import Failure, ItemFilter, ItemRecord, ItemUpdate, item_key
from catalens.indexer.stores.elastic.mapping import (
    RECORD_FIELDS,
    ElasticSettings,
    bulk_actions,
    document_text,
    feature_blob,
    field_value,
    index_template,
    knn_body,
    local_properties,
    read_field,
    text_body,
    text_properties,
    vector_property,
    vocab_field,
    words_body,
    words_field,
    words_text,
)

log = logging.getLogger(__name__)

# Keypoint blobs are ~60-80 kB an item in _source: fetch this many per request.
ROW_CHUNK = 128
# The update-by-query script of ``delete_feature``.
REMOVE_FIELDS = "for (def field : params.fields) { ctx._source.remove(field); }"


def _reads_words(feature: str) -> bool:
    """Whether ``feature`` is a registered text feature (its field holds the words read, not base64)."""
    from catalens.indexer.features import UnknownFeatureError, feature_spec

    try:
        return feature_spec(feature).kind == "text"
    except UnknownFeatureError:
        return False


def _record(source: dict[str, Any]) -> ItemRecord:
    return ItemRecord(
        key=int(source["key"]), id=source["id"], image=source.get("image", ""),
        category=source.get("category", ""), title=source.get("title", ""),
        attributes=source.get("attributes") or {}, fingerprint=source.get("fingerprint", ""),
    )


class ElasticItemStore:
    """``ItemStore`` in one Elasticsearch index; ``state_dir`` keeps what the cluster does not (failures)."""

    def __init__(
        self,
        client: Any,
        settings: ElasticSettings | None = None,
        state_dir: str | Path | None = None,
        chunk_size: int = 200,
        max_retries: int = 5,
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.client = client
        self.settings = settings or ElasticSettings()
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.chunk_size, self.max_retries = chunk_size, max_retries
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self._sleep = sleep
        self._properties_cache: dict[str, Any] | None = None

    @classmethod
    def connect(cls, url: str, index: str = "catalens", request_timeout: float = 30.0, **options: Any) -> ElasticItemStore:
        from elasticsearch import Elasticsearch

        client = Elasticsearch(url, request_timeout=request_timeout, retry_on_timeout=True, max_retries=3)
        fields = ElasticSettings.__dataclass_fields__
        settings = ElasticSettings(index=index, **{k: options.pop(k) for k in list(options) if k in fields})
        return cls(client, settings, **options)

    @property
    def index(self) -> str:
        return self.settings.index

    # --- schema

    def exists(self) -> bool:
        return bool(self.client.indices.exists(index=self.index))

    def ensure_index(self, dims: dict[str, int], local_features: Sequence[str] = (),
                     scalars: Sequence[str] = (), text_features: Sequence[str] = ()) -> None:
        """Create the template and the index (no-op if they exist), or add the missing fields.

        A vector field keeps its dims: asking for others is refused (``ValueError``) before
        anything is written.
        """
        if not self.exists():
            template = index_template(dims, local_features, self.settings, text_features)
            self.client.indices.put_index_template(name=self.index, **template)
            self.client.indices.create(index=self.index)
            self._properties_cache = None
            log.info("created Elasticsearch index %s with vectors %s", self.index, dims)
            if scalars:
                self.ensure_index({}, (), scalars)
            return
        existing = self.dims()
        mismatched = {f: d for f, d in dims.items() if existing.get(f) not in (None, d)}
        if mismatched:
            raise ValueError(
                f"Elasticsearch index {self.index!r} has vectors {existing}, not {mismatched}; a vector field "
                "keeps its dims: keep the settings, or use another index")
        wanted: dict[str, Any] = {name: vector_property(dim, self.settings) for name, dim in dims.items()}
        for feature in local_features:
            wanted.update(local_properties(feature))
        for feature in text_features:
            wanted.update(text_properties(feature))
        wanted.update({name: {"type": "float"} for name in scalars})
        # Fields of a newer catalens, or of a feature added since, can join a live index;
        # existing documents lack them until they are written again.
        base = index_template({}, (), self.settings)["template"]["mappings"]["properties"]
        properties = self._properties()
        missing = {name: spec for name, spec in {**base, **wanted}.items() if name not in properties}
        if missing:
            self.client.indices.put_mapping(index=self.index, properties=missing)
            self._properties_cache = None

    def _properties(self) -> dict[str, Any]:
        if self._properties_cache is None:
            mapping = self.client.indices.get_mapping(index=self.index)
            self._properties_cache = next(iter(mapping.values()))["mappings"].get("properties", {})
        return self._properties_cache

    def _kind(self, feature: str) -> str | None:
        """The mapped type of ``feature``'s field, or None. A field this process has not seen may
        have been mapped since by another (``catalens train-ae`` beside a running server): a miss
        reads the mapping again."""
        spec = self._properties().get(feature)
        if spec is None:
            self._properties_cache = None
            spec = self._properties().get(feature)
        return None if spec is None else spec.get("type")

    def _fields(self, feature: str) -> list[str]:
        """The fields that hold ``feature``: a local feature's words and vocabulary go with its keypoints."""
        if self._kind(feature) == "binary":
            return [feature, words_field(feature), vocab_field(feature)]
        return [feature]

    def dims(self) -> dict[str, int]:
        if not self.exists():
            return {}
        return {name: int(spec["dims"]) for name, spec in self._properties().items() if spec.get("type") == "dense_vector"}

    def refresh(self) -> None:
        """Make written documents searchable now (tests, the end of an indexing run)."""
        self.client.indices.refresh(index=self.index)

    # --- reading items

    def count(self) -> int:
        return int(self.client.count(index=self.index)["count"]) if self.exists() else 0

    def records(self) -> dict[str, ItemRecord]:
        if not self.exists():
            return {}
        return {source["id"]: _record(source) for source in self._scan({"match_all": {}}, RECORD_FIELDS)}

    def items(self, keys: Iterable[int]) -> dict[int, ItemRecord]:
        return {int(source["key"]): _record(source) for source in self._by_key(keys, RECORD_FIELDS, 1000)}

    def item_by_id(self, item_id: str) -> ItemRecord | None:
        from elasticsearch import NotFoundError

        try:
            response = self.client.get(index=self.index, id=item_id, source_includes=RECORD_FIELDS)
        except NotFoundError:
            return None
        return _record(response["_source"])

    def categories(self) -> dict[str, int]:
        if not self.exists():
            return {}
        response = self.client.search(
            index=self.index, size=0, aggs={"categories": {"terms": {"field": "category", "size": 65_536}}}
        )
        return {bucket["key"]: int(bucket["doc_count"]) for bucket in response["aggregations"]["categories"]["buckets"]}

    def category_filter(self, prefix: str) -> ItemFilter:
        # The cluster indexes the category path: one term filters on it, no keys needed.
        return ItemFilter(category=prefix.strip("/"))

    # --- reading rows

    def _holding(self, feature: str) -> dict[str, Any]:
        """The documents that hold ``feature``. A local feature's keypoints are a binary field that
        nothing can search on: the ``<feature>_vocab`` keyword every such document carries answers."""
        return {"exists": {"field": vocab_field(feature) if self._kind(feature) == "binary" else feature}}

    def rows(self, feature: str, keys: Iterable[int] | None = None) -> dict[int, bytes]:
        if keys is None:
            sources = self._scan(self._holding(feature), ["key", feature])
        else:
            # Keypoint blobs are the largest rows: their chunk size bounds every request's answer.
            sources = self._by_key(keys, ["key", feature], ROW_CHUNK)
        if _reads_words(feature):  # the words as read, an empty string where none were
            return {int(source["key"]): feature_blob(source[feature], "text") for source in sources if feature in source}
        # An image without keypoints stores an empty blob: as before, it has none to fetch.
        return {int(source["key"]): feature_blob(source[feature]) for source in sources if source.get(feature) not in (None, "")}

    def row_keys(self, feature: str) -> set[int]:
        if not self.exists() or self._kind(feature) is None:
            return set()
        return {int(source["key"]) for source in self._scan(self._holding(feature), ["key"])}

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

    # --- searching

    def knn(self, feature: str, vectors: np.ndarray, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) as FAISS gives them: cosine similarities and keys, -1 where fewer than k."""
        queries = np.atleast_2d(np.asarray(vectors, np.float32))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        keys = np.full((len(queries), k), -1, np.int64)
        if filter is not None and filter.empty:
            return scores, keys
        for row, vector in enumerate(queries):
            hits = self.client.search(index=self.index, **knn_body(feature, vector, k, filter))["hits"]["hits"]
            for column, hit in enumerate(hits[:k]):
                # Elasticsearch reports cosine similarity as (1 + cos) / 2; give back cos, as FAISS does.
                scores[row, column] = 2.0 * float(hit["_score"]) - 1.0
                keys[row, column] = int(hit["_source"]["key"])
        return scores, keys

    def word_candidates(self, feature: str, words: np.ndarray, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores in (0, 1]): BM25 divided by the best hit's, as the folder's tf-idf cosine is."""
        body = words_body(feature, words, k, filter)
        if body is None or (filter is not None and filter.empty):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        hits = self.client.search(index=self.index, **body)["hits"]["hits"]
        found = np.array([int(hit["_source"]["key"]) for hit in hits], np.int64)
        scores = np.array([float(hit["_score"]) for hit in hits], np.float32)
        if len(scores) and scores[0] > 0:
            scores /= scores[0]
        return found, scores

    def keys_not_quantised(self, feature: str, vocabulary_id: str) -> dict[int, str]:
        """key -> id of the items with keypoints whose words are not from ``vocabulary_id``."""
        query = {"bool": {"filter": [{"exists": {"field": vocab_field(feature)}}],
                          "must_not": [{"term": {vocab_field(feature): vocabulary_id}}]}}
        return {int(source["key"]): source["id"] for source in self._scan(query, ["key", "id"])}

    def set_words(self, feature: str, words: dict[int, np.ndarray], vocabulary_id: str) -> None:
        """Partial updates: each item's words under vocabulary ``vocabulary_id``."""
        ids = self._ids(words)
        self._update({ids[key]: {words_field(feature): words_text(found), vocab_field(feature): vocabulary_id}
                      for key, found in words.items() if key in ids})

    # --- writing

    def write(self, updates: Sequence[ItemUpdate]) -> list[int]:
        updates = list(updates)
        self._bulk(list(bulk_actions(self.index, updates=updates)))
        self._forget_failures({update.item.id for update in updates})
        return [item_key(update.item.id) for update in updates]

    def update_metadata(self, items: Sequence[CatalogItem]) -> None:
        self._update({item.id: {"category": item.category, "title": item.title, "attributes": item.attributes,
                                "image": str(item.image),
                                "search_text": document_text(item.id, item.title, item.category, item.attributes)}
                      for item in items})

    def search_text(self, query: str, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, BM25 scores): one fuzzy ``match`` on ``search_text`` and on each text feature's words."""
        if not self.exists() or not query.strip() or (filter is not None and filter.empty):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        properties = self._properties()
        fields = sorted(read_field(name) for name, spec in properties.items()
                        if spec.get("type") == "text" and read_field(name) in properties)
        hits = self.client.search(index=self.index, **text_body(query, k, fields, filter))["hits"]["hits"]
        return (np.array([int(hit["_source"]["key"]) for hit in hits], np.int64),
                np.array([max(float(hit["_score"]), 1e-6) for hit in hits], np.float32))

    def delete(self, ids: Sequence[str]) -> list[int]:
        ids = list(dict.fromkeys(ids))
        self._bulk(list(bulk_actions(self.index, deletes=ids)))
        return [item_key(item_id) for item_id in ids]

    def _ids(self, keys: Iterable[int]) -> dict[int, str]:
        """Documents are named by item id, rows by key: one lookup per chunk of keys."""
        return {int(source["key"]): source["id"] for source in self._by_key(keys, ["key", "id"], 1000)}

    def put_rows(self, feature: str, rows: dict[int, bytes]) -> None:
        if not rows:
            return
        kind = self._kind(feature)
        ids = self._ids(rows)
        if len(ids) < len(rows):
            log.warning("%d item(s) were deleted before their %s rows could be written", len(rows) - len(ids), feature)
        self._update({ids[key]: {feature: field_value(kind, feature, blob)} for key, blob in rows.items() if key in ids})

    def delete_rows(self, feature: str, keys: Collection[int]) -> None:
        """Partial updates setting the feature's fields to null: ``exists`` no longer matches them."""
        ids = self._ids(keys)
        if not ids:
            return
        fields = self._fields(feature)
        self._update({item_id: dict.fromkeys(fields) for item_id in ids.values()})

    def replace_rows(self, rows: dict[str, dict[int, bytes]], dims: dict[str, int] | None = None) -> None:
        """Elasticsearch has no transactions: each feature's fields are cleared, then written.
        ``dims`` is not needed: the index's mapping records each vector field's dimension."""
        for feature, by_key in rows.items():
            self.delete_feature(feature)
            self.put_rows(feature, by_key)

    def delete_feature(self, feature: str) -> None:
        """The feature's fields leave every document (the mapping stays): one update-by-query.

        The query sees refreshed documents only, so the index is refreshed first: rows written a
        moment ago go too. A document written meanwhile is skipped (conflicts proceed) rather
        than failing the whole request: an indexing run that rewrote it wrote it whole, from the
        current models.
        """
        if self._kind(feature) is None:
            return
        self.refresh()
        self.client.update_by_query(
            index=self.index, query=self._holding(feature), conflicts="proceed", refresh=True, slices="auto",
            script={"source": REMOVE_FIELDS, "lang": "painless", "params": {"fields": self._fields(feature)}},
        )

    def _update(self, documents: Mapping[str, dict[str, Any]]) -> None:
        """Partial updates, item id -> the fields to set; the document's other fields stay."""
        self._bulk([{"_op_type": "update", "_index": self.index, "_id": item_id, "doc": fields}
                    for item_id, fields in documents.items()])

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

    # --- failures: kept beside the client, where the catalog's models are

    def _failures_file(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "failures.json"

    def record_failures(self, failures: Sequence[Failure]) -> None:
        path = self._failures_file()
        if path is None or not failures:
            return
        known = {failure.source: failure for failure in self.failures()}
        known.update({failure.source: failure for failure in failures})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps([vars(failure) for failure in known.values()], indent=1))

    def _forget_failures(self, ids: set[str]) -> None:
        """Items written since they failed (the file was fixed) are failures no more."""
        path = self._failures_file()
        if path is None or not path.is_file():
            return
        kept = [failure for failure in self.failures() if failure.item_id not in ids]
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps([vars(failure) for failure in kept], indent=1))

    def failures(self) -> list[Failure]:
        path = self._failures_file()
        if path is None or not path.is_file():
            return []
        return sorted((Failure(**entry) for entry in json.loads(path.read_text())), key=lambda failure: failure.source)

    def close(self) -> None:
        self.client.close()
