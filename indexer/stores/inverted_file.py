"""The folder backend's ``WordIndex``: each item's visual words as rows of the item store, searched
through an in-memory tf-idf inverted file.

An item's words are one row (``<feature>.words``: the vocabulary's id, then int32 word ids), so
they commit and roll back with the item, and go with it when it is deleted or re-extracted.
The inverted file is derived from those rows and rebuilt when the store has changed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from catalens.indexer.stores import ItemFilter
from catalens.indexer.stores.sqlite_items import SqliteItemStore

_ID_BYTES = 32  # a vocabulary id is 32 hex digits


@dataclass
class BagOfWords:
    """tf-idf bags of visual words as an inverted file: a (words x items) sparse matrix.

    A query's words select rows, so scoring touches only the items sharing a word with it.
    """

    keys: np.ndarray  # (n_items,) int64, column order
    inverted: sparse.csr_matrix  # (n_words, n_items), columns L2-normalised tf-idf
    idf: np.ndarray  # (n_words,) float32

    @classmethod
    def build(cls, keys: np.ndarray, words: list[np.ndarray], n_words: int) -> BagOfWords:
        lengths = np.array([len(w) for w in words], np.int64)
        columns = np.repeat(np.arange(len(words)), lengths)
        rows = np.concatenate(words).astype(np.int64) if len(words) else np.zeros(0, np.int64)
        counts = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, columns)), shape=(n_words, len(words)))
        counts.sum_duplicates()
        document_frequency = np.diff(counts.indptr).astype(np.float32)
        idf = np.log((len(words) + 1) / (document_frequency + 1)).astype(np.float32)
        weighted = sparse.diags(idf) @ counts
        norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=0)).ravel())
        weighted = (weighted @ sparse.diags(1.0 / np.maximum(norms, 1e-12))).tocsr().astype(np.float32)
        return cls(np.asarray(keys, np.int64), weighted, idf)

    def query_vector(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unique, counts = np.unique(words, return_counts=True)
        weights = counts.astype(np.float32) * self.idf[unique]
        return unique, weights / max(float(np.linalg.norm(weights)), 1e-12)

    def search(self, words: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, cosine scores) of the ``k`` best items, best first."""
        if len(words) == 0 or len(self.keys) == 0 or k < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        unique, weights = self.query_vector(words)
        scores = np.asarray(self.inverted[unique].T @ weights).ravel()
        if allowed is not None:
            scores = np.where(np.isin(self.keys, allowed), scores, -1.0)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        top = top[scores[top] > 0]
        return self.keys[top], scores[top].astype(np.float32)


def words_feature(feature: str) -> str:
    """The item-store row that holds ``feature``'s visual words."""
    return f"{feature}.words"


def encode_words(words: np.ndarray, vocabulary_id: str) -> bytes:
    return vocabulary_id.encode("ascii").ljust(_ID_BYTES)[:_ID_BYTES] + np.asarray(words, np.int32).tobytes()


def decode_words(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, np.int32, offset=_ID_BYTES)


class SqliteWordIndex:
    """``WordIndex`` over the words rows of a ``SqliteItemStore``; ``cached`` keeps the inverted
    file per store generation (the catalog's cache)."""

    def __init__(self, items: SqliteItemStore, feature: str, cached: Any):
        self.items, self.feature, self.row = items, feature, words_feature(feature)
        self._cached = cached

    def _inverted(self) -> BagOfWords | None:
        def build() -> BagOfWords | None:
            blobs = self.items.rows(self.row)
            if not blobs:
                return None
            words = [decode_words(blob) for blob in blobs.values()]
            n_words = int(max((w.max() for w in words if len(w)), default=0)) + 1
            return BagOfWords.build(np.fromiter(blobs, np.int64, len(blobs)), words, n_words)

        return self._cached(f"{self.row}-inverted", build)

    def search(self, words: np.ndarray, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        inverted = self._inverted()
        if inverted is None or (filter is not None and filter.empty):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        words = np.asarray(words)
        # Words beyond the largest any item holds cannot match anything.
        words = words[words < inverted.inverted.shape[0]]
        return inverted.search(words, k, None if filter is None else filter.keys)

    def stale(self, vocabulary_id: str, changed: Collection[int] = ()) -> list[int]:
        current = self.items.keys_with_row_prefix(self.row, vocabulary_id.encode("ascii"))
        return sorted((self.items.row_keys(self.feature) - current) | (set(changed) & self.items.row_keys(self.feature)))

    def put(self, words: dict[int, np.ndarray], vocabulary_id: str) -> None:
        self.items.put_rows(self.row, {key: encode_words(ids, vocabulary_id) for key, ids in words.items()})
