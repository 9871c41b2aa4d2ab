"""How searches run: one typed object, separate from how the index was built.

``SearchSettings`` never freezes into the index: defaults here, then the ``[search]`` table of
the configuration file, then ``CATALENS_SEARCH_<FIELD>`` variables, then what a request or a
command line gives. The HTTP API takes per-request overrides of the fields that make sense per
request (``k``, ``mode``, ``weights``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalens.indexer.config import load_layered

# Geometric verification is worth the same wherever it runs (search, classification, locate):
# fewer inliers than MIN_INLIERS is chance agreement (non-matching grocery pairs give 4-7),
# INLIER_CAP or more count as certain (evidence min(inliers, cap) / cap), and descriptor matches
# pass Lowe's ratio test at RATIO.
MIN_INLIERS, INLIER_CAP, RATIO = 8, 30, 0.8

# A weight multiplies a feature's similarity (about 0-1) in a sum; far beyond the defaults (0.2-1),
# and below what would let one feature's rounding error outweigh another's whole score.
MAX_WEIGHT = 1000.0


class SearchSettings(BaseModel):
    """Query-time settings; every default was measured on the grocery val split (bench_retrieval)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: str | None = Field(None, description="fused (default), local, or the name of a global feature (deep, colour, ...)")
    k: int = Field(10, ge=1, le=1000, description="results per query")
    # Weight of each feature in fused search; None takes each registered feature's default: a
    # verified label match overrides a few hundredths of cosine, and colour separates apple
    # varieties and pepper colours (measured in docs/search-quality.md).
    weights: dict[str, float] | None = None
    # Weight of words typed with a photo (search --text with a photo): the best text match of
    # the words adds this much to the fused score, others in proportion to their BM25.
    text_weight: float = Field(0.5, ge=0, le=MAX_WEIGHT, description="weight of words typed with a photo")
    # How many candidates each global feature's kNN and each local feature's words contribute.
    candidates: int = Field(40, ge=1)
    word_candidates: int = Field(40, ge=1)
    # How many of each candidate list are verified in fused search (~1 ms a candidate)...
    verify_top: int = Field(20, ge=0)
    # ...and of the bag-of-words list in local search.
    local_verify_top: int = Field(40, ge=0)
    # Local (logo) mode of a catalog with a text feature: weight of the words read on the query.
    local_text_weight: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    # What verified inliers are worth: nothing below min_inliers, certain from inlier_cap (above).
    min_inliers: int = Field(MIN_INLIERS, ge=1)
    inlier_cap: int = Field(INLIER_CAP, ge=1)
    geometry: Literal["similarity", "affine", "homography"] = "similarity"
    # Product-level ranking in fused search (search/products.py): an item scores its own score plus
    # this weight times its product's best product_votes - 1 other candidates; collapse shows each
    # product once (product_weight measured in docs/search-quality.md).
    product_weight: float = Field(0.1, ge=0)
    product_votes: int = Field(5, ge=1)
    collapse: bool = Field(False, description="one result per product (its best item)")
    ratio: float = Field(RATIO, gt=0, le=1, description="Lowe's ratio test for descriptor matches")
    # Queries of one batch (search --from-file) answered side by side (benchmarks/bench_speed.py).
    query_threads: int = Field(2, ge=1, description="queries of a batch answered at once")
    # Calibrated confidence (search/calibration/): a result's probability of showing the query's
    # product, and "match" when the top one reaches the threshold. None takes the index's own
    # threshold per mode, fitted for 95% precision on held-out catalog queries.
    confidence: bool = Field(True, description="give each result a calibrated confidence and each query a match")
    match_threshold: float | None = Field(None, ge=0, le=1, description="confidence a top result needs to be the match")

    @field_validator("weights")
    @classmethod
    def _weights_rank_something(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        """NaN or infinite weights make every score null, negative ones invert the ranking, and all-zero
        ones leave nothing to rank by: each is refused here, for config files, variables and requests."""
        if weights is None:
            return None
        for name, weight in weights.items():
            if not math.isfinite(weight) or not 0 <= weight <= MAX_WEIGHT:
                raise ValueError(f"the weight of {name!r} must be a number from 0 to {MAX_WEIGHT:g}, not {weight}")
        if not any(weights.values()):
            raise ValueError("at least one weight must be above 0 (with none, nothing is ranked)")
        return weights

    def merged(self, **overrides: Any) -> SearchSettings:
        """These settings with ``overrides`` (None values ignored), validated."""
        given = {key: value for key, value in overrides.items() if value is not None}
        return SearchSettings(**{**self.model_dump(), **given}) if given else self


def load_search_settings(path: str | Path | None = None, **overrides: Any) -> SearchSettings:
    """Defaults, then ``path`` (or ``$CATALENS_CONFIG``) table ``[search]``, then ``CATALENS_SEARCH_<FIELD>``, then overrides."""
    return load_layered(SearchSettings, "search", "CATALENS_SEARCH_", path, **overrides)
