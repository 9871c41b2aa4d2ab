"""The contracts every backend keeps, in the terms of the libraries underneath.

An index holds three kinds of store, each a small Protocol here:

- ``ItemStore``: the catalog's items and each item's feature rows (vectors, keypoints,
  scores). It is the source of truth; everything else can be derived from it.
- ``VectorStore``: one per global feature, nearest neighbours in FAISS's own terms:
  ``add(ids, x)``, ``search(x, k, filter) -> (D, I)``, ``remove(ids)``.
- ``WordIndex``: one per local feature, bag-of-visual-words candidates.

Item keys (the int64 ids every store speaks) are the same on every backend: ``item_key``
derives them from the catalog id, so a re-indexed item keeps its key and two machines agree.
Backends: ``folder`` (SQLite, FAISS files and an inverted file in one folder) and ``elastic``
(one Elasticsearch index). ``backends.open_catalog`` picks one from a location string.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from catalens.datasets.catalog import CatalogItem


def item_key(item_id: str) -> int:
    """The item's int64 key: 63 bits of blake2b of its catalog id, the same on every run and backend."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class ItemRecord:
    """A stored item: its catalog fields, its key and the fingerprint of the image it was extracted from."""

    key: int
    id: str
    image: str
    category: str
    title: str
    attributes: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def product_of(record: ItemRecord) -> str:
    """The product an item shows: its ``product`` attribute where the catalog gives one, else its leaf category."""
    product = record.attributes.get("product") if isinstance(record.attributes, dict) else None
    return str(product) if product not in (None, "") else record.category


# A catalog where at least this share of the products have one image is a catalog of packshots:
# a shop's one studio photo a product, queried with shop photos unlike it.
PACKSHOT_PRODUCT_SHARE = 0.5


def mostly_one_image(products: Iterable[str]) -> bool:
    """Of the products named (one name an image, ``product_of``), at least ``PACKSHOT_PRODUCT_SHARE`` have one image."""
    images = Counter(products)
    return bool(images) and sum(n == 1 for n in images.values()) >= PACKSHOT_PRODUCT_SHARE * len(images)


@dataclass
class ItemUpdate:
    """One item to write with what was extracted from its image.

    ``rows`` maps a feature name to its row: a float32 vector for a global feature, the
    serialised descriptors for a local one.
    """

    item: CatalogItem
    fingerprint: str
    rows: dict[str, np.ndarray | bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """An image that could not be used, and why (the reason names the file)."""

    source: str
    item_id: str | None
    reason: str


@dataclass(frozen=True)
class ItemFilter:
    """Which items a search may return: an explicit key set, a category path prefix, or both.

    A backend that indexes categories (Elasticsearch) filters on ``category`` with one term;
    FAISS and the inverted file need ``keys``, which the folder's item store resolves.
    """

    keys: np.ndarray | None = None
    category: str | None = None

    @property
    def empty(self) -> bool:
        return self.keys is not None and len(self.keys) == 0

    def narrowed(self, keys: np.ndarray) -> ItemFilter:
        """This filter, further restricted to ``keys``."""
        keys = np.asarray(keys, np.int64)
        return ItemFilter(keys if self.keys is None else np.intersect1d(self.keys, keys), self.category)


def stack_rows(blobs: dict[int, bytes], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 row blobs by key as (keys int64, rows (n, dim) float32), ordered by key."""
    keys = np.array(sorted(blobs), np.int64)
    rows = np.frombuffer(b"".join(blobs[int(key)] for key in keys), np.float32).reshape(len(keys), dim)
    return keys, rows


@runtime_checkable
class VectorStore(Protocol):
    """Cosine nearest neighbours over L2-normalised float32 rows, keyed by int64 item keys."""

    dim: int

    @property
    def ntotal(self) -> int: ...

    def add(self, ids: np.ndarray, x: np.ndarray) -> None: ...

    def search(self, x: np.ndarray, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(D, I), each (n_queries, k): cosine similarities best first, keys, -1 where fewer than k."""

    def remove(self, ids: np.ndarray) -> int: ...


@runtime_checkable
class WordIndex(Protocol):
    """Each item's visual words under one vocabulary, searchable as a tf-idf bag of words."""

    def search(self, words: np.ndarray, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores in (0, 1]) of the items sharing the most weighted words, best first."""

    def stale(self, vocabulary_id: str, changed: Collection[int] = ()) -> list[int]:
        """Keys holding descriptors whose words are missing, of another vocabulary, or in ``changed``."""

    def put(self, words: dict[int, np.ndarray], vocabulary_id: str) -> None: ...


@runtime_checkable
class ItemStore(Protocol):
    """Items and their feature rows; keys are ``item_key`` of the ids."""

    def count(self) -> int: ...

    def records(self) -> dict[str, ItemRecord]:
        """Every stored item by id: what an indexing run compares the catalog with."""

    def items(self, keys: Iterable[int]) -> dict[int, ItemRecord]: ...

    def item_by_id(self, item_id: str) -> ItemRecord | None: ...

    def categories(self) -> dict[str, int]: ...

    def category_filter(self, prefix: str) -> ItemFilter: ...

    def rows(self, feature: str, keys: Iterable[int] | None = None) -> dict[int, bytes]:
        """Each item's ``feature`` row as bytes (every item holding it when ``keys`` is None)."""

    def row_keys(self, feature: str) -> set[int]:
        """Keys of the items holding ``feature``, rows unread."""

    def write(self, updates: Sequence[ItemUpdate]) -> list[int]:
        """Items with their rows, replacing what was stored under their ids (idempotent)."""

    def update_metadata(self, items: Sequence[CatalogItem]) -> None: ...

    def delete(self, ids: Sequence[str]) -> list[int]:
        """Delete items by id (absent ids are ignored); returns the keys removed."""

    def put_rows(self, feature: str, rows: dict[int, bytes]) -> None:
        """Rows of items already stored (what a model fitted on the catalog computed for them)."""

    def delete_rows(self, feature: str, keys: Iterable[int]) -> None: ...

    def replace_rows(self, rows: dict[str, dict[int, bytes]], dims: dict[str, int] | None = None) -> None:
        """Each named feature's rows replaced by these, for every item: all at once where the
        backend has transactions, so a run killed meanwhile leaves the old rows or the new.
        ``dims``: the dimension of those that are vectors, recorded with them."""

    def delete_feature(self, feature: str) -> None: ...

    def search_text(self, query: str, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, BM25 scores > 0) of the ``k`` items whose id, title, category, attributes and words
        read from their image best match ``query`` (case, diacritics and typos aside), best first."""

    def record_failures(self, failures: Sequence[Failure]) -> None: ...

    def failures(self) -> list[Failure]: ...

    def close(self) -> None: ...


def vectors_of(items: ItemStore, feature: str, dim: int, keys: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stored ``feature`` vectors (keys, rows float32), ordered by key."""
    return stack_rows(items.rows(feature, keys), dim)
