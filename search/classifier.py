"""The few-shot hierarchical classifier: fitted on (features, category paths), it says where a new
item goes in the category tree, with a calibrated confidence per level.

A category with one item is described by its prototype (the mean of its centred, L2-normalised
features); with more items the prototype is averaged with a k-NN vote, and a linear model
shares out the probability of all leaves that have at least ``linear_min_support`` items. Level
probabilities are sums of leaf probabilities, so a leaf always implies its parents, and the
answer stops at the deepest level whose confidence clears a threshold. Outside evidence per leaf
(geometrically verified matches, ``verified_evidence``) raises a leaf's log-probability.

The model knows arrays and category paths only; ``search.classify`` binds it to a catalog (which
features, fitting on the catalog, storing and loading it, classifying photos).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catalens.indexer.estimator import Estimator
from catalens.indexer.features import l2_normalise
from catalens.search.settings import INLIER_CAP, MIN_INLIERS

UNKNOWN = "unknown"
# Most similarities held at once when comparing rows with every support row (~256 MB of float32).
_SIMILARITY_BUDGET = 1 << 26


def nearest_rows(rows: np.ndarray, k: int, queries: np.ndarray | None = None,
                 exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(positions (n, k) nearest first, cosine similarities) of each query row among ``rows``
    (L2-normalised both); with ``exclude_self`` the queries are ``rows`` and each leaves itself out.

    Query rows go a block at a time, each block's similarities at most ~64M floats: fitting on a
    100k-item catalog held out 20k rows, and their similarities at once took 6.4 GB and more."""
    queries = rows if queries is None else queries
    k = max(1, min(k, len(rows) - (1 if exclude_self else 0)))
    nearest = np.zeros((len(queries), k), np.int64)
    nearest_sims = np.zeros((len(queries), k), np.float32)
    block = max(1, _SIMILARITY_BUDGET // max(len(rows), 1))
    for start in range(0, len(queries), block):
        sims = queries[start : start + block] @ rows.T
        if exclude_self:
            sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1)
        nearest[start : start + block] = np.take_along_axis(top, order, axis=1)
        nearest_sims[start : start + block] = np.take_along_axis(top_sims, order, axis=1)
    return nearest, nearest_sims


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    return logits / logits.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class LevelPrediction:
    name: str
    confidence: float


@dataclass(frozen=True)
class Prediction:
    """One query's answer in terms of category paths (no item ids)."""

    category: str
    levels: list[LevelPrediction]
    leaf: str  # the most probable leaf, even where the answer stops above it
    neighbours: np.ndarray  # support row positions, nearest first


