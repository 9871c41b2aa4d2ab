"""The evidence of one search result that its calibrated confidence is read from, at query time.

Raw scores live on a different scale in every mode (cosine, fused sums, inlier counts) and
barely separate right answers from wrong ones. A result's confidence is read instead from five
numbers that predict correctness (``EVIDENCE``): its score, its margin to the best item of another
product, its verified inliers, how many of the nearest results show its product, and the
probability the catalog's classifier (``search.classify``) gives its leaf category.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from catalens.indexer.features import feature_spec
from catalens.indexer.stores import ItemFilter, product_of
from catalens.search.query import Query
from catalens.search.ranking import rank_products
from catalens.search.settings import SearchSettings

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.search.classify import FittedClassifier

EVIDENCE = ("score", "margin", "inliers", "agreement", "category")
# Evidence is read from this many results, whatever k the caller asked: a result's confidence
# does not depend on how many results are shown.
DEPTH = 20
AGREEMENT_OF = 10  # "how many of the nearest results show its product" counts this many


def _is_local(mode: str) -> bool:
    return mode == "local" or (mode != "fused" and feature_spec(mode).kind == "local")


def _scale(mode: str, scores: np.ndarray) -> np.ndarray:
    """Local scores are inlier counts (tens to hundreds): their logarithm is what adds evidence linearly."""
    scores = np.asarray(scores, np.float64)
    return np.log1p(np.maximum(scores, 0.0)) if _is_local(mode) else scores


def hit_evidence(mode: str, scores: np.ndarray, products: Sequence[str], inliers: np.ndarray,
                 reference_scores: np.ndarray, reference_products: Sequence[str], inlier_cap: int,
                 category_proba: np.ndarray | None = None) -> np.ndarray:
    """(n, len(EVIDENCE)) evidence of hits (``scores``, ``products``, best verified ``inliers``, the
    classifier's probability of each one's category) against the ranked ``reference`` list they
    come from (best first)."""
    scaled = _scale(mode, scores)
    reference = _scale(mode, reference_scores)
    reference_products = np.asarray(list(reference_products), dtype=object)
    top = reference_products[:AGREEMENT_OF]
    rows = np.zeros((len(scaled), len(EVIDENCE)), np.float64)
    for i, (score, product) in enumerate(zip(scaled, products, strict=True)):
        others = reference[reference_products != product]
        rows[i, 0] = score
        rows[i, 1] = score - (others.max() if len(others) else 0.0)
        rows[i, 2] = min(float(inliers[i]), inlier_cap) / inlier_cap
        rows[i, 3] = float(np.sum(top == product)) / max(len(top), 1)
    # Log-probability: a classifier's certainty adds up in odds, not in probability.
    rows[:, 4] = np.log(np.maximum(category_proba if category_proba is not None else np.ones(len(rows)), 1e-4))
    return rows


def category_probabilities(catalog: Catalog, query: Query, fitted: FittedClassifier | None,
                           absent_leaf: str | None = None) -> dict[str, float]:
    """The classifier's probability of each leaf category for this query, ``absent_leaf`` left out
    (``FittedClassifier.leaf_probabilities``); empty without a classifier."""
    if fitted is None:
        return {}
    return query.leaf_probabilities(catalog, fitted, absent_leaf)


def catalog_classifier(catalog: Catalog) -> FittedClassifier | None:
    """The catalog's last fitted classifier, or None where it has none (no features to classify with,
    or none fitted yet)."""
    from catalens.search.classify import fitted_classifier

    try:
        return fitted_classifier(catalog)
    except ValueError:
        return None


def _verified_inliers(catalog: Catalog, query: Query, mode: str, keys: Sequence[int]) -> np.ndarray:
    """Best inliers of each key over the local features, as far as this mode verified it (0 otherwise).

    Only modes that verify read them: what another mode verified on the same query earlier must
    not change this mode's confidence."""
    out = np.zeros(len(keys), np.float64)
    if mode != "fused" and not _is_local(mode):
        return out
    features = catalog.local_features() if mode in ("fused", "local") else [mode]
    for feature in features:
        checks = query.verifications(catalog, feature)
        for i, key in enumerate(keys):
            check = checks.get(int(key))
            if check is not None:
                out[i] = max(out[i], check.inliers)
    return out


def ranked_evidence(catalog: Catalog, query: Query, mode: str, filter: ItemFilter | None,
                    settings: SearchSettings, keys: Sequence[int] | None = None,
                    scores: Sequence[float] | None = None, classifier: FittedClassifier | None = None,
                    absent_leaf: str | None = None,
                    reference: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(evidence rows, keys, products) of ``keys``/``scores`` (default: the top ``DEPTH`` results)
    against this query's top ``DEPTH`` results in ``mode``, every photo of a product counted,
    uncollapsed (``reference``, where the caller has ranked them already)."""
    reference_keys, reference_scores = reference if reference is not None else \
        rank_products(catalog, query, mode, DEPTH, filter, settings.merged(collapse=False))
    if keys is None:
        keys, scores = reference_keys, reference_scores
    keys = [int(key) for key in keys]
    records = catalog.items.items([*keys, *reference_keys.tolist()])
    reference_products = [product_of(records[int(key)]) for key in reference_keys if int(key) in records]
    reference_scores = np.asarray([s for key, s in zip(reference_keys, reference_scores, strict=True) if int(key) in records])
    kept = [i for i, key in enumerate(keys) if key in records]
    keys = [keys[i] for i in kept]
    products = [product_of(records[key]) for key in keys]
    leaf_proba = category_probabilities(catalog, query, classifier, absent_leaf)
    rows = hit_evidence(mode, np.asarray([scores[i] for i in kept]), products,
                        _verified_inliers(catalog, query, mode, keys), reference_scores, reference_products,
                        settings.inlier_cap, np.array([leaf_proba.get(records[key].category, 0.0) for key in keys])
                        if leaf_proba else None)
    return rows, np.asarray(keys, np.int64), products

