"""The ``fused`` mode: every weighted feature's candidates in one ranking.

Candidates are each weighted global feature's ``candidates`` nearest items and each weighted
local feature's ``word_candidates`` best word matches; the best ``verify_top`` of every list
are verified geometrically. A candidate scores

    sum over global features  w_f * cosine_f(query, item)
    + sum over local features w_l * min(inliers, inlier_cap) / inlier_cap   (0 below min_inliers)

a weighted sum that acts as a verified-match boost: a geometrically confirmed match of the
printed label overrides a few hundredths of cosine, unverified candidates keep their cosine
order. Weights come from ``SearchSettings.weights``, or each feature's registered default
(``benchmarks/bench_retrieval.py --sweep`` compares weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from catalens.indexer.features import feature_spec
from catalens.indexer.stores import ItemFilter
from catalens.search.retrieval import (
    candidate_cosines,
    evidence,
    global_search,
    verified,
    word_candidates,
)
from catalens.search.settings import SearchSettings

if TYPE_CHECKING:
    from catalens.search.engine import Query, SearchEngine


def fused_search(engine: SearchEngine, query: Query, k: int, filter: ItemFilter | None,
                 settings: SearchSettings) -> tuple[np.ndarray, np.ndarray]:
    """(keys, fused scores) of the ``k`` best candidates, best first."""
    weights = engine.weights(settings)
    global_weights = {name: w for name, w in weights.items() if feature_spec(name).kind == "global"}
    local_weights = {name: w for name, w in weights.items() if feature_spec(name).kind == "local"}

    candidates: dict[int, None] = {}
    heads: list[np.ndarray] = []
    cosines: dict[str, dict[int, float]] = {}
    for name in global_weights:
        keys, scores = global_search(engine, query, name, max(k, settings.candidates), filter)
        candidates.update(dict.fromkeys(keys.tolist()))
        heads.append(keys[: settings.verify_top])
        cosines[name] = dict(zip(keys.tolist(), scores.tolist(), strict=True))
    word_lists = {}
    for name in local_weights:
        keys, _ = word_candidates(engine, query, name, settings.word_candidates, filter)
        candidates.update(dict.fromkeys(keys.tolist()))
        word_lists[name] = keys
    if not candidates:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    keys = np.fromiter(candidates, np.int64, len(candidates))

    scores = np.zeros(len(keys), np.float64)
    for name, weight in global_weights.items():
        known = cosines[name]
        missing = [int(key) for key in keys if int(key) not in known]
        if missing:  # found by another feature only: its cosine by this one, from the stored rows
            known = {**known, **candidate_cosines(engine, query, name, missing)}
        scores += weight * np.array([known.get(int(key), 0.0) for key in keys])
    for name, weight in local_weights.items():
        to_verify = np.unique(np.concatenate([*heads, word_lists[name][: settings.verify_top]]))
        checks = verified(engine, query, name, to_verify, settings)
        scores += weight * np.array([evidence(checks[int(key)], settings) if int(key) in checks else 0.0 for key in keys])
    order = np.argsort(-scores, kind="stable")[:k]
    return keys[order], scores[order].astype(np.float32)
