"""What an audit is asked (``AuditSettings``) and what it gives: one ``Finding`` per suspicious
item, gathered in an ``AuditReport``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROBLEMS = ("mislabelled", "duplicate", "not-a-product")


@dataclass
class Finding:
    """One suspicious item: what is wrong, what it should be, how sure, and why."""

    id: str
    category: str
    problem: str
    suggested: str | None
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "problem": self.problem, "suggested": self.suggested,
                "score": round(float(self.score), 4), "evidence": self.evidence}


@dataclass
class AuditSettings:
    """How suspicious an item must be, and how much evidence is gathered."""

    n_neighbours: int = 10  # the k-NN vote and the neighbours shown
    shortlist: int = 50  # neighbours kept per item and feature
    # The share of misfiled items the scores assume before any evidence (the base rate of the
    # calibrated probability): catalogs that have been looked after hold a few percent.
    prior: float = 0.03
    min_score: float = 0.5  # findings below this probability are not listed
    passes: int = 2  # later passes read the neighbours' categories as the earlier pass corrected them
    # Two rows this close in every feature are one image (re-encoded at most); flagged whatever their categories.
    exact_similarity: float = 0.999
    # With colour this close and the keypoints verified (below), no two photos of the grocery
    # catalog's different products reach it (measured), so such a pair under two different
    # categories is one photo filed twice (resized, cropped, re-encoded).
    near_similarity: float = 0.85
    near_colour_similarity: float = 0.97
    # A near pair is one image only where its stored keypoints verify this many matches: copies keep
    # 70-340 on grocery, blank, noise or generated pictures alike in the global rows 0-19.
    copy_min_inliers: int = 30
    # The misfiled suspects whose score is fitted again with verified local matches against their
    # filed and suggested leaves (``per_leaf`` items of each, ~1 ms a pair); 0 turns it off.
    verify_shortlist: int = 400
    verify_per_leaf: int = 3
    placeholder_prior: float = 0.01
    seed: int = 0


@dataclass
class AuditReport:
    findings: list[Finding]
    items: int
    seconds: float
    dismissed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "seconds": round(self.seconds, 3), "dismissed": self.dismissed,
                "findings": [finding.to_json() for finding in self.findings]}
