"""The store surface that search, classification and anomaly scoring use, and its backends.

``CatalogStore`` is what query-time code may ask of a catalog: kNN per global feature with an
optional category-prefix filter, bag-of-visual-words candidates, item lookups, the category
listing, keypoints of a few candidates, and writes of items with their vectors and words.
``EmbeddedStore`` adapts the on-disk ``CatalogIndex`` (FAISS + SQLite + inverted file);
``indexer.elastic.ElasticStore`` keeps the same things in an Elasticsearch cluster.
``open_store`` picks one from ``--backend`` / ``--es-url`` / ``CATALENS_ES_URL``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from datasets.catalog import CatalogItem
from indexer.metadata import ItemRecord

# Re-exported: the rule for searching sits beside the rule for building (recommended_factory).
from indexer.vector_store import recommended_search_parameters as recommended_search_parameters

if TYPE_CHECKING:
    from indexer.index import CatalogIndex

log = logging.getLogger(__name__)

BACKENDS = ("embedded", "es")


@dataclass
class ItemUpdate:
    """One item to write: its catalog record, the fingerprint of its image, what was extracted.

    ``vectors`` maps a global feature name to its (dim,) float32 vector; ``words`` are the
    visual-word ids of the image (repeats mean term frequency); ``keypoints`` is the local
    feature's serialised blob, kept for geometric verification of top candidates;
    ``vocabulary_id`` names the fitted vocabulary ``words`` came from.
    """

    item: CatalogItem
    fingerprint: str
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    words: np.ndarray | None = None
    keypoints: bytes | None = None
    vocabulary_id: str = ""


@runtime_checkable
class CatalogStore(Protocol):
    """What query-time code needs from a catalog store; keys are int64 item keys."""

    backend: str

    def dims(self) -> dict[str, int]: ...

    def count(self) -> int: ...

    def knn(
        self, feature: str, vectors: np.ndarray, k: int, category: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys), each (n_queries, k), cosine similarity, best first, -1 keys pad."""

    def word_candidates(
        self, words: np.ndarray, k: int, category: str | None = None, keys: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores in (0, 1]) of items sharing visual words with ``words``, best first.

        ``category`` filters on a path prefix, ``keys`` on an explicit set of item keys.
        """

    def keypoints(self, keys: Sequence[int]) -> dict[int, bytes]:
        """Serialised local features of these items only (for geometric verification)."""

    def items(self, keys: Iterable[int]) -> dict[int, ItemRecord]: ...

    def item_by_id(self, item_id: str) -> ItemRecord | None: ...

    def categories(self) -> dict[str, int]: ...

    def keys_in_category(self, prefix: str) -> np.ndarray: ...

    def upsert_items(self, updates: Sequence[ItemUpdate]) -> list[int]:
        """Write items (insert or replace, idempotent); returns their keys."""

    def delete_items(self, ids: Sequence[str]) -> list[int]:
        """Delete items by id (ids not present are ignored); returns the keys removed."""

    def fingerprints(self) -> dict[str, tuple[int, str]]:
        """id -> (key, fingerprint) of every stored item: what a resumed run skips."""


class EmbeddedStore:
    """``CatalogStore`` over an open ``CatalogIndex`` (FAISS vectors, SQLite items, inverted file).

    Writes go through SQLite in one transaction and patch the loaded FAISS indexes, as the
    indexing pipeline does; fitted models (vocabulary) are refreshed by the pipeline's
    extensions, not here.
    """

    backend = "embedded"

    def __init__(self, index: CatalogIndex):
        self.index = index

    def dims(self) -> dict[str, int]:
        return dict(self.index.meta["dims"])

    def count(self) -> int:
        return self.index.store.count()

    def knn(self, feature, vectors, k, category=None):
        allowed = self.index.store.keys_in_category(category) if category else None
        queries = np.atleast_2d(np.asarray(vectors, np.float32))
        if allowed is not None and len(allowed) == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        return self.index.vector_store(feature).search(queries, k, allowed)

    def word_candidates(self, words, k, category=None, keys=None):
        local = self.index.local_index()
        if local is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        allowed = self.index.store.keys_in_category(category) if category else None
        if keys is not None:
            allowed = np.asarray(keys, np.int64) if allowed is None else np.intersect1d(allowed, keys)
        return local.bow.search(np.asarray(words), k, allowed)

    def keypoints(self, keys):
        from indexer.local import FEATURE_NAME

        return self.index.store.feature_blobs(FEATURE_NAME, [int(key) for key in keys])

    def items(self, keys):
        return self.index.store.items(keys)

    def item_by_id(self, item_id):
        return self.index.store.item_by_id(item_id)

    def categories(self):
        return self.index.store.categories()

    def keys_in_category(self, prefix):
        return self.index.store.keys_in_category(prefix)

    def fingerprints(self):
        return self.index.store.fingerprints()

    def upsert_items(self, updates):
        store = self.index.store
        keys: list[int] = []
        additions: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        with store.transaction() as db:
            for update in updates:
                key = store.upsert(db, update.item, update.fingerprint)
                keys.append(key)
                for name, vector in update.vectors.items():
                    vector = np.asarray(vector, np.float32)
                    self.index.set_dim(name, len(vector))
                    store.put_feature(db, name, key, vector.tobytes())
                    additions.setdefault(name, ([], []))[0].append(key)
                    additions[name][1].append(vector)
                if update.keypoints is not None:
                    from indexer.local import FEATURE_NAME

                    store.put_feature(db, FEATURE_NAME, key, update.keypoints)
        with self.index.lock:
            for name, (added, rows) in additions.items():
                vectors = self.index.vector_store(name)
                vectors.remove(np.asarray(added, np.int64))
                if vectors.is_trained:
                    vectors.add(np.asarray(added, np.int64), np.stack(rows))
        return keys

    def delete_items(self, ids):
        from indexer.maintenance import remove_items

        records = [self.index.store.item_by_id(item_id) for item_id in dict.fromkeys(ids)]
        remove_items(self.index, [record.id for record in records if record is not None])
        return [record.key for record in records if record is not None]


def replace_feature_rows(
    index, feature: str, keys: Sequence[int], rows: np.ndarray, scalars: dict[str, np.ndarray] | None = None,
) -> None:
    """Every item's ``feature`` row (and one value a key of each ``scalars`` entry) replaced, the vectors re-indexed.

    What a model trained on the whole catalog (autoencoder codes, fine-tuned rows) does once it
    has re-coded every item. ``index`` is a ``CatalogIndex`` or an ``ElasticIndexView``; the
    caller holds ``index.lock``. The dims go first: on Elasticsearch ``set_dim`` maps the field
    the rows are written to, and a field of other dims refuses before the old rows are deleted.
    """
    scalars = scalars or {}
    index.drop_vector_store(feature)
    index.set_dim(feature, rows.shape[1])
    for name in (feature, *scalars):
        index.store.delete_feature(name)
    with index.store.transaction() as db:
        for position, key in enumerate(keys):
            index.store.put_feature(db, feature, int(key), rows[position].astype(np.float32).tobytes())
            for name, values in scalars.items():
                index.store.put_feature(db, name, int(key), np.float32(values[position]).tobytes())
    index.replace_vector_store(feature, index.rebuild_vector_store(feature, rows.shape[1]))


def recommended_factory(n_items: int, dim: int = 1280) -> str:
    """The faiss factory string for a catalog of ``n_items`` ``dim``-d vectors on one machine.

    From ``benchmarks/bench_scale.py`` (1280-d clustered vectors, 2 shared cores, p50 of one
    query, recall@10 against exact; the table is in that file's docstring):

    - up to ~100k items, ``Flat``: exact, no training, 489 MB and 136 ms a query at 100k, still
      interactive next to the network's forward pass; at 1M it is 4.9 GB and 2.6 s a query.
    - beyond, IVF-PQ with an 8-bit re-ranking stage, ~4*sqrt(n) cells: at 1M
      (``IVF4096_HNSW32,PQ64,Refine(SQ8)``) 1.36 GB, 1.3 ms, recall 0.960 searched with
      ``nprobe=16,k_factor_rf=30``. HNSW32 (faiss' default efConstruction) was faster, 0.77 ms,
      but reached only 0.942 (efSearch 128 and 256 alike) for 5.2 GB, four times the memory:
      both are far below the query's CNN time, so recall and memory decide. PQ codes without
      re-ranking reached 0.31-0.34, so the re-ranking stage is part of the rule.

    Search it with ``recommended_search_parameters``.
    """
    if n_items <= 100_000:
        return "Flat"
    # ~4*sqrt(n) cells (a power of two); an HNSW quantizer keeps cell assignment cheap.
    nlist = 2 ** max(10, min(16, round(math.log2(4 * math.sqrt(n_items)))))
    subquantizers = max(m for m in (8, 16, 32, 64) if dim % m == 0) if dim % 8 == 0 else 8
    return f"IVF{nlist}_HNSW32,PQ{subquantizers},Refine(SQ8)"


def open_store(index_dir: str | Path | None, backend: str | None = None, es_url: str | None = None, **es_options) -> CatalogStore:
    """The store ``catalens index/search`` should use.

    ``backend`` is ``embedded`` or ``es``; left out, it is ``es`` when ``es_url`` or
    ``$CATALENS_ES_URL`` is set, else ``embedded`` (``index_dir`` must then hold an index).
    For Elasticsearch, ``index_dir`` is unused except as the default index name's source
    (``$CATALENS_ES_INDEX`` or ``catalens``).
    """
    es_url = es_url or os.environ.get("CATALENS_ES_URL")
    backend = backend or ("es" if es_url else "embedded")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "es":
        if not es_url:
            raise ValueError("--backend es needs --es-url URL or CATALENS_ES_URL")
        from indexer.elastic import ElasticStore

        es_options.setdefault("index", os.environ.get("CATALENS_ES_INDEX", "catalens"))
        return ElasticStore.connect(es_url, **es_options)
    if index_dir is None:
        raise ValueError("the embedded backend needs an index folder (--index DIR)")
    from indexer.index import CatalogIndex

    return EmbeddedStore(CatalogIndex.open(index_dir))


def add_backend_arguments(parser) -> None:
    """``--backend`` and ``--es-url`` for ``catalens index`` / ``catalens search`` (argparse)."""
    parser.add_argument(
        "--backend", choices=BACKENDS, default=None,
        help="where items and vectors live (default: es if --es-url or CATALENS_ES_URL is set, else embedded)",
    )
    parser.add_argument("--es-url", default=None, help="Elasticsearch URL (or CATALENS_ES_URL)")
