"""Verified local matches as misfiled evidence, read from the stored keypoints (no pass over the
images): a photo shares its printed label, and from one shooting session the very scene, with its
own product's other photos, so a misfiled photo verifies against the leaf it looks like and not the
one it is filed under. A studio packshot that the global rows place among other packshots (the
most frequent false finding without this) still verifies against its own pack's shop photos where
the pack has a label, and matches nothing either way where it has none (a fruit), which tells the
score nothing in place of something wrong.

The matches cost ~1 ms a pair, so only the shortlist the global evidence already suspects is
verified, and the score is fitted again on that shortlist: the items as filed against the same
items planted under another leaf, as the first score was."""

from __future__ import annotations

from typing import Any

import numpy as np

from catalens.search.audit.scoring import EvidenceModel
from catalens.search.verification import Verifier

# What the refit reads beside the first fit's log-odds and columns: ``LeafMatches.inliers``, as log1p.
VERIFIED_EVIDENCE = ("log(1 + inliers with the filed leaf)", "log(1 + inliers with the suggested leaf)")


class LeafMatches:
    """The verified inliers between an item and a leaf: the most an item keeps against the leaf's
    ``per_leaf`` items nearest it in ``embedding`` (counted as search counts them: none below
    ``MIN_INLIERS``). On grocery, 3, 5 and 8 items a leaf ranked the audit's findings alike."""

    def __init__(self, catalog: Any, feature: str, keys: np.ndarray, embedding: np.ndarray, labels: np.ndarray,
                 per_leaf: int = 3, verifier: Verifier | None = None, doubt: np.ndarray | None = None):
        self.catalog, self.feature, self.keys = catalog, feature, keys
        # P(misfiled) of each item by the global evidence. Two photos of one scene filed under two
        # leaves verify against each other: the one more suspect is not asked to vouch for a leaf.
        self.doubt = doubt
        self.embedding, self.per_leaf = embedding, per_leaf
        self.verifier = verifier or Verifier()
        self.members = {int(leaf): np.flatnonzero(labels == leaf) for leaf in np.unique(labels)}
        self._descriptors: dict[int, Any] = {}

    @classmethod
    def of_catalog(cls, catalog: Any, keys: np.ndarray, embedding: np.ndarray, labels: np.ndarray,
                   per_leaf: int = 3, doubt: np.ndarray | None = None) -> LeafMatches | None:
        """None where the catalog keeps no local feature."""
        local = catalog.local_features()
        return cls(catalog, local[0], keys, embedding, labels, per_leaf, doubt=doubt) if local else None

    def _candidates(self, item: int, leaf: int, ceiling: float) -> np.ndarray:
        members = self.members.get(int(leaf), np.zeros(0, np.int64))
        members = members[members != item]
        if self.doubt is not None:
            members = members[self.doubt[members] <= ceiling]
        return members[np.argsort(-(self.embedding[members] @ self.embedding[item]))[:self.per_leaf]]

    def _load(self, positions: set[int]) -> None:
        missing = [p for p in positions if p not in self._descriptors]
        if not missing:
            return
        stored = self.catalog.stored_descriptors(self.feature, [int(self.keys[p]) for p in missing])
        for p in missing:
            self._descriptors[p] = stored.get(int(self.keys[p]))  # None: no keypoints (a blank picture)

    def best_inliers(self, items: np.ndarray, leaves: np.ndarray, ceilings: np.ndarray | None = None) -> np.ndarray:
        """Per (item, leaf) pair, the counted inliers of the item's best verified match in the leaf,
        among the leaf's members whose ``doubt`` is at most the pair's ceiling (all without one)."""
        ceilings = np.full(len(items), np.inf) if ceilings is None else np.asarray(ceilings, np.float64)
        plans = [self._candidates(int(i), int(leaf), float(c)) for i, leaf, c in zip(items, leaves, ceilings,
                                                                                         strict=True)]
        self._load({int(i) for i in items} | {int(j) for plan in plans for j in plan})
        out = np.zeros(len(plans), np.int64)
        for n, (i, plan) in enumerate(zip(items, plans, strict=True)):
            query = self._descriptors[int(i)]
            others = [self._descriptors[int(j)] for j in plan if self._descriptors[int(j)] is not None]
            if query is not None and others:
                out[n] = max(self.verifier.inliers(v) for v in self.verifier.verify_many(query, others))
        return out

    def inliers(self, items: np.ndarray, filed: np.ndarray, suggested: np.ndarray,
                ceilings: np.ndarray | None = None) -> np.ndarray:
        """(len(items), 2) counted inliers of each item with its ``filed`` leaf and the ``suggested``
        leaf it looks like (``VERIFIED_EVIDENCE`` is their log1p); ``ceilings`` as ``best_inliers``."""
        return np.stack([self.best_inliers(items, filed, ceilings), self.best_inliers(items, suggested, ceilings)],
                        axis=1)


def verified_rescore(matches: LeafMatches, model: EvidenceModel, filed: np.ndarray, planted: np.ndarray,
                     filed_leaf: np.ndarray, filed_suggested: np.ndarray, planted_leaf: np.ndarray,
                     planted_suggested: np.ndarray, shortlist: int, rng: np.random.Generator,
                     min_p: float = 0.01) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """P(misfiled) per item: ``model``'s on the evidence ``filed``, fitted again with verified matches for
    the ``shortlist`` items it suspects most (P >= ``min_p``), on as many of the ``planted`` rows it
    suspects as much. The refit reads the first fit's log-odds, its columns and ``VERIFIED_EVIDENCE``
    (the first fit's columns weigh differently among suspects than over the whole catalog: measured,
    precision@K +0.7 points a seed against the log-odds alone).

    The refit's base rate is the first fit's mean over the shortlist: the matches move probability
    between the suspects, not onto the catalog as a whole.
    -> (P per item, {rescored position: (inliers with the filed leaf, with the suggested one)})."""
    logit_filed, logit_planted = model.decision_function(filed), model.decision_function(planted)
    p, p_planted = model.predict_proba(filed), model.predict_proba(planted)
    suspects = np.argsort(-p, kind="stable")[:shortlist]
    suspects = suspects[p[suspects] >= min_p]
    positives = np.flatnonzero(logit_planted >= (np.log(min_p / (1 - min_p)) if min_p > 0 else -np.inf))
    if len(positives) > shortlist:
        positives = rng.choice(positives, shortlist, replace=False)
    if len(suspects) < 5 or len(positives) < 5:
        return p, {}
    # Each row is verified only against members no more suspect than itself (``LeafMatches.doubt``).
    counts = matches.inliers(suspects, filed_leaf[suspects], filed_suggested[suspects], p[suspects])
    x_filed = np.column_stack([logit_filed[suspects], filed[suspects], np.log1p(counts)])
    x_planted = np.column_stack([logit_planted[positives], planted[positives], np.log1p(
        matches.inliers(positives, planted_leaf[positives], planted_suggested[positives], p_planted[positives]))])
    refit = EvidenceModel(prior=float(np.clip(p[suspects].mean(), 1e-3, 0.5))).fit(
        np.vstack([x_filed, x_planted]), np.r_[np.zeros(len(suspects), bool), np.ones(len(positives), bool)])
    out = p.copy()
    out[suspects] = refit.predict_proba(x_filed)
    return out, {int(i): (int(a), int(b)) for i, (a, b) in zip(suspects, counts, strict=True)}
