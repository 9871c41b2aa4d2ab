"""Search by photo: each query image to the best-matching catalog items, in one of several modes.

The modes of a catalog are ``fused`` (every feature with a weight, in one ranking), ``local``
(the local features alone) and one per global feature (its cosine k nearest neighbours) or
text feature (the words read on the photo), so a feature added to the index is searchable by
its name at once. Typed words search alone (``text`` without a photo) or join a photo's fused
ranking as one more evidence. The engine decodes queries,
applies the category filter and turns item keys into results; ``search.retrieval`` and
``search.fusion`` rank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
from PIL import Image

from catalens.indexer.catalog import Catalog
from catalens.indexer.features import feature_spec, feature_weights
from catalens.indexer.imageio import ImageSource, decode_queries
from catalens.indexer.stores import ItemFilter
from catalens.search.calibration import DEPTH as CALIBRATION_DEPTH
from catalens.search.calibration import MatchCalibrator, annotate, match_calibration
from catalens.search.products import rank_products
from catalens.search.settings import SearchSettings

log = logging.getLogger(__name__)

FUSED, LOCAL = "fused", "local"


class ModeUnavailableError(ValueError):
    """A mode this catalog cannot answer (unknown, or its feature not built yet): the message says which exist."""


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


def available_modes(catalog: Catalog) -> list[str]:
    """The modes this catalog can answer now, ``fused`` first."""
    globals_ = catalog.global_features()
    locals_ = catalog.local_features()
    texts = catalog.text_features()
    modes = [FUSED] if globals_ or locals_ or texts else []
    if locals_:
        modes.append(LOCAL)
    return modes + [name for name in (*globals_, *locals_, *texts) if name not in modes]


class SearchEngine:
    """Answers queries against one open catalog with ``settings`` (defaults: ``SearchSettings()``)."""

    def __init__(self, catalog: Catalog, settings: SearchSettings | None = None):
        self.catalog = catalog
        self.settings = settings or SearchSettings()

    def modes(self) -> list[str]:
        return available_modes(self.catalog)

    def check_mode(self, mode: str | None) -> str:
        """``mode`` (default ``fused``) if this catalog can answer it, else ``ModeUnavailableError``."""
        mode = mode or FUSED
        modes = self.modes()
        if mode in modes:
            return mode
        reason = "unknown mode"
        try:
            spec = feature_spec(mode)
            if spec.fitted_by:
                reason = f"this index has no {mode!r} feature yet (run '{spec.fitted_by}' first)"
            else:
                reason = f"this index was built without the {mode!r} feature"
        except KeyError:
            pass
        raise ModeUnavailableError(f"--mode {mode}: {reason}; this index answers: {', '.join(modes)}")

    def weights(self, settings: SearchSettings | None = None) -> dict[str, float]:
        """The fused-search weight of each feature this catalog holds (settings override the defaults)."""
        present = [feature_spec(name) for name in (*self.catalog.global_features(), *self.catalog.local_features(),
                                                   *self.catalog.text_features())]
        return feature_weights(present, "search", (settings or self.settings).weights)

    def item_filter(self, category: str | None) -> ItemFilter | None:
        return self.catalog.items.category_filter(category) if category else None

    def search(
        self,
        sources: Sequence[ImageSource | Image.Image],
        k: int | None = None,
        mode: str | None = None,
        category: str | None = None,
        names: Sequence[str] | None = None,
        settings: SearchSettings | None = None,
        text: str | None = None,
    ) -> list[QueryResult]:
        """One result per source, in order; an unreadable source gives a result with ``error``.

        ``text``: words to search for, alone (no sources: one result, ranked by text) or with
        each photo (fused mode: the words are one more evidence)."""
        settings = (settings or self.settings).merged(k=k, mode=mode)
        text = text.strip() if text and text.strip() else None
        sources = list(sources)
        if text is not None and not sources:
            return [self.search_text(text, settings.k, category)]
        mode = self.check_mode(settings.mode)
        if text is not None and mode != FUSED:
            raise ModeUnavailableError(f"--mode {mode}: words with a photo are one more evidence in fused search; "
                                       "leave the mode out, or search the words alone")
        filter = self.item_filter(category)
        # Read once, before the queries run side by side.
        calibrator = self.calibrator() if settings.confidence else None

        def answer(position: int) -> QueryResult:
            [(name, image, error)] = decode_queries([sources[position]], [names[position]] if names else None,
                                                    self.catalog.config.max_pixels)
            if error is not None:
                return QueryResult(query=name, error=error)
            if filter is not None and filter.empty:
                return QueryResult(query=name, results=[], calibrated=calibrator is not None)
            query = Query(image, name, text=text)
            calibrated = calibrator is not None and mode in calibrator.modes()
            # The confidences read the query's top CALIBRATION_DEPTH results: one ranking deep
            # enough serves both (the candidates are the same, so its head is the top k).
            depth = max(settings.k, CALIBRATION_DEPTH) if calibrated else settings.k
            keys, scores = self.rank_products(query, mode, depth, filter, settings)
            result = QueryResult(query=name, results=self.hits(keys[: settings.k], scores[: settings.k]))
            if calibrated:
                reference = None if settings.collapse else (keys[:CALIBRATION_DEPTH], scores[:CALIBRATION_DEPTH])
                annotate(self, query, mode, filter, settings, result, calibrator, reference)
            return result

        if len(sources) == 1 or settings.query_threads <= 1:
            return [answer(position) for position in range(len(sources))]
        # Queries side by side: one query's decoding, keypoints and matching (which release the
        # GIL) overlap another's network pass, so a batch keeps both cores busy. Results keep
        # the sources' order; at most query_threads images are decoded at once.
        with ThreadPoolExecutor(settings.query_threads, thread_name_prefix="catalens-query") as pool:
            return list(pool.map(answer, range(len(sources))))

    def search_text(self, text: str, k: int, category: str | None = None) -> QueryResult:
        """Items whose words best match ``text`` (BM25, typos allowed), best first; no confidences."""
        from catalens.search.text import text_search

        filter = self.item_filter(category)
        keys, scores = text_search(self, text, k, filter) if filter is None or not filter.empty else ([], [])
        return QueryResult(query=text, results=self.hits(np.asarray(keys, np.int64), np.asarray(scores, np.float32)))

    def calibrator(self) -> MatchCalibrator | None:
        """The catalog's last fitted match calibrator, fresh or stale (never fitted here), or None where
        none was ever fitted: results then carry no confidence."""
        return match_calibration(self.catalog).calibrator

    def rank_products(self, query: Query, mode: str, k: int, filter: ItemFilter | None = None,
                      settings: SearchSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``rank``, then every photo of a product counted (fused mode) and, if asked, one hit a product."""
        settings = settings or self.settings
        # Product evidence is part of the fused score, the mode that finds products; a single
        # feature's mode keeps its plain similarity (a self-match scores 1).
        weight = settings.product_weight if mode == "fused" else 0.0
        if not settings.collapse and not weight:
            return self.rank(query, mode, k, filter, settings)
        # Enough candidates that k products survive collapsing several photos of each.
        keys, scores = self.rank(query, mode, max(k * (5 if settings.collapse else 1), settings.candidates), filter, settings)
        keys, scores = rank_products(keys, scores, self.catalog.items.items(keys.tolist()), weight,
                                     settings.product_votes, settings.collapse)
        return keys[:k], scores[:k]

    def rank(self, query: Query, mode: str, k: int, filter: ItemFilter | None = None,
             settings: SearchSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores) of one decoded query in ``mode``, best first. What a query computes is kept
        on it, so ranking the same ``Query`` in several modes extracts each feature once."""
        from catalens.search.fusion import fused_search
        from catalens.search.retrieval import global_search, local_search

        settings = settings or self.settings
        if mode == FUSED:
            return fused_search(self, query, k, filter, settings)
        if mode == LOCAL or feature_spec(mode).kind == "local":
            return local_search(self, query, k, filter, settings, None if mode == LOCAL else [mode])
        if feature_spec(mode).kind == "text":
            from catalens.search.text import text_ranking

            return text_ranking(self, query, mode, k, filter)
        return global_search(self, query, mode, k, filter)

    def hits(self, keys: np.ndarray, scores: np.ndarray) -> list[SearchHit]:
        records = self.catalog.items.items(int(key) for key in keys if key >= 0)
        hits = []
        for key, score in zip(keys, scores, strict=True):
            record = records.get(int(key))
            if record is not None:
                hits.append(SearchHit(record.id, float(score), record.category, record.title, int(key)))
        return hits

