"""Product-level ranking: every catalog photo of a product counts, and a result list can show each product once.

An item's product is its ``product`` attribute where the catalog gives one, else its leaf
category. A product scores its best item's score plus ``product_weight`` times the scores of
its next ``product_votes - 1`` items: several close photos of one product are more evidence
than one close photo of another. Items are then ordered by their product's score (best item
first within a product), or, collapsed, one hit a product.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from catalens.indexer.stores import ItemRecord, product_of


def rank_products(keys: np.ndarray, scores: np.ndarray, records: Mapping[int, ItemRecord], weight: float,
                  votes: int, collapse: bool) -> tuple[np.ndarray, np.ndarray]:
    """``keys`` (best first, with ``scores``) reordered by product; scores become product scores.

    Keys without a record are dropped. ``collapse`` keeps each product's best item alone.
    """
    members: dict[str, list[int]] = {}
    for position, key in enumerate(keys.tolist()):
        record = records.get(int(key))
        if record is not None:
            members.setdefault(product_of(record), []).append(position)
    product_scores = {
        product: float(scores[positions[0]]) + weight * float(sum(scores[p] for p in positions[1:votes]))
        for product, positions in members.items()
    }
    order = sorted(members, key=lambda product: -product_scores[product])
    positions = [members[product][:1] if collapse else members[product] for product in order]
    flat = [p for group in positions for p in group]
    owner = [product for product, group in zip(order, positions, strict=True) for _ in group]
    return keys[flat], np.array([product_scores[product] for product in owner], np.float32)
