"""A query and its answer: the decoded photo with what was computed from it (shared between modes
and features), and the ranked hits with their confidences."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from weakref import WeakKeyDictionary

import numpy as np
from PIL import Image

from catalens.indexer.features import embed
from catalens.search.verification import Verification, Verifier

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.indexer.features.sift import LocalDescriptors
    from catalens.search.classify import FittedClassifier


T = TypeVar("T")


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    category: str
    title: str
    key: int = field(default=-1, repr=False)
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    # Calibrated P(this item shows the query's product), search/calibration/; None when uncalibrated.
    confidence: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "score": round(float(self.score), 6), "category": self.category, "title": self.title}
        if self.confidence is not None:
            out["confidence"] = round(float(self.confidence), 4)
        return out


@dataclass
class QueryResult:
    query: str
    results: list[SearchHit] | None = None
    error: str | None = None
    # The top result's id when its confidence reaches the match threshold; ``calibrated`` says
    # whether confidences were computed at all (a catalog too small to calibrate has none).
    match: str | None = None
    calibrated: bool = False
    # The confidence the top result needed to be the match (the mode's, or the settings'); 1.0 where
    # the calibration found no threshold right 95% of the time: the mode cannot judge its matches.
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"query": self.query, "error": self.error}
        out: dict[str, Any] = {"query": self.query}
        if self.calibrated:
            out["match"] = self.match
            if self.threshold is not None:
                out["threshold"] = round(float(self.threshold), 4)
        out["results"] = [hit.to_json() for hit in self.results or []]
        return out


@dataclass
class _Computed:
    """What a query computed against one catalog, by feature name."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    descriptors: dict[str, LocalDescriptors] = field(default_factory=dict)
    words: dict[str, np.ndarray] = field(default_factory=dict)
    words_read: dict[str, str] = field(default_factory=dict)
    verified: dict[str, dict[int, Verification]] = field(default_factory=dict)
    # By (id of the fitted classifier, leaf left out).
    leaf_probabilities: dict[tuple[int, str | None], dict[str, float]] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)  # ``Query.computed``


@dataclass
class Query:
    """A decoded query image and what was computed from it, each value once, shared between modes
    and features; ``text``: words typed with it, evidence in fused search.

    What is computed is kept per catalog: a feature's vector and words come from that catalog's
    fitted models (its own adapted network, its own vocabulary) and verification from its items,
    so a query ranked against two indexes must not carry one's results into the other."""

    image: Image.Image | None
    name: str
    text: str | None = None
    _computed: WeakKeyDictionary[Catalog, _Computed] = field(default_factory=WeakKeyDictionary, init=False,
                                                            repr=False, compare=False)

    def _against(self, catalog: Catalog) -> _Computed:
        return self._computed.setdefault(catalog, _Computed())

    def vector(self, catalog: Catalog, feature: str) -> np.ndarray:
        """The L2-normalised vector of the global ``feature``."""
        vectors = self._against(catalog).vectors
        if feature not in vectors:
            vectors[feature] = embed(catalog.feature(feature), [self.image])[0]
        return vectors[feature]

    def descriptors(self, catalog: Catalog, feature: str) -> LocalDescriptors:
        """The keypoints and descriptors of the local ``feature``."""
        descriptors = self._against(catalog).descriptors
        if feature not in descriptors:
            descriptors[feature] = catalog.feature(feature).preparer(self.image)
        return descriptors[feature]

    def words(self, catalog: Catalog, feature: str) -> np.ndarray:
        """The visual words of the local ``feature``'s descriptors."""
        words = self._against(catalog).words
        if feature not in words:
            words[feature] = catalog.feature(feature).quantise(self.descriptors(catalog, feature))
        return words[feature]

    def words_read(self, catalog: Catalog, feature: str) -> str:
        """The words the text ``feature`` reads on the photo."""
        read = self._against(catalog).words_read
        if feature not in read:
            read[feature] = catalog.feature(feature).preparer(self.image)
        return read[feature]

    def verified(self, catalog: Catalog, feature: str, keys: Sequence[int], verifier: Verifier) -> dict[int, Verification]:
        """Geometric verification of the items ``keys`` against the query by the local ``feature``,
        each pair once per query, by the first ``verifier`` that asks; an item without a row of
        ``feature`` verifies nothing."""
        done = self._against(catalog).verified.setdefault(feature, {})
        todo = [int(key) for key in keys if int(key) not in done]
        if todo:
            local = catalog.feature(feature)
            descriptors = self.descriptors(catalog, feature)
            stored = catalog.items.rows(feature, todo)
            found = [key for key in todo if stored.get(key) is not None]
            checks = verifier.verify_many(descriptors, [local.decode(stored[key]) for key in found])
            done.update(zip(found, checks, strict=True))
            done.update({key: Verification(0, 0) for key in todo if key not in done})
        return {int(key): done[int(key)] for key in keys}

    def verifications(self, catalog: Catalog, feature: str) -> Mapping[int, Verification]:
        """What ``verified`` has verified so far by ``feature``, by item key (verifies nothing)."""
        return self._against(catalog).verified.get(feature, {})

    def leaf_probabilities(self, catalog: Catalog, fitted: FittedClassifier,
                           absent_leaf: str | None = None) -> dict[str, float]:
        """The probability ``fitted`` gives each leaf category for this query
        (``FittedClassifier.leaf_probabilities``)."""
        memo = self._against(catalog).leaf_probabilities
        key = (id(fitted), absent_leaf)
        if key not in memo:
            memo[key] = fitted.leaf_probabilities({name: self.vector(catalog, name) for name in fitted.weights},
                                                  absent_leaf)
        return memo[key]

    def computed(self, catalog: Catalog, name: str, build: Callable[[], T]) -> T:
        """``build()`` once per catalog and ``name``: what a search module derives from this query
        (``search.retrieval.exemplar_cosines``'s product scores), shared by the calls that need it."""
        memo = self._against(catalog).other
        if name not in memo:
            memo[name] = build()
        return memo[name]

    def preset(self, catalog: Catalog, vectors: Mapping[str, np.ndarray],
               descriptors: Mapping[str, LocalDescriptors]) -> None:
        """Take ``vectors`` and ``descriptors`` as computed from the image against ``catalog`` (a
        catalog item's stored rows, asked as a query without decoding its photo)."""
        computed = self._against(catalog)
        computed.vectors.update(vectors)
        computed.descriptors.update(descriptors)
