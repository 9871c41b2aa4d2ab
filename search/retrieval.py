"""Candidates and their evidence, per feature: k nearest neighbours of a global feature, words and
geometric verification of a local one. What the query computes for them (vectors, words,
verifications) is kept on the ``Query``, so fusion and the single-feature modes share the work.

The local side is the logo mode: a small crop of a logo finds the items that print it, because
the word index only needs the crop's few words and RANSAC only needs a handful of inliers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from catalens.indexer.features import l2_normalise
from catalens.indexer.stores import ItemFilter, product_of, stack_rows
from catalens.search.settings import SearchSettings
from catalens.search.verification import Verifier

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.search.query import Query


# --- global features


# A product with shop exemplars scores the mean cosine of its this many nearest ones.
EXEMPLAR_NEIGHBOURS = 5


def global_search(catalog: Catalog, query: Query, feature: str, k: int,
                  filter: ItemFilter | None) -> tuple[np.ndarray, np.ndarray]:
    """(keys, cosines) of the ``k`` nearest items by ``feature``, best first; where the feature
    keeps shop exemplars, an item of a product that has some scores by them instead
    (``exemplar_cosines``)."""
    scores, keys = catalog.vectors(feature).search(query.vector(catalog, feature)[None], k, filter)
    valid = keys[0] >= 0
    keys, scores = keys[0][valid], scores[0][valid]
    by_exemplars = exemplar_cosines(catalog, query, feature, filter)
    if not by_exemplars:
        return keys, scores
    found = dict(zip(keys.tolist(), scores.tolist(), strict=True))
    found.update(by_exemplars)
    best = sorted(found.items(), key=lambda pair: -pair[1])[:k]
    return np.array([key for key, _ in best], np.int64), np.array([score for _, score in best], np.float32)


def candidate_cosines(catalog: Catalog, query: Query, feature: str, keys: Sequence[int]) -> dict[int, float]:
    """Cosine of the query to each of ``keys`` by ``feature``, from the stored rows (absent rows are
    left out); by the shop exemplars where its product has some, as ``global_search`` scores."""
    dim = catalog.dims()[feature]
    found, rows = stack_rows(catalog.items.rows(feature, [int(key) for key in keys]), dim)
    cosines = l2_normalise(rows) @ query.vector(catalog, feature) if len(found) else np.zeros(0, np.float32)
    scored = dict(zip(found.tolist(), cosines.tolist(), strict=True))
    score_of = _exemplar_scores(catalog, query, feature)
    if score_of:  # only these keys' products: no pass over every item
        products = item_products(catalog)
        scored.update({key: score_of[products[key][0]] for key in scored
                       if key in products and products[key][0] in score_of})
    return scored


def exemplar_cosines(catalog: Catalog, query: Query, feature: str, filter: ItemFilter | None = None
                     ) -> dict[int, float] | None:
    """Each item (that ``filter`` allows) of a product with shop exemplars: the mean cosine of the
    query to that product's ``EXEMPLAR_NEIGHBOURS`` nearest exemplars. None where ``feature``
    keeps none (``AdaptedDeep.shop_exemplars``: ``finetune --unlabeled`` on a catalog of packshots).

    A shop photo of a crate of apples is far from the apple's packshot and near the shop's other
    photos of crates of that apple: the product is found through the photos like the query."""
    score_of = _exemplar_scores(catalog, query, feature)
    if score_of is None:
        return None
    allowed = None if filter is None or filter.keys is None else set(np.asarray(filter.keys).tolist())
    prefix = None if filter is None or filter.category is None else filter.category.strip("/")
    return {key: score_of[product] for key, (product, category) in item_products(catalog).items()
            if product in score_of and (allowed is None or key in allowed)
            and (prefix is None or category == prefix or category.startswith(prefix + "/"))}


def _exemplar_scores(catalog: Catalog, query: Query, feature: str) -> dict[str, float] | None:
    """Each product's score by ``feature``'s shop exemplars (``_product_scores``), once a query;
    None where the feature keeps none."""
    exemplars = getattr(catalog.feature(feature), "shop_exemplars", None)
    kept = exemplars() if exemplars is not None else None
    if kept is None:
        return None
    # Once a query: fused search asks for its candidates and again for other features' candidates.
    return query.computed(catalog, f"exemplar-scores:{feature}",
                          lambda: _product_scores(*kept, query.vector(catalog, feature)))


def _product_scores(rows: np.ndarray, products: np.ndarray, vector: np.ndarray) -> dict[str, float]:
    """Each product's mean cosine of ``vector`` to its ``EXEMPLAR_NEIGHBOURS`` nearest ``rows``."""
    names, product_of_row = np.unique(products, return_inverse=True)
    cosines = rows @ vector
    # Each product's exemplars, best first: the first EXEMPLAR_NEIGHBOURS of each run.
    order = np.lexsort((-cosines, product_of_row))
    grouped, ranked = product_of_row[order], cosines[order]
    starts = np.searchsorted(grouped, np.arange(len(names)))
    best = np.arange(len(order)) - starts[grouped] < EXEMPLAR_NEIGHBOURS
    sums = np.bincount(grouped[best], weights=ranked[best], minlength=len(names))
    counts = np.maximum(np.bincount(grouped[best], minlength=len(names)), 1)
    return dict(zip(names.tolist(), (sums / counts).tolist(), strict=True))


