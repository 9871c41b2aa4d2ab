"""Where a new item goes in the catalog's category tree, learned from the indexed items themselves.

A category with one item is described by its prototype (the mean of its centred, L2-normalised
deep features); with more items the prototype is averaged with a k-NN vote, and a linear model
shares out the probability of all leaves that have at least ``linear_min_support`` items. On
grocery val the linear model already beats prototypes at 5 items per leaf (51.8% against 46.5%
fine accuracy; benchmarks/bench_classify.py), hence its low default threshold. Level probabilities are sums of leaf probabilities, so a leaf always implies its parents,
and the answer stops at the deepest level whose confidence clears a threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from indexer.deep import l2_normalise
from indexer.imageio import ImageSource, decode_queries

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    return logits / logits.sum(axis=1, keepdims=True)


class NotFittedError(RuntimeError):
    """The classifier was used before ``fit``."""


@dataclass(frozen=True)
class LevelPrediction:
    name: str
    confidence: float


@dataclass
class ClassifyResult:
    query: str
    category: str = UNKNOWN
    levels: list[LevelPrediction] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"query": self.query, "error": self.error}
        return {
            "query": self.query,
            "category": self.category,
            "levels": [{"name": level.name, "confidence": round(float(level.confidence), 4)} for level in self.levels],
            "neighbours": list(self.neighbours),
        }


@dataclass(frozen=True)
class Prediction:
    """One query's answer in terms of category paths (no item ids)."""

    category: str
    levels: list[LevelPrediction]
    leaf: str  # the most probable leaf, even where the answer stops above it
    neighbours: np.ndarray  # support row positions, nearest first


