"""Changes to an index outside an indexing run: removing items by id."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from indexer.features import extensions
from indexer.index import CatalogIndex


def remove_items(index: CatalogIndex, ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """Delete ``ids`` from every store of ``index`` durably; returns (removed, not found)."""
    ids = list(dict.fromkeys(ids))
    with index.lock:
        found = [item_id for item_id in ids if index.store.item_by_id(item_id) is not None]
        missing = [item_id for item_id in ids if item_id not in found]
        if not found:
            return [], missing
        with index.store.transaction() as db:
            keys = np.asarray(index.store.delete(db, found), np.int64)
        for feature in list(index.meta["dims"]):
            index.vector_store(feature).remove(keys)
        for extension in extensions():
            extension.after_update(index, np.zeros(0, np.int64), keys)
        index.save()
    return found, missing
