"""Findings a person looked at and dismissed: kept hidden until the item changes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from catalens.indexer.files import atomic_path
from catalens.indexer.stores import ItemRecord
from catalens.search.audit.rows import CatalogRows

DISMISSED_FILE = "audit_dismissed.json"


def item_digest(record: ItemRecord, data: CatalogRows, position: int) -> str:
    """What a dismissal holds on to: the item's image (file fingerprint and stored rows) and category."""
    digest = hashlib.sha256(f"{record.key}\n{record.fingerprint}\n{record.category}".encode())
    for name in sorted(data.rows):
        digest.update(np.ascontiguousarray(data.rows[name][position], np.float32).tobytes())
    return digest.hexdigest()[:32]


def read_dismissed(catalog: Any) -> dict[str, dict[str, Any]]:
    path = Path(catalog.models_dir) / DISMISSED_FILE
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def dismiss(catalog: Any, item_id: str) -> dict[str, Any]:
    """Record that a person looked at ``item_id``'s findings and found nothing wrong; they stay hidden
    until the item changes (its image or its category). ``KeyError`` when the catalog has no such item."""
    record = catalog.items.item_by_id(item_id)
    if record is None:
        raise KeyError(item_id)
    data = CatalogRows.from_catalog(catalog)
    positions = np.flatnonzero(data.keys == record.key)
    digest = item_digest(record, data, int(positions[0])) if len(positions) else record.fingerprint
    dismissed = read_dismissed(catalog)
    import time

    dismissed[item_id] = {"digest": digest, "at": time.time()}
    path = Path(catalog.models_dir) / DISMISSED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(dismissed, indent=1, sort_keys=True))
    return dismissed[item_id]
