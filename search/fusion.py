"""The ``fused`` mode: every weighted feature's candidates in one ranking.

Candidates are each weighted global feature's ``candidates`` nearest items and each weighted
local feature's ``word_candidates`` best word matches; the best ``verify_top`` of every list
are verified geometrically. A candidate scores

    sum over global features  w_f * cosine_f(query, item)
    + sum over local features w_l * min(inliers, inlier_cap) / inlier_cap   (0 below min_inliers)
    + sum over text sources   w_t * bm25(words, item) / best bm25 of those words

(text sources: the words typed with the photo, weight ``text_weight``, and those each text
feature reads on it), a weighted sum that acts as a verified-match boost: a geometrically confirmed match of the
printed label overrides a few hundredths of cosine, unverified candidates keep their cosine
order. Weights come from ``SearchSettings.weights``, or each feature's registered default
(``benchmarks/bench_retrieval.py --sweep`` compares weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import zip_longest
from typing import TYPE_CHECKING

import numpy as np

from catalens.indexer.features import feature_spec
from catalens.indexer.stores import ItemFilter
from catalens.search.retrieval import (
    candidate_cosines,
    compute_side_by_side,
    global_search,
    word_candidates,
)
from catalens.search.settings import SearchSettings
from catalens.search.text import query_text_evidence
from catalens.search.verification import Verifier

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.search.query import Query


def fused_search(catalog: Catalog, query: Query, weights: Mapping[str, float], k: int, filter: ItemFilter | None,
                 settings: SearchSettings, verifier: Verifier) -> tuple[np.ndarray, np.ndarray]:
    """(keys, fused scores) of the ``k`` best candidates, best first; ``weights``: each feature's
    weight (``search.ranking.search_weights``); ``verifier``: how local matches are verified."""
    global_weights = {name: w for name, w in weights.items() if feature_spec(name).kind == "global"}
    local_weights = {name: w for name, w in weights.items() if feature_spec(name).kind == "local"}
    text_weights = {name: w for name, w in weights.items() if feature_spec(name).kind == "text"}

    compute_side_by_side(catalog, query, list(global_weights), list(local_weights))
    candidates: dict[int, None] = {}
    cosines: dict[str, dict[int, float]] = {}
    for name in global_weights:
        keys, scores = global_search(catalog, query, name, max(k, settings.candidates), filter)
        candidates.update(dict.fromkeys(keys.tolist()))
        cosines[name] = dict(zip(keys.tolist(), scores.tolist(), strict=True))
    word_lists = {}
    for name in local_weights:
        keys, _ = word_candidates(catalog, query, name, settings.word_candidates, filter)
        candidates.update(dict.fromkeys(keys.tolist()))
        word_lists[name] = keys
    # Words (typed, or read on the photo) bring their own candidates: a pack named on the query
    # may be one the pixels ranked far down.
    worded = query_text_evidence(catalog, query, settings.text_weight, text_weights, settings.candidates, filter)
    candidates.update(dict.fromkeys(worded))
    if not candidates:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    keys = np.fromiter(candidates, np.int64, len(candidates))

    scores = np.zeros(len(keys), np.float64)
    for name, weight in global_weights.items():
        known = cosines[name]
        missing = [int(key) for key in keys if int(key) not in known]
        if missing:  # found by another feature only: its cosine by this one, from the stored rows
            known = {**known, **candidate_cosines(catalog, query, name, missing)}
        scores += weight * np.array([known.get(int(key), 0.0) for key in keys])
    if worded:  # before verification: a candidate the words favour is verified first
        scores += np.array([worded.get(int(key), 0.0) for key in keys])
    for name, weight in local_weights.items():
        scores += weight * _verified_evidence(catalog, query, name, keys, scores, word_lists[name],
                                              settings.verify_top, verifier)
    order = np.argsort(-scores, kind="stable")[:k]
    return keys[order], scores[order].astype(np.float32)


def _verified_evidence(catalog: Catalog, query: Query, feature: str, keys: np.ndarray, prior: np.ndarray,
                       word_keys: np.ndarray, verify_top: int, verifier: Verifier) -> np.ndarray:
    """Each candidate's verified-match evidence in [0, 1] for the local ``feature``.

    The candidates verified are the best ``verify_top`` by the global features' fused score and
    the best ``verify_top`` by words, taken in turn, best first, in chunks. Verification stops
    once a candidate with certain evidence (``inlier_cap`` inliers) scores more than any
    candidate left could reach with certain evidence of its own: the top result can no longer
    change: fewer verifications a query, at the same top-1 (docs/speed.md).
    """
    by_prior = keys[np.argsort(-prior, kind="stable")[:verify_top]]
    queue = list(dict.fromkeys(key for pair in zip_longest(by_prior.tolist(), word_keys[:verify_top].tolist())
                               for key in pair if key is not None))
    position = {int(key): row for row, key in enumerate(keys.tolist())}
    found = np.zeros(len(keys), np.float64)
    for start in range(0, len(queue), _VERIFY_CHUNK):
        checks = query.verified(catalog, feature, queue[start : start + _VERIFY_CHUNK], verifier)
        for key, check in checks.items():
            found[position[key]] = verifier.evidence(check)
        left = [position[key] for key in queue[start + _VERIFY_CHUNK :]]
        certain = found >= 1.0
        # Certain evidence adds the same weight to any candidate, so the priors decide.
        if left and certain.any() and prior[certain].max() > prior[left].max():
            break
    return found


# Candidates verified per round before checking whether the top result is settled.
_VERIFY_CHUNK = 8