class HierarchicalFewShotClassifier:
    """Fit on (deep features, category paths) of a catalog; predict a path with per-level confidence.

    Hyper-parameters:
      n_neighbours      k of the k-NN vote
      knn_min_support   leaves with at least this many items add the k-NN vote to their prototype
      linear_min_support leaves with at least this many items take the linear model's probability
      C                 inverse regularisation of the linear model
      level_threshold   stop at the deepest level whose confidence is at least this
      unknown_quantile  a query less similar to its nearest item than this quantile of the
                        items' similarities to their nearest item in another leaf is ``unknown``
    """

    def __init__(
        self,
        n_neighbours: int = 10,
        knn_min_support: int = 3,
        linear_min_support: int = 2,
        C: float = 10.0,
        level_threshold: float = 0.5,
        unknown_quantile: float = 0.01,
        max_linear_classes: int = 2000,
    ):
        self.n_neighbours = n_neighbours
        self.knn_min_support = knn_min_support
        self.linear_min_support = linear_min_support
        self.C = C
        self.level_threshold = level_threshold
        self.unknown_quantile = unknown_quantile
        self.max_linear_classes = max_linear_classes

    # --- fitting

    def _embed(self, features: np.ndarray) -> np.ndarray:
        return l2_normalise(l2_normalise(features) - self.mean_)

    def fit(self, features: np.ndarray, categories: Sequence[str]) -> HierarchicalFewShotClassifier:
        features = np.asarray(features, dtype=np.float32)
        if len(features) == 0:
            raise ValueError("cannot fit a classifier on an empty catalog")
        self.mean_ = l2_normalise(features).mean(axis=0)
        self.support_ = self._embed(features)
        self.leaves_, self.support_leaf_ = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)
        n_leaves = len(self.leaves_)
        self.counts_ = np.bincount(self.support_leaf_, minlength=n_leaves)
        sums = np.zeros((n_leaves, features.shape[1]), dtype=np.float32)
        np.add.at(sums, self.support_leaf_, self.support_)
        self.prototypes_ = l2_normalise(sums)
        self._fit_tree()
        self.temperature_ = self._fit_temperature(sums)
        self.unknown_similarity_ = self._fit_unknown_threshold()
        self._fit_linear()
        return self

    def _fit_tree(self) -> None:
        """Every prefix of every leaf path is a node; ``level_members_[d]`` maps leaves to depth-d nodes."""
        parts = [leaf.split("/") for leaf in self.leaves_]
        self.depth_ = max(len(p) for p in parts)
        self.level_nodes_: list[np.ndarray] = []
        self.level_members_: list[np.ndarray] = []  # per depth: leaf -> node position, -1 if the leaf is shallower
        self.level_parents_: list[np.ndarray] = []  # per depth: node -> parent node position (-1 at the top)
        previous: dict[str, int] = {}
        for depth in range(1, self.depth_ + 1):
            names = ["/".join(p[:depth]) if len(p) >= depth else "" for p in parts]
            nodes = np.unique([n for n in names if n])
            position = {name: i for i, name in enumerate(nodes)}
            self.level_nodes_.append(nodes)
            self.level_members_.append(np.array([position.get(n, -1) for n in names], dtype=np.int64))
            self.level_parents_.append(np.array([previous.get(n.rsplit("/", 1)[0], -1) for n in nodes], dtype=np.int64))
            previous = position

    def _fit_temperature(self, sums: np.ndarray) -> float:
        """Softmax temperature of the prototype scores, by leave-one-out likelihood on the support.

        Leaving the item out of its own prototype keeps the fit honest: with it, every item is
        close to its own class and the temperature comes out far too sharp.
        """
        usable = self.counts_[self.support_leaf_] >= 2
        if usable.sum() < 2 or len(self.leaves_) < 2:
            return 0.05
        rng = np.random.default_rng(0)
        rows = np.flatnonzero(usable)
        if len(rows) > 4000:
            rows = np.sort(rng.choice(rows, 4000, replace=False))
        x, own = self.support_[rows], self.support_leaf_[rows]
        scores = x @ self.prototypes_.T
        held_out = sums[own] - x
        scores[np.arange(len(rows)), own] = np.einsum("ij,ij->i", x, l2_normalise(held_out))
        best, best_nll = 0.05, np.inf
        for temperature in np.geomspace(0.005, 0.5, 40):
            probs = _softmax(scores / temperature)
            nll = -np.log(np.maximum(probs[np.arange(len(rows)), own], 1e-12)).mean()
            if nll < best_nll:
                best, best_nll = float(temperature), nll
        return best

    def _fit_unknown_threshold(self) -> float:
        """How similar items of *different* leaves still are; a query less similar than that to
        every item is far from the whole catalog. (Within-leaf similarity would be too strict: an
        item of a new leaf under a known parent must still classify at the parent.)"""
        if len(self.leaves_) < 2:
            return -1.0
        rows = np.arange(len(self.support_))
        if len(rows) > 2000:  # a quantile needs no more, and the full matrix would not fit
            rows = np.sort(np.random.default_rng(0).choice(rows, 2000, replace=False))
        sims = self.support_[rows] @ self.support_.T
        sims[self.support_leaf_[rows][:, None] == self.support_leaf_[None, :]] = -np.inf
        return float(np.quantile(sims.max(axis=1), self.unknown_quantile))

    def _fit_linear(self) -> None:
        self.linear_ = None
        self.linear_leaves_ = np.flatnonzero(self.counts_ >= self.linear_min_support)
        if len(self.linear_leaves_) < 2 or len(self.linear_leaves_) > self.max_linear_classes:
            self.linear_leaves_ = np.array([], dtype=np.int64)
            return
        from sklearn.linear_model import LogisticRegression

        rows = np.isin(self.support_leaf_, self.linear_leaves_)
        self.linear_ = LogisticRegression(C=self.C, max_iter=1000)
        self.linear_.fit(self.support_[rows], self.support_leaf_[rows])
        # predict_proba columns follow classes_, which are leaf positions in ascending order.
        self.linear_leaves_ = self.linear_.classes_.astype(np.int64)

    def _check_fitted(self) -> None:
        if not hasattr(self, "prototypes_"):
            raise NotFittedError("call fit() before predicting")

    # --- predicting

    def leaf_proba(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(leaf probabilities (n, leaves), nearest support rows (n, k), their similarities)."""
        self._check_fitted()
        queries = self._embed(np.asarray(features, dtype=np.float32))
        probs = _softmax((queries @ self.prototypes_.T) / self.temperature_)
        k = min(self.n_neighbours, len(self.support_))
        sims = queries @ self.support_.T
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        nearest_sims = np.take_along_axis(sims, nearest, axis=1)
        order = np.argsort(-nearest_sims, axis=1)
        nearest, nearest_sims = np.take_along_axis(nearest, order, axis=1), np.take_along_axis(nearest_sims, order, axis=1)

        knn_leaves = self.counts_ >= self.knn_min_support
        if knn_leaves.any() and k > 1:
            weights = _softmax(nearest_sims / self.temperature_)
            votes = np.zeros_like(probs)
            np.add.at(votes, (np.arange(len(queries))[:, None], self.support_leaf_[nearest]), weights)
            # Well-supported leaves average their prototype with the vote; the rest keep the prototype.
            probs[:, knn_leaves] = 0.5 * (probs[:, knn_leaves] + votes[:, knn_leaves])
            probs /= probs.sum(axis=1, keepdims=True)

        if self.linear_ is not None:
            # The linear model shares out the mass the other methods give its leaves as a group.
            group = probs[:, self.linear_leaves_].sum(axis=1, keepdims=True)
            probs[:, self.linear_leaves_] = group * self.linear_.predict_proba(queries)
        return probs, nearest, nearest_sims

    def level_proba(self, leaf_probs: np.ndarray) -> list[np.ndarray]:
        """Per depth, (n, nodes) probabilities: the sum of each node's leaves."""
        levels = []
        for nodes, members in zip(self.level_nodes_, self.level_members_, strict=True):
            out = np.zeros((len(leaf_probs), len(nodes)), dtype=np.float64)
            inside = members >= 0
            np.add.at(out.T, members[inside], leaf_probs[:, inside].T)
            levels.append(out)
        return levels

    def predict_paths(self, features: np.ndarray) -> list[Prediction]:
        probs, nearest, nearest_sims = self.leaf_proba(features)
        levels = self.level_proba(probs)
        predictions = []
        for row in range(len(probs)):
            leaf = str(self.leaves_[int(probs[row].argmax())])
            if nearest_sims[row, 0] < self.unknown_similarity_:
                predictions.append(Prediction(UNKNOWN, [], leaf, nearest[row]))
                continue
            chosen: list[LevelPrediction] = []
            parent = -1
            for depth, nodes in enumerate(self.level_nodes_):
                # Only children of the node chosen above: the path stays consistent top-down.
                candidates = np.flatnonzero(self.level_parents_[depth] == parent)
                if len(candidates) == 0:
                    break
                best = int(candidates[levels[depth][row, candidates].argmax()])
                confidence = float(levels[depth][row, best])
                if confidence < self.level_threshold:
                    break
                chosen.append(LevelPrediction(str(nodes[best]).rsplit("/", 1)[-1], confidence))
                parent = best
            category = "/".join(level.name for level in chosen) if chosen else UNKNOWN
            predictions.append(Prediction(category, chosen, leaf, nearest[row]))
        return predictions

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The most probable leaf path per row (no threshold): what accuracy is measured on."""
        probs, _, _ = self.leaf_proba(features)
        return self.leaves_[probs.argmax(axis=1)]


# --- on an index


@dataclass
class _Fitted:
    classifier: HierarchicalFewShotClassifier
    ids: list[str]


def _fit_on_index(index) -> _Fitted:
    from indexer.finetune import project

    dim = index.meta["dims"].get("deep")
    if dim is None:
        raise ValueError(f"{index.root}: this index has no deep features to classify with")
    keys, rows = index.store.vectors("deep", dim)
    records = index.store.items(keys.tolist())
    keep = np.array([int(key) in records for key in keys], dtype=bool)
    keys, rows = keys[keep], rows[keep]
    categories = [records[int(key)].category for key in keys]
    classifier = HierarchicalFewShotClassifier().fit(project(index, rows), categories)
    log.info("classifier fitted on %d items in %d leaf categories", len(keys), len(classifier.leaves_))
    return _Fitted(classifier, [records[int(key)].id for key in keys])


def fitted_classifier(index) -> tuple[HierarchicalFewShotClassifier, list[str]]:
    """The classifier of this index state (refitted after any write), and its support rows' ids."""
    fitted = index.cached("classifier", lambda: _fit_on_index(index))
    return fitted.classifier, fitted.ids


def classify(
    index,
    sources: Sequence[ImageSource | Image.Image],
    names: Sequence[str] | None = None,
    n_neighbours: int = 5,
) -> list[ClassifyResult]:
    """Classify query images into the index's category tree; unreadable ones get an error."""
    from indexer.finetune import project

    classifier, ids = fitted_classifier(index)
    results: list[ClassifyResult | None] = []
    images, positions = [], []
    for position, (name, image, error) in enumerate(decode_queries(sources, names, index.config.max_pixels)):
        if error is not None:
            results.append(ClassifyResult(query=name, error=error))
            continue
        results.append(ClassifyResult(query=name))
        images.append(image)
        positions.append(position)
    if images:
        features = project(index, index.deep_extractor().transform_images(images))
        for position, prediction in zip(positions, classifier.predict_paths(features), strict=True):
            result = results[position]
            result.category = prediction.category
            result.levels = prediction.levels
            result.neighbours = [ids[int(row)] for row in prediction.neighbours[:n_neighbours]]
    return results
