"""One photo under two ids: pairs of items whose rows show one image, and how sure that is."""

from __future__ import annotations

import numpy as np

from catalens.search.audit.records import AuditSettings
from catalens.search.audit.rows import CatalogRows, NeighbourLists


def duplicate_pairs(data: CatalogRows, neighbours: NeighbourLists, settings: AuditSettings
                    ) -> list[tuple[int, int, float, bool]]:
    """(i, j, similarity, exact) for pairs of items that show one image: every stored feature at
    least ``exact_similarity`` (exact copies, flagged whatever their categories), or the main
    feature at least ``near_similarity`` and colour at least ``near_colour_similarity`` under two
    different categories (resized, cropped, re-encoded copies). On grocery, no two photos of
    different products reach 0.88 and 0.97 together; copies resized to half, cropped by 10% or
    re-encoded at JPEG q40 keep colour above 0.98 and deep above 0.86."""
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
    return [(i, j, sim, exact) for (i, j), (sim, exact) in pairs.items()]


def duplicate_score(similarity: float, exact: bool, settings: AuditSettings) -> float:
    """P(one image) of a pair: 1 for exact copies; for near ones, rising from 0.5 at
    ``near_similarity`` (measured on grocery: no two photos of different products were that close)."""
    if exact:
        return 0.999
    return float(1.0 / (1.0 + np.exp(-60.0 * (similarity - settings.near_similarity))))
