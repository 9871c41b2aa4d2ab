"""What ``locate`` answers: a detection per product instance, a result per photo, and the
candidate a detection is before its catalog record is looked up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Detection:
    id: str
    score: float
    category: str
    title: str
    box: Box
    evidence: str = "local"  # "local" (verified keypoints) or "region" (window similarity)
    key: int = field(default=-1, repr=False)
    # The calibrated probability that the box shows this item's category (what ``classify`` gives
    # that leaf for the box's crop); None where the catalog has no classifier or ``classify`` is off.
    confidence: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "score": round(float(self.score), 6), "category": self.category, "title": self.title,
               "box": [int(v) for v in self.box]}
        if self.confidence is not None:
            out["confidence"] = round(float(self.confidence), 4)
        return out


@dataclass
class LocateResult:
    query: str
    detections: list[Detection] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"query": self.query, "error": self.error}
        return {"query": self.query, "detections": [d.to_json() for d in self.detections or []]}


@dataclass(frozen=True)
class _Candidate:
    """One detection before the catalog record is looked up."""

    key: int
    score: float
    box: tuple[float, float, float, float]
    evidence: str
    confidence: float | None = None
    # A verified box's inlier keypoints' extent: where the product surely is.
    core: tuple[float, float, float, float] | None = None
