"""The HTTP API's request and response bodies: the OpenAPI page is generated from these."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Hit(BaseModel):
    id: str
    score: float
    confidence: float | None = Field(None, description="calibrated probability that this item shows the photo's "
                                                       "product (absent where the index cannot be calibrated)")
    category: str
    title: str
    image_url: str = Field(description="where to fetch the item's catalog image")


class SearchResponse(BaseModel):
    query: str
    mode: str
    k: int
    category: str | None = None
    match: str | None = Field(None, description="the top result's id when its confidence reaches the index's match "
                                                "threshold, else null: no confident match")
    threshold: float | None = Field(None, description="the confidence the top result needed to be the match (this "
                                                      "mode's); 1.0: the mode cannot judge its matches on this catalog")
    results: list[Hit]
    seconds: float


class Detection(BaseModel):
    id: str
    score: float
    category: str
    title: str
    box: list[int] = Field(description="x0, y0, x1, y1 in the uploaded photo's pixels")
    confidence: float | None = Field(None, description="calibrated probability that the box shows this item's category")
    image_url: str = Field(description="where to fetch the item's catalog image")


class LocateResponse(BaseModel):
    query: str
    detections: list[Detection]
    seconds: float


class Level(BaseModel):
    name: str
    confidence: float


class ClassifyResponse(BaseModel):
    query: str
    category: str = Field(description="the deepest confident category path, or 'unknown'")
    levels: list[Level]
    neighbours: list[str] = Field(description="ids of the nearest catalog items")
    guess: str | None = Field(None, description="the best guess at the leaf: the path of levels, sure or not")
    sure_depth: int | None = Field(None, description="how many levels of guess are sure (0: unknown)")
    sure_at: float | None = Field(None, description="the confidence a level needs to be sure")


class AnomalyResponse(BaseModel):
    query: str
    score: float
    threshold: float
    anomalous: bool


class Item(BaseModel):
    id: str
    category: str
    title: str
    attributes: dict[str, Any]
    image_url: str


class WriteResponse(BaseModel):
    status: str = Field(description="added | updated | metadata_updated | unchanged")
    item: Item


class DeleteResponse(BaseModel):
    removed: str


class Features(BaseModel):
    classify: bool
    anomaly: bool
    explain: bool


class FittedModel(BaseModel):
    present: bool = Field(description="a fit exists (searches use it, stale or not)")
    fresh: bool
    stale: bool = Field(description="present but fitted on an older state of the catalog; a refit is due")
    stored: bool = Field(description="read from or written to the index's models folder (else held in memory)")
    reason: str | None = Field(None, description="why it is stale or missing")
    fitted: float | None = Field(None, description="when it was fitted (epoch seconds)")
    refitting: bool = Field(description="a refit is running now")


class Stats(BaseModel):
    items: int
    categories: int
    failures: int
    backbone: str
    dims: dict[str, int]
    faiss_factory: str | None = Field(None, description="the FAISS index type built (folder indexes)")
    faiss_configured: str | None = Field(
        None, description="the configured type, where the catalog is still too small to train it")
    size_bytes: int | None = None
    modes: list[str] = Field(description="the search modes this index can answer now")
    default_mode: str
    features: Features
    read_only: bool
    top_categories: dict[str, int]
    fitted: dict[str, FittedModel] = Field(
        default_factory=dict, description="what search fits on the whole catalog (classifier, match calibration): "
                                          "present, fresh or stale, and why")


class Health(BaseModel):
    status: str
    items: int


class Problem(BaseModel):
    detail: str


class AuditFinding(BaseModel):
    id: str
    category: str
    problem: str = Field(description="mislabelled, duplicate or not-a-product")
    suggested: str | None = Field(None, description="mislabelled: the category the item looks like")
    score: float = Field(description="calibrated probability that the finding is real")
    evidence: dict[str, Any] = Field(default_factory=dict, description="neighbours, the level that differs, ids...")
    image_url: str


class AuditResponse(BaseModel):
    items: int
    seconds: float
    dismissed: int = Field(description="findings hidden because a person dismissed them")
    findings: list[AuditFinding]


class DismissResponse(BaseModel):
    dismissed: str