class HierarchicalFewShotClassifier(Estimator):
    """Fit on (deep features, category paths) of a catalog; predict a path with per-level confidence.

    Hyper-parameters:
      n_neighbours      k of the k-NN vote
      knn_min_support   leaves with at least this many items add the k-NN vote to their prototype
      linear_min_support leaves with at least this many items take the linear model's probability
      C                 inverse regularisation of the linear model
      level_threshold   stop at the deepest level whose (calibrated) confidence is at least this
      calibration_holdout share of leaves, and of the items of the others, held out of a second fit
                        whose answers calibrate each level's confidence (0: raw probabilities)
      near_duplicate    a held-out item's leaf-mates at least this similar (cosine of the
                        classifier's features) are left out of that second fit too
      unknown_quantile  a query less similar to its nearest item than this quantile of the
                        items' similarities to their nearest item in another leaf is ``unknown``
      evidence_weight   log-probability a leaf gains per unit of outside evidence (0-1 per leaf,
                        e.g. geometrically verified matches), passed to the predict methods
    """

    def __init__(
        self,
        n_neighbours: int = 10,
        knn_min_support: int = 3,
        linear_min_support: int = 2,
        C: float = 10.0,
        level_threshold: float = 0.9,
        unknown_quantile: float = 0.01,
        max_linear_classes: int = 2000,
        evidence_weight: float = 4.0,
        calibration_holdout: float = 0.2,
        near_duplicate: float = 0.8,
    ):
        self.n_neighbours = n_neighbours
        self.knn_min_support = knn_min_support
        self.linear_min_support = linear_min_support
        self.C = C
        self.level_threshold = level_threshold
        self.unknown_quantile = unknown_quantile
        self.max_linear_classes = max_linear_classes
        self.evidence_weight = evidence_weight
        self.calibration_holdout = calibration_holdout
        self.near_duplicate = near_duplicate

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
        self.level_calibration_ = self._fit_level_calibration(features, np.asarray(categories, dtype=object).astype(str))
        return self

    def _fit_level_calibration(self, features: np.ndarray, categories: np.ndarray) -> np.ndarray:
        """Per depth, (a, b, c) of P(right) = sigmoid(a * logit(p) + b * nearest similarity + c), p the
        level's raw probability (b is kept 0, see below): fitted
        on a second classifier's answers for items it never saw,
        whole leaves of them (the products a catalog does not hold) and single items of the rest.
        Identity (1, 0, 0) where there is too little to fit on.

        A single item's near-duplicates (shots of one session, ``near_duplicate``) leave the second
        fit with it: a classifier that still holds its twin answers it as surely as it never
        answers a shop's photo, and the confidences came out low for real queries (measured in
        docs/confidence.md, classification on the open set)."""
        identity = np.tile([1.0, 0.0, 0.0], (self.depth_, 1))
        if not self.calibration_holdout or len(self.leaves_) < 4 or len(features) < 20:
            return identity
        from sklearn.linear_model import LogisticRegression

        rng = np.random.default_rng(0)
        absent = rng.random(len(self.leaves_)) < self.calibration_holdout
        held = absent[self.support_leaf_].copy()
        unseen = held.copy()  # held out of the inner fit: the held items and their near-duplicates
        normalised = l2_normalise(features)
        for leaf in np.flatnonzero(~absent):
            members = np.flatnonzero(self.support_leaf_ == leaf)
            if len(members) >= 2:
                chosen = rng.choice(members, max(1, int(self.calibration_holdout * len(members))), replace=False)
                twins = members[(normalised[members] @ normalised[chosen].T).max(axis=1) >= self.near_duplicate]
                if len(np.union1d(twins, chosen)) < len(members):  # else the leaf would be absent, not present
                    held[chosen] = True
                    unseen[twins] = True
                    unseen[chosen] = True
        if held.all() or not held.any() or len(np.unique(categories[~unseen])) < 2:
            return identity
        inner = HierarchicalFewShotClassifier(**{**self.get_params(), "calibration_holdout": 0.0})
        inner.fit(features[~unseen], categories[~unseen])
        raw, sims = inner._raw_paths(features[held])
        truth = [category.split("/") for category in categories[held]]
        # Photos of absent leaves count as ``calibration_holdout`` of the answers, as a shop's share
        # of products it does not hold would, however many items those leaves happen to have.
        from_absent = absent[self.support_leaf_[held]]
        if (~from_absent).sum() < 10:  # one photo a leaf: nothing tells how right a present leaf's answer is
            return identity
        weight = np.where(from_absent, self.calibration_holdout / max(from_absent.sum(), 1),
                          (1 - self.calibration_holdout) / max((~from_absent).sum(), 1)) * len(from_absent)
        out = identity.copy()
        for depth in range(self.depth_):
            rows = [i for i, path in enumerate(raw) if len(path) > depth]
            if len(rows) < 10:
                continue
            right = np.array([raw[i][depth][0] == "/".join(truth[i][: depth + 1]) for i in rows])
            if right.all() or not right.any():
                continue
            # The raw probability alone: held-out catalog items are closer to the rest of the catalog
            # (shots of one session) than shop photos are, so a similarity term fitted here would
            # make every real query look doubtful.
            x = _logit(np.array([raw[i][depth][1] for i in rows]))[:, None]
            model = LogisticRegression(C=1.0, max_iter=1000).fit(x, right, sample_weight=weight[rows])
            if model.coef_[0][0] > 0:  # more probability never lowers the confidence
                out[depth] = [model.coef_[0][0], 0.0, model.intercept_[0]]
        return out

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
        # Kept as its coefficients (no scikit-learn object): a saved classifier then predicts
        # without importing scikit-learn, about a second of a command's start.
        self.linear_coef_ = np.zeros((0, self.support_.shape[1]), np.float32)
        self.linear_intercept_ = np.zeros(0, np.float32)
        self.linear_leaves_ = np.flatnonzero(self.counts_ >= self.linear_min_support)
        if len(self.linear_leaves_) < 2 or len(self.linear_leaves_) > self.max_linear_classes:
            self.linear_leaves_ = np.array([], dtype=np.int64)
            return
        from sklearn.linear_model import LogisticRegression

        rows = np.isin(self.support_leaf_, self.linear_leaves_)
        model = LogisticRegression(C=self.C, max_iter=1000).fit(self.support_[rows], self.support_leaf_[rows])
        # Probability columns follow classes_, which are leaf positions in ascending order.
        self.linear_leaves_ = model.classes_.astype(np.int64)
        self.linear_coef_ = model.coef_.astype(np.float32)
        self.linear_intercept_ = model.intercept_.astype(np.float32)

    def _linear_proba(self, queries: np.ndarray) -> np.ndarray:
        """scikit-learn's ``predict_proba`` of the fitted linear model: a sigmoid for two classes
        (one row of coefficients), else the softmax of the multinomial model."""
        logits = queries @ self.linear_coef_.T + self.linear_intercept_
        if self.linear_coef_.shape[0] == 1:
            positive = _sigmoid(logits[:, 0].astype(np.float64))
            return np.stack([1.0 - positive, positive], axis=1)
        return _softmax(logits.astype(np.float64))

    # --- persistence: what was learned, without the support rows (the catalog's own rows, which
    # whoever loads the model reads from the catalog and hands to ``attach_support``)

    _SAVED = ("mean_", "leaves_", "support_leaf_", "counts_", "prototypes_", "temperature_", "unknown_similarity_",
              "linear_leaves_", "linear_coef_", "linear_intercept_", "level_calibration_", "fitted_on_",
              "support_keys_")

    def _state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._SAVED if hasattr(self, name)}

    def _restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self.leaves_ = np.asarray(self.leaves_, dtype=str)
        self.temperature_, self.unknown_similarity_ = float(self.temperature_), float(self.unknown_similarity_)
        self._fit_tree()

    def attach_support(self, features: np.ndarray) -> HierarchicalFewShotClassifier:
        """The support rows of a loaded model: the features it was fitted on, in the same order."""
        features = np.asarray(features, dtype=np.float32)
        if len(features) != len(self.support_leaf_):
            raise ValueError(f"{len(features)} support rows for a classifier fitted on {len(self.support_leaf_)}")
        self.support_ = self._embed(features)
        return self

    # --- predicting

    def nearest_support(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(support row positions (n, k) nearest first, their similarities) in the classifier's space."""
        self.check_is_fitted()
        return self._nearest(self._embed(np.asarray(features, dtype=np.float32)), k)

    def _nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return nearest_rows(self.support_, k, queries)

    def leaf_proba(self, features: np.ndarray, evidence: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(leaf probabilities (n, leaves), nearest support rows (n, k), their similarities).

        ``evidence`` (n, leaves) in [0, 1], if given, multiplies each leaf's probability by
        ``exp(evidence_weight * evidence)`` before renormalising.
        """
        self.check_is_fitted()
        queries = self._embed(np.asarray(features, dtype=np.float32))
        probs = _softmax((queries @ self.prototypes_.T) / self.temperature_)
        k = min(self.n_neighbours, len(self.support_))
        nearest, nearest_sims = self._nearest(queries, k)

        knn_leaves = self.counts_ >= self.knn_min_support
        if knn_leaves.any() and k > 1:
            weights = _softmax(nearest_sims / self.temperature_)
            votes = np.zeros_like(probs)
            np.add.at(votes, (np.arange(len(queries))[:, None], self.support_leaf_[nearest]), weights)
            # Well-supported leaves average their prototype with the vote; the rest keep the prototype.
            probs[:, knn_leaves] = 0.5 * (probs[:, knn_leaves] + votes[:, knn_leaves])
            probs /= probs.sum(axis=1, keepdims=True)

        if len(self.linear_leaves_):
            # The linear model shares out the mass the other methods give its leaves as a group.
            group = probs[:, self.linear_leaves_].sum(axis=1, keepdims=True)
            probs[:, self.linear_leaves_] = group * self._linear_proba(queries)
        if evidence is not None and self.evidence_weight:
            probs = probs * np.exp(self.evidence_weight * np.asarray(evidence, dtype=np.float64))
            probs /= probs.sum(axis=1, keepdims=True)
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

    def _raw_paths(self, features: np.ndarray | None, evidence: np.ndarray | None = None,
                   computed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                   leaves: np.ndarray | None = None) -> tuple[list[list[tuple[str, float]]], np.ndarray]:
        """(per row, the best guess at every depth as (node path, raw probability), nearest similarity);
        ``computed`` is ``leaf_proba``'s answer where the caller has it; ``leaves``, a leaf index
        per row, asks for those leaves' paths instead.

        The best guess is the most probable leaf and its ancestors: the leaf is what accuracy is
        measured on, and a parent with more than half the probability is its parent anyway."""
        probs, _, nearest_sims = computed if computed is not None else self.leaf_proba(features, evidence)
        levels = self.level_proba(probs)
        paths = []
        for row, leaf in enumerate(probs.argmax(axis=1) if leaves is None else leaves):
            path: list[tuple[str, float]] = []
            for depth, (nodes, members) in enumerate(zip(self.level_nodes_, self.level_members_, strict=True)):
                node = int(members[leaf])
                if node < 0:
                    break
                path.append((str(nodes[node]), float(levels[depth][row, node])))
            paths.append(path)
        return paths, nearest_sims[:, 0]

    def predict_paths(self, features: np.ndarray, evidence: np.ndarray | None = None) -> list[Prediction]:
        """Per row: the best guess at every level down to the leaf with its calibrated confidence, and
        the category: the deepest level whose confidence reaches ``level_threshold`` (``unknown`` where
        not even the top level does, or where the query is farther from every item than items of
        different leaves are from each other)."""
        probs, nearest, nearest_sims = self.leaf_proba(features, evidence)
        raw, sims = self._raw_paths(features, computed=(probs, nearest, nearest_sims))
        predictions = []
        for row, path in enumerate(raw):
            leaf = str(self.leaves_[int(probs[row].argmax())])
            levels = [LevelPrediction(node.rsplit("/", 1)[-1], confidence)
                      for (node, _), confidence in zip(path, self._calibrated(path, sims[row]), strict=True)]
            confident = [level for level in levels if level.confidence >= self.level_threshold]
            far = nearest_sims[row, 0] < self.unknown_similarity_
            category = "/".join(level.name for level in confident) if confident and not far else UNKNOWN
            predictions.append(Prediction(category, levels, leaf, nearest[row]))
        return predictions

    def _calibrated(self, path: list[tuple[str, float]], similarity: float) -> list[float]:
        """The calibrated confidence of each level of ``path`` ((node, raw probability), top first)."""
        out, ceiling = [], 1.0
        for depth, (_, p) in enumerate(path):
            a, b, c = self.level_calibration_[depth]
            # A level is never surer than the one above it: a leaf implies its parents.
            ceiling = min(ceiling, float(_sigmoid(a * _logit(np.array([p]))[0] + b * similarity + c)))
            out.append(ceiling)
        return out

    def leaf_confidence(self, computed: tuple[np.ndarray, np.ndarray, np.ndarray], leaves: Sequence[int]) -> np.ndarray:
        """The calibrated confidence that row i shows the leaf ``leaves[i]`` (an index into
        ``leaves_``), from ``leaf_proba``'s answer: what ``levels`` gives that leaf in ``classify``."""
        paths, sims = self._raw_paths(None, computed=computed, leaves=np.asarray(leaves, np.int64))
        return np.array([self._calibrated(path, sim)[-1] if path else 0.0 for path, sim in zip(paths, sims, strict=True)])

    def predict(self, features: np.ndarray, evidence: np.ndarray | None = None) -> np.ndarray:
        """The most probable leaf path per row (no threshold): what accuracy is measured on."""
        probs, _, _ = self.leaf_proba(features, evidence)
        return self.leaves_[probs.argmax(axis=1)]


# --- features and evidence


def weighted_features(rows: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """What the classifier fits on: each feature's rows L2-normalised, times its weight, side by side."""
    return np.hstack([weights[name] * l2_normalise(rows[name]) for name in weights]).astype(np.float32)


@dataclass
class EvidenceConfig:
    """Geometric verification for classification."""

    # Verifying ~1 ms a pair: the nearest 20 support items hold the right leaf for most queries.
    verify_top: int = 20
    min_inliers: int = MIN_INLIERS
    inlier_cap: int = INLIER_CAP


def verified_evidence(
    classifier: HierarchicalFewShotClassifier,
    features: np.ndarray,
    verify_pair: Callable[[int, int], int],
    config: EvidenceConfig | None = None,
    nearest: np.ndarray | None = None,
) -> np.ndarray:
    """(n, leaves) evidence in [0, 1]: each leaf's best verified match among the nearest support items.

    ``verify_pair(query_row, support_row)`` returns the inliers of that pair; below
    ``min_inliers`` agreement is chance and counts as nothing. ``nearest`` (support rows per
    query, nearest first) saves the search where the caller already made it.
    """
    config = config or EvidenceConfig()
    evidence = np.zeros((len(features), len(classifier.leaves_)), dtype=np.float64)
    if nearest is None:
        nearest, _ = classifier.nearest_support(features, config.verify_top)
    for row, support_rows in enumerate(nearest):
        for support_row in support_rows:
            inliers = verify_pair(row, int(support_row))
            if inliers >= config.min_inliers:
                leaf = classifier.support_leaf_[int(support_row)]
                evidence[row, leaf] = max(evidence[row, leaf], min(inliers, config.inlier_cap) / config.inlier_cap)
    return evidence
