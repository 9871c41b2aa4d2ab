"""The ``fused`` mode: deep and local candidates in one ranking.

Candidates are the deep top ``deep_k`` and the bag-of-words top ``local_k``; the best
``verify_top`` of each list are geometrically verified. Scores are normalised to [0, 1] on each
side: the deep cosine as it is, the local evidence as ``min(inliers, inlier_cap) / inlier_cap``
(zero below ``min_inliers``, where agreement is chance). The fused score is

    deep_cosine + local_weight * normalised_inliers

a weighted sum that acts as a verified-match boost: a geometrically confirmed match of the
printed label overrides a few hundredths of cosine, unverified candidates keep their deep order.
On the grocery val split (catalog iconic+train, 296 queries; deep alone 56.4% top-1, 43% on
Packages) this rule reached 64.2% (66% on Packages, Fruit and Vegetables unchanged) at weight
0.2, against 63.2% for a log-inlier boost and 56.4% at best for reciprocal-rank fusion, which
lets the weak bag-of-words order of fruit and vegetables pull good deep answers down. Weights
0.2-0.3 are within one query of each other; verifying 20 rather than 40 per side costs two
Packages queries and halves the verification time. A second vocabulary (the index defaults:
24 samples a word, 8 k-means rounds) gave 62.5% overall, 61% on Packages at this weight, with
weights 0.1-2.0 within two queries of each other and rrf again last (55.1% at best).
``benchmarks/bench_retrieval.py --sweep`` reprints the comparison.

Where the index has an autoencoder (``catalens train-ae``), the weighted rule can add
``ae_weight * ae_cosine`` (the candidates' bottleneck-code cosine to the query's). It does not
help, so the weight stays zero: on the same val split (autoencoder trained on iconic+train, 8
epochs; ``bench_retrieval.py --ae-weights 0,0.1,0.2,0.5 --ae-epochs 8``) fused top-1 fell from
62.5% at weight 0 to 61.1, 59.5 and 58.8% at 0.1, 0.2 and 0.5, and deep alone re-ranked by
``deep + w * ae`` from 56.4% to 55.1, 53.7 and 52.4%; the losses are on Vegetables (71.8% to
67.1, 63.5 and 58.8%), Packages do not gain. A non-zero weight also costs a second pass of the
backbone's trunk per query (172 against 103 ms a query for deep alone in that run, on a shared
2-core machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from search.engine import Query, SearchEngine, deep_retriever, register_mode
from search.local import bow_candidates, search_config, verified


@dataclass
class FusionConfig:
    """Fusion settings, defaults picked on the grocery val split; overrides from ``config.extra["fusion"]``."""

    rule: str = "weighted"  # weighted | rrf
    deep_k: int = 40
    local_k: int = 40
    # How many of each side's best candidates are verified (latency grows ~1 ms per candidate).
    verify_top: int = 20
    local_weight: float = 0.2
    inlier_cap: int = 30
    rrf_k: float = 60.0
    # Weight of the autoencoder-code cosine (weighted rule, indexes with an autoencoder only);
    # zero because it did not help on val (see the module docstring).
    ae_weight: float = 0.0


def fusion_config(engine: SearchEngine) -> FusionConfig:
    return FusionConfig(**engine.index.config.extra.get("fusion", {}))


def fuse_scores(
    deep_keys: np.ndarray,
    deep_scores: np.ndarray,
    local_keys: np.ndarray,
    inliers: dict[int, int],
    config: FusionConfig,
    min_inliers: int,
    ae_cosines: dict[int, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(keys, fused scores) best first over the union of both candidate lists.

    ``local_keys`` must be in local order (verified inliers first); ``inliers`` may miss keys
    that were not verified (they count as zero). ``ae_cosines`` (key to autoencoder-code cosine)
    adds ``config.ae_weight`` times it under the weighted rule; missing keys count as zero.
    """
    candidates = list(dict.fromkeys([int(k) for k in deep_keys] + [int(k) for k in local_keys]))
    if not candidates:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    floor = float(deep_scores[-1]) if len(deep_scores) else 0.0
    deep = dict(zip((int(k) for k in deep_keys), (float(s) for s in deep_scores), strict=True))

    def evidence(key: int) -> float:
        count = inliers.get(key, 0)
        return min(count, config.inlier_cap) / config.inlier_cap if count >= min_inliers else 0.0

    if config.rule == "weighted":
        # A key only the local side found gets the deep list's last score: it was no better.
        ae = ae_cosines or {}
        scores = [deep.get(key, floor) + config.local_weight * evidence(key) + config.ae_weight * ae.get(key, 0.0)
                  for key in candidates]
    elif config.rule == "rrf":
        deep_rank = {int(k): i for i, k in enumerate(deep_keys)}
        local_rank = {int(k): i for i, k in enumerate(local_keys)}
        missing = len(candidates) + 1
        scores = [
            1.0 / (config.rrf_k + deep_rank.get(key, missing))
            + config.local_weight / (config.rrf_k + local_rank.get(key, missing))
            for key in candidates
        ]
    else:
        raise ValueError(f"unknown fusion rule {config.rule!r}: weighted | rrf")
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.asarray(candidates, np.int64)[order], np.asarray(scores, np.float32)[order]


