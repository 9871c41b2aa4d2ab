"""``--mode ae``: nearest neighbours on the index autoencoder's bottleneck codes."""

from __future__ import annotations

import numpy as np

from indexer.autoencoder import FEATURE_NAME, AutoencoderCodeFeature, load_index_autoencoder
from search.engine import Query, SearchEngine, register_mode


def ae_vector(engine: SearchEngine, query: Query) -> np.ndarray:
    """The query's L2-normalised autoencoder code (cached on the query for fusion)."""
    if FEATURE_NAME not in query.cache:
        feature = AutoencoderCodeFeature(load_index_autoencoder(engine.index))
        query.cache[FEATURE_NAME] = feature.transform_images([query.image])[0]
    return query.cache[FEATURE_NAME]


@register_mode("ae")
def ae_retriever(engine: SearchEngine, query: Query, k: int, allowed: np.ndarray | None):
    """Cosine nearest neighbours of the query's autoencoder code."""
    store = engine.index.vector_store(FEATURE_NAME)
    scores, keys = store.search(ae_vector(engine, query)[None], k, allowed)
    valid = keys[0] >= 0
    return keys[0][valid], scores[0][valid]
