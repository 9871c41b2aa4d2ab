"""A query and its answer: the decoded photo with what was computed from it (shared between modes
and features), and the ranked hits with their confidences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from PIL import Image

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    category: str
    title: str
    key: int = field(default=-1, repr=False)
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    # Calibrated P(this item shows the query's product), search/calibration.py; None when uncalibrated.
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
class Query:
    """A decoded query image and what was computed from it (shared between modes and features);
    ``text``: words typed with it, evidence in fused search."""

    image: Image.Image | None
    name: str
    # Per catalog: a feature's vector and words come from that catalog's fitted models (its own
    # adapted network, its own vocabulary) and verification from its items, so a query ranked
    # against two indexes must not carry one's results into the other.
    cache: WeakKeyDictionary = field(default_factory=WeakKeyDictionary)

    text: str | None = None

    def computed(self, catalog: Catalog) -> dict[str, Any]:
        """What was computed from this image against ``catalog``."""
        return self.cache.setdefault(catalog, {})
