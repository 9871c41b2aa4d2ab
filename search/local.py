"""The ``local`` mode: bag-of-visual-words candidates, re-ranked by geometric verification.

It is the logo mode: a small crop of a logo finds the items that print it, because the
inverted index only needs the crop's few words and RANSAC only needs a handful of inliers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from indexer.local import (
    LocalDescriptors,
    LocalIndex,
    SiftPreparer,
    item_descriptors,
)
from search.engine import Query, SearchEngine, register_mode
from search.geometry import Verification, verify

log = logging.getLogger(__name__)


@dataclass
class LocalSearchConfig:
    """Query-time settings; overrides come from ``config.extra["local_search"]``."""

    # Only this many bag-of-words candidates are verified: verification is ~1 ms a pair.
    verify_top: int = 40
    # Fewer inliers than this is chance agreement (measured on val: non-matching pairs give 4-7).
    min_inliers: int = 8
    geometry: str = "similarity"
    ratio: float = 0.8


def search_config(engine: SearchEngine) -> LocalSearchConfig:
    return LocalSearchConfig(**engine.index.config.extra.get("local_search", {}))


def local_index(engine: SearchEngine) -> LocalIndex:
    """Vocabulary and word search of the engine's index, whichever store holds it.

    The embedded index answers word candidates from its inverted file, Elasticsearch with a
    term query; verification below reads keypoints of the candidates through ``index.store``.
    """
    loaded = engine.index.local_index()
    if loaded is None:
        raise ValueError(
            f"{engine.index.root}: this index has no local features (index with local_features on)"
        )
    return loaded


def query_descriptors(engine: SearchEngine, query: Query) -> LocalDescriptors:
    if "sift" not in query.cache:
        config = local_index(engine).config
        query.cache["sift"] = SiftPreparer(config.max_keypoints, config.image_size)(query.image)
    return query.cache["sift"]


def bow_candidates(engine: SearchEngine, query: Query, k: int, allowed: np.ndarray | None):
    """(keys, tf-idf cosine) of the ``k`` items sharing the most weighted words with the query."""
    loaded = local_index(engine)
    descriptors = query_descriptors(engine, query)
    words = query.cache.get("words")
    if words is None:
        words = query.cache["words"] = loaded.vocabulary.transform(descriptors.descriptors)
    return loaded.bow.search(words, k, allowed)


def verified(engine: SearchEngine, query: Query, keys: np.ndarray) -> dict[int, Verification]:
    """Geometric verification of ``keys`` against the query, cached on the query."""
    config = search_config(engine)
    cache: dict[int, Verification] = query.cache.setdefault("verified", {})
    todo = [int(key) for key in keys if int(key) not in cache]
    if todo:
        descriptors = query_descriptors(engine, query)
        stored = item_descriptors(engine.index, todo)
        for key in todo:
            item = stored.get(key)
            cache[key] = verify(descriptors, item, config.geometry, config.ratio) if item is not None else Verification(0, 0)
    return {int(key): cache[int(key)] for key in keys}


def local_score(verification: Verification, bow_score: float, min_inliers: int) -> float:
    """Inliers when verified (so more agreement ranks higher), else the bag-of-words cosine (< 1)."""
    if verification.inliers >= min_inliers:
        return float(verification.inliers) + float(bow_score)
    return float(bow_score)


@register_mode("local")
def local_retriever(engine: SearchEngine, query: Query, k: int, allowed: np.ndarray | None):
    """Bag-of-words shortlist, the top ``verify_top`` re-ranked by RANSAC inliers."""
    config = search_config(engine)
    keys, scores = bow_candidates(engine, query, max(k, config.verify_top), allowed)
    if len(keys) == 0:
        return keys, scores
    head = keys[: config.verify_top]
    checks = verified(engine, query, head)
    rescored = np.array(
        [local_score(checks[int(key)], score, config.min_inliers) if i < len(head) else float(score)
         for i, (key, score) in enumerate(zip(keys, scores, strict=True))],
        np.float32,
    )
    order = np.argsort(-rescored, kind="stable")[:k]
    return keys[order], rescored[order]
