"""SQLite item store: items, categories, per-item feature blobs, failures and run state.

SQLite is the index's source of truth: every batch of an indexing run commits here in one
transaction, and the FAISS files are rebuilt or patched from it after a crash.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datasets.catalog import CatalogItem

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    image TEXT NOT NULL,
    category TEXT NOT NULL DEFAULT '',
    title TEXT NOT NULL DEFAULT '',
    attributes TEXT NOT NULL DEFAULT '{}',
    fingerprint TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_category ON items(category);
CREATE TABLE IF NOT EXISTS features (
    feature TEXT NOT NULL,
    key INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (feature, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    source TEXT PRIMARY KEY,
    item_id TEXT,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class ItemRecord:
    key: int
    id: str
    image: str
    category: str
    title: str
    attributes: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def _record(row: sqlite3.Row) -> ItemRecord:
    return ItemRecord(
        key=row["key"], id=row["id"], image=row["image"], category=row["category"],
        title=row["title"], attributes=json.loads(row["attributes"]), fingerprint=row["fingerprint"],
    )


def category_clause(prefix: str) -> tuple[str, tuple[str, ...]]:
    """SQL matching a category path prefix on whole levels: 'Packages/Milk' is not 'Packages/Milky'."""
    prefix = prefix.strip("/")
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "(category = ? OR category LIKE ? ESCAPE '\\')", (prefix, escaped + "/%")


class MetadataStore:
    """Thread-safe access to one ``items.sqlite`` (WAL, so readers never wait for a writer)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing; bumps the generation that FAISS files are checked against."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute(
                    "INSERT INTO state(name, value) VALUES('generation', '1') "
                    "ON CONFLICT(name) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    # --- state

    @property
    def generation(self) -> int:
        rows = self._query("SELECT value FROM state WHERE name = 'generation'")
        return int(rows[0]["value"]) if rows else 0

    def get_state(self, name: str, default: str | None = None) -> str | None:
        rows = self._query("SELECT value FROM state WHERE name = ?", (name,))
        return rows[0]["value"] if rows else default

    def set_state(self, name: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO state(name, value) VALUES(?, ?)", (name, value))

    # --- items

    def upsert(self, db: sqlite3.Connection, item: CatalogItem, fingerprint: str) -> int:
        """Insert or update ``item`` inside a transaction; its key survives updates."""
        row = db.execute(
            "INSERT INTO items(id, image, category, title, attributes, fingerprint, updated_at) "
            "VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET image=excluded.image, "
            "category=excluded.category, title=excluded.title, attributes=excluded.attributes, "
            "fingerprint=excluded.fingerprint, updated_at=excluded.updated_at RETURNING key",
            (item.id, str(item.image), item.category, item.title,
             json.dumps(item.attributes, ensure_ascii=False), fingerprint, time.time()),
        ).fetchone()
        db.execute("DELETE FROM failures WHERE item_id = ?", (item.id,))
        return int(row[0])

    def put_feature(self, db: sqlite3.Connection, feature: str, key: int, data: bytes) -> None:
        db.execute("INSERT OR REPLACE INTO features(feature, key, data) VALUES(?, ?, ?)", (feature, key, data))

    def delete(self, db: sqlite3.Connection, ids: Iterable[str]) -> list[int]:
        keys = []
        for item_id in ids:
            row = db.execute("DELETE FROM items WHERE id = ? RETURNING key", (item_id,)).fetchone()
            if row is not None:
                keys.append(int(row[0]))
                db.execute("DELETE FROM features WHERE key = ?", (int(row[0]),))
        return keys

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM items")[0]["n"])

    def fingerprints(self) -> dict[str, tuple[int, str]]:
        return {row["id"]: (row["key"], row["fingerprint"]) for row in self._query("SELECT id, key, fingerprint FROM items")}

    def items(self, keys: Iterable[int]) -> dict[int, ItemRecord]:
        keys = [int(key) for key in keys]
        found: dict[int, ItemRecord] = {}
        for start in range(0, len(keys), 900):
            chunk = keys[start : start + 900]
            rows = self._query(f"SELECT * FROM items WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            found.update({row["key"]: _record(row) for row in rows})
        return found

    def item_by_id(self, item_id: str) -> ItemRecord | None:
        rows = self._query("SELECT * FROM items WHERE id = ?", (item_id,))
        return _record(rows[0]) if rows else None

    def all_items(self) -> list[ItemRecord]:
        return [_record(row) for row in self._query("SELECT * FROM items ORDER BY key")]

    def keys_in_category(self, prefix: str) -> np.ndarray:
        clause, params = category_clause(prefix)
        rows = self._query(f"SELECT key FROM items WHERE {clause}", params)
        return np.array([row["key"] for row in rows], dtype=np.int64)

    def categories(self) -> dict[str, int]:
        return {row["category"]: row["n"] for row in self._query("SELECT category, COUNT(*) AS n FROM items GROUP BY category")}

    # --- per-item feature blobs

    def feature_keys(self, feature: str) -> set[int]:
        """Keys of the items that have ``feature`` stored (without reading the blobs)."""
        return {int(row["key"]) for row in self._query("SELECT key FROM features WHERE feature = ?", (feature,))}

    def feature_blobs(self, feature: str, keys: Iterable[int] | None = None) -> dict[int, bytes]:
        if keys is None:
            rows = self._query("SELECT key, data FROM features WHERE feature = ? ORDER BY key", (feature,))
            return {row["key"]: row["data"] for row in rows}
        keys = [int(key) for key in keys]
        found: dict[int, bytes] = {}
        for start in range(0, len(keys), 900):
            chunk = keys[start : start + 900]
            rows = self._query(
                f"SELECT key, data FROM features WHERE feature = ? AND key IN ({','.join('?' * len(chunk))})",
                (feature, *chunk),
            )
            found.update({row["key"]: row["data"] for row in rows})
        return found

    def vectors(self, feature: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """All stored vectors of a global feature: (keys int64, rows float32), ordered by key."""
        blobs = self.feature_blobs(feature)
        keys = np.fromiter(blobs.keys(), dtype=np.int64, count=len(blobs))
        rows = np.frombuffer(b"".join(blobs.values()), dtype=np.float32).reshape(len(blobs), dim)
        return keys, rows

    def delete_feature(self, feature: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM features WHERE feature = ?", (feature,))

    # --- failures

    def record_failure(self, db: sqlite3.Connection, source: str, item_id: str | None, reason: str) -> None:
        db.execute(
            "INSERT OR REPLACE INTO failures(source, item_id, reason, at) VALUES(?, ?, ?, ?)",
            (source, item_id, reason, time.time()),
        )

    def failures(self) -> list[tuple[str, str | None, str]]:
        return [(row["source"], row["item_id"], row["reason"]) for row in self._query("SELECT * FROM failures ORDER BY source")]
