"""Product-level ranking: every catalog photo of a product counts, and a result list can show each product once.

An item's product is its ``product`` attribute where the catalog gives one, else its leaf
category. An item scores its own score plus ``product_weight`` times the scores of the best
``product_votes - 1`` other items of its product among the candidates: several close photos of
one product are more evidence than one close photo of another. The list stays ordered by score,
and each item keeps a score of its own (items of one leaf do not tie); a product's best item
carries the product's score, and collapsed, each product shows only that item.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from catalens.indexer.stores import ItemRecord, product_of


def rank_products(keys: np.ndarray, scores: np.ndarray, records: Mapping[int, ItemRecord], weight: float,
                  votes: int, collapse: bool) -> tuple[np.ndarray, np.ndarray]:
    """``keys`` (best first, with ``scores``) re-scored with their product's other candidates, best first.

    Keys without a record are dropped. ``collapse`` keeps each product's best item alone.
    """
    members: dict[str, list[int]] = {}
    for position, key in enumerate(keys.tolist()):
        record = records.get(int(key))
        if record is not None:
            members.setdefault(product_of(record), []).append(position)
    kept, boosted = [], []
    for positions in members.values():
        for rank, position in enumerate(positions):
            others = (positions[:rank] + positions[rank + 1:])[:votes - 1]
            kept.append(position)
            boosted.append(float(scores[position]) + weight * float(sum(scores[p] for p in others)))
            if collapse:  # the best item: its own score is the highest, and so is its boosted one
                break
    order = sorted(range(len(kept)), key=lambda i: (-boosted[i], kept[i]))
    return keys[[kept[i] for i in order]], np.array([boosted[i] for i in order], np.float32)
