"""One decoded query ranked in one mode: the modes a catalog answers, each feature's weight in
fused search, and every photo of a product counted. The engine and the match calibration both
rank through here; ``search.retrieval``, ``search.fusion`` and ``search.text`` hold the rankers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from catalens.indexer.features import feature_spec, feature_weights
from catalens.indexer.stores import ItemFilter, mostly_one_image
from catalens.search import products
from catalens.search.fusion import fused_search
from catalens.search.retrieval import global_search, item_products, local_search
from catalens.search.settings import SearchSettings
from catalens.search.text import text_ranking
from catalens.search.verification import Verifier

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.search.query import Query

FUSED, LOCAL = "fused", "local"


def available_modes(catalog: Catalog) -> list[str]:
    """The modes this catalog can answer now, ``fused`` first."""
    globals_ = catalog.global_features()
    locals_ = catalog.local_features()
    texts = catalog.text_features()
    modes = [FUSED] if globals_ or locals_ or texts else []
    if locals_:
        modes.append(LOCAL)
    return modes + [name for name in (*globals_, *locals_, *texts) if name not in modes]


def is_packshot_catalog(catalog: Catalog) -> bool:
    """Most of the catalog's products (``product_of``: the product attribute, else the leaf
    category) have one image: a shop's one packshot a product. Counted once a catalog write."""

    return catalog.cached("packshot-catalog",
                          lambda: mostly_one_image(product for product, _ in item_products(catalog).values()))


def search_weights(catalog: Catalog, settings: SearchSettings) -> dict[str, float]:
    """The fused-search weight of each feature this catalog holds (settings override the defaults)."""
    present = [feature_spec(name) for name in (*catalog.global_features(), *catalog.local_features(),
                                               *catalog.text_features())]
    return feature_weights(present, "search", settings.weights, packshots=is_packshot_catalog(catalog))


def rank_products(catalog: Catalog, query: Query, mode: str, k: int, filter: ItemFilter | None,
                  settings: SearchSettings) -> tuple[np.ndarray, np.ndarray]:
    """``rank``, then every photo of a product counted (fused mode) and, if asked, one hit a product."""
    # Product evidence is part of the fused score, the mode that finds products; a single
    # feature's mode keeps its plain similarity (a self-match scores 1).
    weight = settings.product_weight if mode == FUSED else 0.0
    if not settings.collapse and not weight:
        return rank(catalog, query, mode, k, filter, settings)
    # Enough candidates that k products survive collapsing several photos of each.
    keys, scores = rank(catalog, query, mode, max(k * (5 if settings.collapse else 1), settings.candidates), filter,
                        settings)
    keys, scores = products.rank_products(keys, scores, catalog.items.items(keys.tolist()), weight,
                                          settings.product_votes, settings.collapse)
    return keys[:k], scores[:k]


def rank(catalog: Catalog, query: Query, mode: str, k: int, filter: ItemFilter | None,
         settings: SearchSettings) -> tuple[np.ndarray, np.ndarray]:
    """(keys, scores) of one decoded query in ``mode``, best first. What a query computes is kept
    on it, so ranking the same ``Query`` in several modes extracts each feature once."""
    if mode == FUSED:
        return fused_search(catalog, query, search_weights(catalog, settings), k, filter, settings,
                            Verifier.from_settings(settings))
    if mode == LOCAL or feature_spec(mode).kind == "local":
        return local_search(catalog, query, k, filter, settings, Verifier.from_settings(settings),
                            None if mode == LOCAL else [mode])
    if feature_spec(mode).kind == "text":
        return text_ranking(catalog, query, mode, k, filter)
    return global_search(catalog, query, mode, k, filter)