def item_products(catalog: Catalog) -> dict[int, tuple[str, str]]:
    """Each item's (product, category) by key, read once a catalog write (what the exemplar
    scores and ``ranking.is_packshot_catalog`` read of the items)."""
    return catalog.cached("item-products", lambda: {
        record.key: (product_of(record), record.category) for record in catalog.items.records().values()})


def build_models(catalog: Catalog, names: Sequence[str]) -> None:
    """Build these features' models in the calling thread, before work goes to ``side_pool``:
    building one compiles a network (and may import OpenVINO, whose converter forks a process);
    beside another thread's BLAS product, that fork hung the product (OpenBLAS's fork handler
    waits on it)."""
    for name in names:
        catalog.feature(name)


def compute_side_by_side(catalog: Catalog, query: Query, global_features: Sequence[str],
                         local_features: Sequence[str]) -> None:
    """The query's vectors and words for these features, the network and the keypoints computed
    at once on two threads (both release the GIL), kept on the query for the rankers."""
    build_models(catalog, (*global_features, *local_features))
    jobs = [lambda name=name: query.vector(catalog, name) for name in global_features]
    jobs += [lambda name=name: query.words(catalog, name) for name in local_features]
    if len(jobs) < 2:
        for job in jobs:
            job()
        return
    # Largest first: the local feature's keypoints take longest, the network next.
    for future in [side_pool().submit(job) for job in reversed(jobs)]:
        future.result()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def side_pool() -> ThreadPoolExecutor:
    """The process's one extraction pool (server threads asking at once still share it)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(2, thread_name_prefix="catalens-extract")
        return _pool


# --- local features


def word_candidates(catalog: Catalog, query: Query, feature: str, k: int,
                    filter: ItemFilter | None) -> tuple[np.ndarray, np.ndarray]:
    """(keys, tf-idf scores in (0, 1]) of the ``k`` items sharing the most weighted words with the query."""
    return catalog.words(feature).search(query.words(catalog, feature), k, filter)


def local_search(catalog: Catalog, query: Query, k: int, filter: ItemFilter | None, settings: SearchSettings,
                 verifier: Verifier, features: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bag-of-words shortlist, its top ``local_verify_top`` re-ranked by ``verifier``'s inliers.

    A verified item scores its inliers plus its word score, so any verified match ranks above
    every unverified one; the rest keep the word score (< 1). Several local features add up.
    In the ``local`` mode (``features`` None) of a catalog with a text feature, the words read on
    the query (a text logo is words) add ``local_text_weight`` times their relative BM25.
    """
    scores: dict[int, float] = {}
    if features is None and settings.local_text_weight:
        from catalens.search.text import query_text_evidence

        weights = dict.fromkeys(catalog.text_features(), settings.local_text_weight)
        scores.update(query_text_evidence(catalog, query, 0.0, weights, max(k, settings.local_verify_top), filter))
    for feature in features or catalog.local_features():
        keys, word_scores = word_candidates(catalog, query, feature, max(k, settings.local_verify_top), filter)
        checks = query.verified(catalog, feature, keys[: settings.local_verify_top], verifier)
        for key, word_score in zip(keys.tolist(), word_scores.tolist(), strict=True):
            check = checks.get(key)
            inliers = verifier.inliers(check) if check is not None else 0
            scores[key] = scores.get(key, 0.0) + inliers + word_score
    if not scores:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    keys = np.fromiter(scores, np.int64, len(scores))
    values = np.fromiter(scores.values(), np.float32, len(scores))
    order = np.argsort(-values, kind="stable")[:k]
    return keys[order], values[order]
