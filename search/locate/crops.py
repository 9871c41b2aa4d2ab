"""Crops of the photo through the catalog's weighted global features, and their weighted cosine
to catalog items: what scores a window and names a box."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from catalens.indexer.features import embed, feature_spec, l2_normalise
from catalens.indexer.stores import stack_rows
from catalens.search.engine import SearchEngine


def _global_weights(engine: SearchEngine) -> dict[str, float]:
    return {name: weight for name, weight in engine.weights().items() if feature_spec(name).kind == "global"}


def _embed_crops(engine: SearchEngine, crops: Sequence[Image.Image], one_view: bool = True) -> dict[str, np.ndarray]:
    """Every weighted global feature of every crop, in one batch a feature; ``one_view``: the crop
    alone, else with its mirror image as catalog rows are made (for the few boxes named).

    One view (``embed``): a photo's ~50 crops take half the network passes of a feature that
    embeds an image with its mirror, at about the same recall (measured in docs/locate.md).
    """
    return {name: embed(engine.catalog.feature(name), crops, one_view=one_view) for name in _global_weights(engine)}


def _fused_cosines(engine: SearchEngine, vectors: dict[str, np.ndarray], keys: np.ndarray) -> np.ndarray:
    """(crops, keys) weighted cosine sums, divided by the weights' sum (in [0, 1] for photos)."""
    weights = _global_weights(engine)
    total = np.zeros((len(next(iter(vectors.values()))), len(keys)), np.float32)
    order = np.argsort(keys)
    for name, weight in weights.items():
        found, rows = stack_rows(engine.catalog.items.rows(name, keys.tolist()), engine.catalog.dims()[name])
        cosines = np.zeros_like(total)
        cosines[:, order[np.searchsorted(keys[order], found)]] = vectors[name] @ l2_normalise(rows).T
        total += weight * cosines
    return total / max(sum(weights.values()), 1e-9)
