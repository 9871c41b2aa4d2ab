"""Search by photo: each query image to the best-matching catalog items, in one of several modes.

The modes of a catalog are ``fused`` (every feature with a weight, in one ranking), ``local``
(the local features alone) and one per global feature (its cosine k nearest neighbours) or
text feature (the words read on the photo), so a feature added to the index is searchable by
its name at once. Typed words search alone (``text`` without a photo) or join a photo's fused
ranking as one more evidence. The engine decodes queries,
applies the category filter and turns item keys into results; ``search.ranking`` ranks (with
``search.retrieval``, ``search.fusion`` and ``search.text``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from catalens.errors import InputError
from catalens.indexer.catalog import Catalog
from catalens.indexer.features import feature_spec
from catalens.indexer.imageio import ImageSource, decode_queries
from catalens.indexer.stores import ItemFilter
from catalens.search import ranking
from catalens.search.calibration import DEPTH as CALIBRATION_DEPTH
from catalens.search.calibration import MatchCalibrator, annotate, match_calibration
from catalens.search.query import Query, QueryResult, SearchHit
from catalens.search.ranking import FUSED, available_modes
from catalens.search.settings import SearchSettings
from catalens.search.text import text_search

log = logging.getLogger(__name__)


class ModeUnavailableError(InputError, ValueError):
    """A mode this catalog cannot answer (unknown, or its feature not built yet): the message says which exist."""


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
        return ranking.search_weights(self.catalog, settings or self.settings)

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
                annotate(self.catalog, query, mode, filter, settings, result, calibrator, reference)
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
        filter = self.item_filter(category)
        keys, scores = text_search(self.catalog, text, k, filter) if filter is None or not filter.empty else ([], [])
        return QueryResult(query=text, results=self.hits(np.asarray(keys, np.int64), np.asarray(scores, np.float32)))

    def calibrator(self) -> MatchCalibrator | None:
        """The catalog's last fitted match calibrator, fresh or stale (never fitted here), or None where
        none was ever fitted: results then carry no confidence."""
        return match_calibration(self.catalog).calibrator

    def rank_products(self, query: Query, mode: str, k: int, filter: ItemFilter | None = None,
                      settings: SearchSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``rank``, then every photo of a product counted (fused mode) and, if asked, one hit a product."""
        return ranking.rank_products(self.catalog, query, mode, k, filter, settings or self.settings)

    def rank(self, query: Query, mode: str, k: int, filter: ItemFilter | None = None,
             settings: SearchSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, scores) of one decoded query in ``mode``, best first. What a query computes is kept
        on it, so ranking the same ``Query`` in several modes extracts each feature once."""
        return ranking.rank(self.catalog, query, mode, k, filter, settings or self.settings)

    def hits(self, keys: np.ndarray, scores: np.ndarray) -> list[SearchHit]:
        records = self.catalog.items.items(int(key) for key in keys if key >= 0)
        hits = []
        for key, score in zip(keys, scores, strict=True):
            record = records.get(int(key))
            if record is not None:
                hits.append(SearchHit(record.id, float(score), record.category, record.title, int(key)))
        return hits