def ae_cosines(engine: SearchEngine, query: Query, keys: np.ndarray) -> dict[int, float] | None:
    """Autoencoder-code cosine of the query to each of ``keys``; None where the index has no codes."""
    from indexer.autoencoder import FEATURE_NAME, has_model
    from search.ae_mode import ae_vector

    if FEATURE_NAME not in engine.index.meta["dims"] or not has_model(engine.index) or not len(keys):
        return None
    store = engine.index.vector_store(FEATURE_NAME)
    # A search restricted to the candidates returns exactly their cosines.
    scores, found = store.search(ae_vector(engine, query)[None], len(keys), np.asarray(keys, np.int64))
    return {int(key): float(score) for key, score in zip(found[0], scores[0], strict=True) if key >= 0}


@register_mode("fused")
def fused_retriever(engine: SearchEngine, query: Query, k: int, allowed: np.ndarray | None):
    """Deep and local candidates, fused; falls back to deep where the index has no local side."""
    config = fusion_config(engine)
    local_config = search_config(engine)
    deep_keys, deep_scores = deep_retriever(engine, query, max(k, config.deep_k), allowed)
    use_ae = config.rule == "weighted" and config.ae_weight != 0
    try:
        local_keys, local_scores = bow_candidates(engine, query, config.local_k, allowed)
    except ValueError:
        cosines = ae_cosines(engine, query, deep_keys) if use_ae else None
        if cosines is None:
            return deep_keys[:k], deep_scores[:k]
        keys, scores = fuse_scores(deep_keys, deep_scores, np.zeros(0, np.int64), {}, config, 1, cosines)
        return keys[:k], scores[:k]
    to_verify = np.unique(np.concatenate([deep_keys[: config.verify_top], local_keys[: config.verify_top]]))
    checks = verified(engine, query, to_verify)
    inliers = {key: check.inliers for key, check in checks.items()}
    # Local order: verified inliers first, then the bag-of-words cosine.
    local_order = sorted(
        range(len(local_keys)),
        key=lambda i: -(inliers.get(int(local_keys[i]), 0) * (inliers.get(int(local_keys[i]), 0) >= local_config.min_inliers) + float(local_scores[i])),
    )
    candidates = np.unique(np.concatenate([deep_keys, local_keys]))
    cosines = ae_cosines(engine, query, candidates) if use_ae else None
    keys, scores = fuse_scores(deep_keys, deep_scores, local_keys[local_order], inliers, config, local_config.min_inliers,
                               cosines)
    return keys[:k], scores[:k]
