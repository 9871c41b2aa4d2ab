"""Classifying photos into the catalog's category tree, with the classifier learned from the indexed
items themselves (``search.classifier``) bound to the catalog: its fitted slot (fitting on the
catalog's rows, storing it with the index, loading it back, knowing when it is stale) and the
``classify`` query.

The features are whatever the index holds with a classification weight (``deep``, or the
fine-tuned ``deep_ft`` in its place; the ``colour`` histogram beside it, since ImageNet features
ignore the colour that tells two apple varieties apart), each L2-normalised and weighted. Where
the index has local features, the nearest support items are verified geometrically against the
query, and a leaf with a verified match gains ``evidence_weight`` x (inliers, scaled 0-1) in
log-probability: a printed label that matches decides between two cartons the pooled features
cannot tell apart. ``benchmarks/bench_classify.py`` measures each part.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from catalens.indexer.estimator import ModelFileError
from catalens.indexer.features import embed, feature_spec, feature_weights
from catalens.indexer.fitted import FittedSlot
from catalens.indexer.imageio import ImageSource, decode_queries
from catalens.indexer.stores import vectors_of
from catalens.search.classifier import (
    UNKNOWN,
    EvidenceConfig,
    HierarchicalFewShotClassifier,
    LevelPrediction,
    Prediction,
    nearest_rows,
    verified_evidence,
    weighted_features,
)
from catalens.search.verification import verify

log = logging.getLogger(__name__)

# The catalog's classifier, in its models folder (see ``fitted_classifier``).
CLASSIFIER_FILE = "classifier.pt"


@dataclass
class ClassifyResult:
    query: str
    category: str = UNKNOWN
    levels: list[LevelPrediction] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    error: str | None = None
    # The confidence a level needs to be part of ``category`` (the classifier's ``level_threshold``).
    sure_at: float = 0.9

    @property
    def guess(self) -> str:
        """The best guess at the leaf: the path of ``levels``, sure or not (``category`` stops at the
        deepest level that is sure)."""
        return "/".join(level.name for level in self.levels) or self.category

    @property
    def sure_depth(self) -> int:
        """How many levels of ``guess`` are sure: 0 for ``unknown``."""
        return 0 if self.category == UNKNOWN else self.category.count("/") + 1

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"query": self.query, "error": self.error}
        return {
            "query": self.query,
            "category": self.category,
            "levels": [{"name": level.name, "confidence": round(float(level.confidence), 4)} for level in self.levels],
            "neighbours": list(self.neighbours),
            "guess": self.guess,
            "sure_depth": self.sure_depth,
            "sure_at": self.sure_at,
        }


# --- on a catalog


@dataclass
class FittedClassifier:
    """A classifier fitted on a catalog's items: which items, and with which features and weights."""

    classifier: HierarchicalFewShotClassifier
    ids: list[str]
    keys: np.ndarray
    weights: dict[str, float]

    def leaf_probabilities(self, vectors: Mapping[str, np.ndarray], absent_leaf: str | None = None) -> dict[str, float]:
        """The probability of each leaf category for one query's ``vectors`` (one per weighted feature).

        ``absent_leaf`` is left out and the rest renormalised: a calibration query of a product the
        catalog is taken not to hold asks a classifier that never learnt it."""
        features = weighted_features({name: vectors[name][None] for name in self.weights}, self.weights)
        probs, _, _ = self.classifier.leaf_proba(features)
        leaves = [str(leaf) for leaf in self.classifier.leaves_]
        probs = probs[0].copy()
        if absent_leaf in leaves:
            probs[leaves.index(absent_leaf)] = 0.0
            probs /= max(probs.sum(), 1e-12)
        return dict(zip(leaves, probs.tolist(), strict=True))


@dataclass
class _CatalogRows:
    """What a classifier of the catalog is fitted on: its items' weighted features, in key order."""

    keys: np.ndarray
    ids: list[str]
    categories: list[str]
    features: np.ndarray
    weights: dict[str, float]

    def stamp(self) -> dict[str, Any]:
        return _catalog_stamp(self.keys, self.categories, self.features, self.weights)


