"""One photo under two ids: pairs of items whose rows show one image, and how sure that is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from catalens.search.audit.records import AuditSettings
from catalens.search.audit.rows import CatalogRows, NeighbourLists
from catalens.search.verification import Verifier

# (i, j) positions -> the inliers of their stored local descriptors' geometric verification.
PairInliers = Callable[[list[tuple[int, int]]], list[int]]


def duplicate_pairs(data: CatalogRows, neighbours: NeighbourLists, settings: AuditSettings,
                    inliers: PairInliers | None = None) -> list[tuple[int, int, float, bool]]:
    """(i, j, similarity, exact) for pairs of items that show one image: every stored feature at
    least ``exact_similarity`` (exact copies, flagged whatever their categories), or the main
    feature at least ``near_similarity`` and colour at least ``near_colour_similarity`` under two
    different categories (resized, cropped, re-encoded copies). On grocery, no two photos of
    different products reach 0.85 and 0.97 together with verified keypoints; copies resized to
    half, cropped by 10% or re-encoded at JPEG q40 keep colour above 0.97 and deep mostly above 0.86.

    Pictures with nothing to tell them apart in the global rows (blank placeholders, noise, two
    generated documents) reach those similarities too without being one image; with ``inliers``
    (the catalog's stored keypoints), a near pair must also keep ``copy_min_inliers`` verified
    matches: a copy keeps 70-340 on grocery, two such pictures 0-19."""
    main = next(iter(data.weights))
    categories = data.categories
    pairs: dict[tuple[int, int], tuple[float, bool]] = {}
    positions, sims = neighbours.positions[main], neighbours.sims[main]
    for i in range(len(positions)):
        for j, sim in zip(positions[i], sims[i], strict=True):
            if sim < settings.near_similarity:
                break
            j = int(j)
            others = [float(data.rows[name][i] @ data.rows[name][j]) for name in data.rows if name != main]
            exact = sim >= settings.exact_similarity and all(o >= settings.exact_similarity for o in others)
            colour = min(others) if others else 1.0
            near = colour >= settings.near_colour_similarity and categories[i] != categories[j]
            if exact or near:
                pairs[(min(i, j), max(i, j))] = (float(sim), bool(exact))
    if inliers is not None:
        near_pairs = [pair for pair, (_, exact) in pairs.items() if not exact]
        for pair, count in zip(near_pairs, inliers(near_pairs), strict=True):
            if count < settings.copy_min_inliers:
                del pairs[pair]
    return [(i, j, sim, exact) for (i, j), (sim, exact) in pairs.items()]


def stored_pair_inliers(catalog: Any, keys: np.ndarray) -> PairInliers | None:
    """Verification of item pairs from the catalog's first local feature's stored descriptors (no
    pass over the images); None where the catalog keeps no local feature. An item without
    descriptors (no keypoints: a blank picture) has no inliers."""
    local = catalog.local_features()
    if not local:
        return None
    verifier = Verifier()

    def count(pairs: list[tuple[int, int]]) -> list[int]:
        positions = sorted({p for pair in pairs for p in pair})
        stored = catalog.stored_descriptors(local[0], [int(keys[p]) for p in positions])
        descriptors = {p: stored[int(keys[p])] for p in positions if int(keys[p]) in stored}
        return [verifier.verify_many(descriptors[i], [descriptors[j]])[0].inliers
                if i in descriptors and j in descriptors else 0 for i, j in pairs]

    return count


def duplicate_score(similarity: float, exact: bool, settings: AuditSettings) -> float:
    """P(one image) of a pair: 1 for exact copies; for near ones, rising from 0.5 at
    ``near_similarity`` (measured on grocery: no two photos of different products were that close)."""
    if exact:
        return 0.999
    return float(1.0 / (1.0 + np.exp(-60.0 * (similarity - settings.near_similarity))))