def aligned_rows(catalog: Any, weights: dict[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(keys, rows by feature) of the items that have a row of every feature in ``weights``, in the
    same order; a feature some items lack yet (an index built before it existed, until the next
    index run) is left out of ``rows``, with a log line."""
    dims = catalog.dims()
    rows: dict[str, np.ndarray] = {}
    keys = np.zeros(0, np.int64)
    for name in sorted(weights, key=lambda n: -weights[n]):
        found, found_rows = vectors_of(catalog.items, name, dims[name])
        if not rows:
            keys, rows[name] = found, found_rows
            continue
        position = {int(key): i for i, key in enumerate(found)}
        if any(int(key) not in position for key in keys):
            log.info("%s: some items have no %r rows yet; left out until the next index run", catalog.location, name)
            continue
        rows[name] = found_rows[[position[int(key)] for key in keys]]
    return keys, rows


def _catalog_rows(catalog: Any, exclude: Sequence[int] = (), weights: dict[str, float] | None = None) -> _CatalogRows:
    """The catalog's items less ``exclude``, with the features of ``weights`` (default: every
    global feature with a classification weight); ``ValueError`` where there is nothing to classify with."""
    if weights is None:
        weights = feature_weights([feature_spec(name) for name in catalog.global_features()], "classify")
    weights = dict(weights)
    if not weights:
        raise ValueError(f"{catalog.location}: this index has no features to classify with")
    dims = catalog.dims()
    if any(name not in dims for name in weights):
        raise ValueError(f"{catalog.location}: this index no longer holds the features {', '.join(weights)}")
    keys, rows = aligned_rows(catalog, weights)
    records = catalog.items.items(keys.tolist())
    excluded = set(int(key) for key in exclude)
    keep = np.array([int(key) in records and int(key) not in excluded for key in keys], dtype=bool)
    keys = keys[keep]
    weights = {name: weights[name] for name in rows if name in weights}
    features = weighted_features({name: rows[name][keep] for name in weights}, weights)
    return _CatalogRows(keys, [records[int(key)].id for key in keys], [records[int(key)].category for key in keys],
                        features, weights)


def _fit_on_catalog(catalog: Any, exclude: Sequence[int] = (), **params: Any) -> FittedClassifier:
    """The classifier of ``catalog``'s items, less the keys in ``exclude`` (held out to calibrate what uses it)."""
    data = _catalog_rows(catalog, exclude)
    classifier = HierarchicalFewShotClassifier(**params).fit(data.features, data.categories)
    log.info("classifier fitted on %d items in %d leaf categories (features %s)", len(data.keys),
             len(classifier.leaves_), ", ".join(f"{name} x{weight:g}" for name, weight in data.weights.items()))
    # What it was fitted on, kept in its file: whether it is fresh, and which rows to attach when read back.
    classifier.fitted_on_ = data.stamp()
    classifier.support_keys_ = np.asarray(data.keys, np.int64)
    return FittedClassifier(classifier, data.ids, data.keys, data.weights)


def _catalog_stamp(keys: np.ndarray, categories: Sequence[str], features: np.ndarray,
                   weights: dict[str, float]) -> dict[str, Any]:
    """What a stored classifier must have been fitted on: these items in this order, with these
    categories and these feature rows (a digest: an Elasticsearch catalog's write counter starts
    again in every process, and an image indexed again keeps its key), and these weights."""
    digest = hashlib.sha256(np.ascontiguousarray(keys, dtype=np.int64).tobytes())
    digest.update("\n".join(categories).encode())
    digest.update(np.ascontiguousarray(features, dtype=np.float32))
    return {"items": digest.hexdigest(), "weights": dict(weights)}


def _load_stored(catalog: Any, path: Path) -> FittedClassifier:
    """The classifier stored with the catalog, its support rows read from the catalog as they are
    now; items removed since it was fitted leave its neighbours. ``ModelFileError`` where it
    cannot serve this catalog."""
    loaded = HierarchicalFewShotClassifier.load(path)
    stamp = getattr(loaded, "fitted_on_", None)
    if not isinstance(stamp, dict) or not stamp.get("weights"):
        raise ModelFileError(f"{path}: a classifier without a record of what it was fitted on; it is fitted again")
    try:
        data = _catalog_rows(catalog, weights=stamp["weights"])
    except ValueError as error:
        raise ModelFileError(f"{path}: {error}") from None
    keys = getattr(loaded, "support_keys_", None)
    if keys is None:  # written by an older catalens: usable only on the very state it was fitted on
        if data.stamp() != stamp:
            raise ModelFileError(f"{path}: an older catalens' classifier of another catalog state; it is fitted again")
        keys = data.keys
    keys = np.asarray(keys, np.int64)
    position = {int(key): i for i, key in enumerate(data.keys)}
    kept = np.array([int(key) in position for key in keys], dtype=bool)
    if not kept.any():
        raise ModelFileError(f"{path}: none of the items the classifier was fitted on remain; it is fitted again")
    loaded.support_leaf_ = loaded.support_leaf_[kept]
    rows = [position[int(key)] for key in keys[kept]]
    loaded.attach_support(data.features[rows])
    loaded.support_keys_ = keys[kept]
    return FittedClassifier(loaded, [data.ids[i] for i in rows], keys[kept], dict(stamp["weights"]))


def _classifier_freshness(fitted: FittedClassifier, catalog: Any) -> str | None:
    """None while the classifier was fitted on exactly the catalog's items and rows, with today's
    hyper-parameters; else why not."""
    saved = getattr(fitted.classifier, "saved_params_", None)
    # The hyper-parameters as written: one added since the file was fitted must not pass as its default.
    if saved is not None and saved != HierarchicalFewShotClassifier().get_params():
        return "the stored classifier was fitted with other settings (an older catalens)"
    try:
        data = _catalog_rows(catalog)
    except ValueError as error:
        return str(error)
    if data.stamp() != getattr(fitted.classifier, "fitted_on_", None):
        return "the catalog changed since the classifier was fitted"
    return None


CLASSIFIER = FittedSlot(
    name="classifier", model_file=CLASSIFIER_FILE, load=_load_stored,
    fit=lambda catalog, progress: _fit_on_catalog(catalog), fresh=_classifier_freshness,
    save=lambda fitted, path: fitted.classifier.save(path))


class ClassifierMissingError(ValueError):
    """No classifier is fitted for this catalog yet; the message says why and what fits one."""


def fitted_classifier(catalog: Any) -> FittedClassifier:
    """The catalog's last fitted classifier, fresh or not (never fitted here: the command that
    changed the catalog refits it, a server in the background). ``ClassifierMissingError`` where
    none was ever fitted."""
    state = CLASSIFIER.current(catalog)
    if state.model is None:
        raise ClassifierMissingError(f"{state.reason}; run 'catalens calibrate --index ...' to fit it")
    return state.model


def fit_classifier_without(catalog: Any, exclude: Sequence[int]) -> FittedClassifier:
    """A classifier of the catalog that never saw the items ``exclude`` (not stored)."""
    return _fit_on_catalog(catalog, exclude, calibration_holdout=0.0)


def _query_features(catalog: Any, fitted: FittedClassifier, images: list[Image.Image]) -> np.ndarray:
    return weighted_features({name: embed(catalog.feature(name), images) for name in fitted.weights}, fitted.weights)


def _catalog_evidence(catalog: Any, fitted: FittedClassifier, images: list[Image.Image],
                      features: np.ndarray) -> np.ndarray | None:
    """Verified-match evidence against the catalog's stored keypoints, or None without local features."""
    local = [name for name in catalog.local_features() if catalog.items.row_keys(name)]
    if not local:
        return None
    config = EvidenceConfig()
    nearest, _ = fitted.classifier.nearest_support(features, config.verify_top)
    support_keys = fitted.keys[np.unique(nearest)]
    total = np.zeros((len(images), len(fitted.classifier.leaves_)))
    for name in local:
        feature = catalog.feature(name)
        queries = [feature.preparer(image) for image in images]
        stored = catalog.stored_descriptors(name, support_keys)

        def verify_pair(row: int, support_row: int, stored=stored, queries=queries) -> int:
            item = stored.get(int(fitted.keys[support_row]))
            return verify(queries[row], item).inliers if item is not None else 0

        total = np.maximum(total, verified_evidence(fitted.classifier, features, verify_pair, config, nearest))
    return total


def classify(
    catalog: Any,
    sources: Sequence[ImageSource | Image.Image],
    names: Sequence[str] | None = None,
    n_neighbours: int = 5,
) -> list[ClassifyResult]:
    """Classify query images into the catalog's category tree; unreadable ones get an error."""
    fitted = fitted_classifier(catalog)
    results: list[ClassifyResult] = []
    images, positions = [], []
    for position, (name, image, error) in enumerate(decode_queries(sources, names, catalog.config.max_pixels)):
        if error is not None:
            results.append(ClassifyResult(query=name, error=error))
            continue
        results.append(ClassifyResult(query=name))
        images.append(image)
        positions.append(position)
    if images:
        features = _query_features(catalog, fitted, images)
        evidence = _catalog_evidence(catalog, fitted, images, features)
        for position, prediction in zip(positions, fitted.classifier.predict_paths(features, evidence), strict=True):
            result = results[position]
            result.category = prediction.category
            result.levels = prediction.levels
            result.sure_at = float(fitted.classifier.level_threshold)
            result.neighbours = [fitted.ids[int(row)] for row in prediction.neighbours[:n_neighbours]]
    return results


# The model's names, where callers have always found them.
__all__ = [
    "CLASSIFIER", "CLASSIFIER_FILE", "UNKNOWN", "ClassifierMissingError", "ClassifyResult", "EvidenceConfig",
    "FittedClassifier", "HierarchicalFewShotClassifier", "LevelPrediction", "Prediction", "aligned_rows", "classify",
    "fit_classifier_without", "fitted_classifier", "nearest_rows", "verified_evidence", "weighted_features",
]
