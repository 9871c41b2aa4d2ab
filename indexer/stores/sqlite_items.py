"""The folder backend's ``ItemStore``: one SQLite file of items, feature rows and failures.

SQLite is the folder index's source of truth: every write is one transaction, and the FAISS
files and inverted files are rebuilt from it after a crash. A generation counter, bumped by
every write, tells derived files and caches whether they are stale.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from catalens.datasets.catalog import CatalogItem
from catalens.indexer.stores import Failure, ItemFilter, ItemRecord, ItemUpdate, item_key
from catalens.indexer.stores.text import (
    FIELD_WEIGHTS,
    ItemText,
    fts_expression,
    matching_terms,
    query_terms,
)

_SQLITE_MAGIC = b"SQLite format 3\x00"


class ItemStoreDamagedError(RuntimeError):
    """An items.sqlite that is not a whole catalens item store; the message names the file and why."""

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY,
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

# Text search (``search_text``): one FTS5 row an item (rowid: its key) of its normalised fields
# (``catalens.indexer.stores.text``), ranked by BM25. Text is normalised before it is stored, so
# the tokenizer only splits on spaces; typos and compounds are matched by expanding each query
# term over the index's own vocabulary (``item_text_terms``).
_TEXT_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS item_text USING fts5(ident, title, category, attributes, words,
    tokenize = 'unicode61');
CREATE VIRTUAL TABLE IF NOT EXISTS item_text_terms USING fts5vocab(item_text, 'row');
"""

# SQLite's default limit on host parameters in one statement is 999.
_CHUNK = 900


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


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


# How much of the item store reads may map (SQLite maps at most the file's size).
_MMAP_BYTES = 1 << 30


class SqliteItemStore:
    """Thread-safe ``ItemStore`` over one ``items.sqlite`` (WAL: readers never wait for a writer)."""

    def __init__(self, path: str | Path, create: bool = True, read_only: bool = False):
        """Open the store at ``path``; with ``create``, a missing or empty file becomes a new store.

        Without ``create`` (an index that already holds items), a missing, empty, cut-short or
        foreign file is an ``ItemStoreDamagedError``: it must never pass for an empty catalog.
        ``read_only`` opens it without writing anything (``read_only_uri``).
        """
        self.path, self.read_only = Path(path), read_only
        if not create or read_only:
            damage = header_damage(self.path)
            if damage:
                raise ItemStoreDamagedError(f"{self.path}: {damage}")
        self._lock = threading.RLock()
        tables = self._connect()
        fresh = "items" not in tables
        if fresh and (tables or not create or read_only):
            self._db.close()
            what = f"tables {', '.join(sorted(tables))}" if tables else "no tables"
            raise ItemStoreDamagedError(f"{self.path}: not a catalens item store ({what}, no 'items' table)")
        if read_only:
            self.has_text_index = "item_text" in tables and self._state("text_index") == "1"
            if self.schema_version < SCHEMA_VERSION:
                self._db.close()
                raise ItemStoreDamagedError(f"{self.path}: written by an older catalens; open it once writable "
                                            "(any command but a read-only serve) to upgrade it")
            return
        self._db.executescript(_SCHEMA)
        if fresh:
            self._set_state("schema", str(SCHEMA_VERSION))
        elif self.schema_version < SCHEMA_VERSION:
            self._migrate_keys()
        if self._state("text_index") != "1":
            self._add_text_index()
        self.has_text_index = True

    def _connect(self) -> set[str]:
        """Open the connection (read-only as ``read_only_uri`` says); returns the file's tables."""
        if self.read_only:
            self.opened_as = read_only_uri(self.path)
            self._db = sqlite3.connect(self.opened_as, uri=True, check_same_thread=False, isolation_level=None)
        else:
            self.opened_as = str(self.path)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            if not self.read_only:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            # Reads through a memory map: a query reads ~36 keypoint blobs of ~50 KB, which took
            # 7.3 ms a query through read() calls and 3.3 ms mapped (2,721-item grocery index).
            self._db.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
            return {row["name"] for row in self._query("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise ItemStoreDamagedError(f"{self.path}: not a readable SQLite database ({error})") from None

    def reopen(self) -> None:
        """A read-only store opened immutable sees no later commit: open it again to see them."""
        with self._lock:
            self._db.close()
            self._connect()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing; bumps the generation that derived files are checked against."""
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

    def _state(self, name: str) -> str | None:
        rows = self._query("SELECT value FROM state WHERE name = ?", (name,))
        return rows[0]["value"] if rows else None

    def _set_state(self, name: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO state(name, value) VALUES(?, ?)", (name, value))

    @property
    def generation(self) -> int:
        """Bumped by every write: what derived files (FAISS, inverted files) are checked against."""
        return int(self._state("generation") or 0)

    def dims(self) -> dict[str, int]:
        """Dimension of each global feature's rows: recorded in the transaction that wrote them,
        so a run killed before ``catalens.json`` was rewritten still knows them."""
        value = self._state("dims")
        return {str(name): int(dim) for name, dim in json.loads(value).items()} if value else {}

    def row_width(self, feature: str) -> int | None:
        """Bytes in one stored ``feature`` row (any one: a global feature's are all alike), or None
        without rows. One primary-key probe: what an index written before ``dims`` were kept
        here derives them from."""
        rows = self._query("SELECT length(data) AS n FROM features WHERE feature = ? LIMIT 1", (feature,))
        return int(rows[0]["n"]) if rows else None

    @staticmethod
    def _record_dims(db: sqlite3.Connection, dims: dict[str, int]) -> None:
        if not dims:
            return
        row = db.execute("SELECT value FROM state WHERE name = 'dims'").fetchone()
        known = json.loads(row[0]) if row else {}
        merged = {**known, **dims}
        if merged != known:
            db.execute("INSERT OR REPLACE INTO state(name, value) VALUES('dims', ?)", (json.dumps(merged, sort_keys=True),))

    def data_version(self) -> int:
        """SQLite's ``data_version``: changes when another connection (another process) commits,
        never for this connection's own commits. One cheap pragma, no table read."""
        return int(self._query("PRAGMA data_version")[0][0])

    @property
    def schema_version(self) -> int:
        return int(self._state("schema") or 1)

    def _migrate_keys(self) -> None:
        """Schema 1 numbered items with a counter; now every backend keys them by ``item_key(id)``."""
        with self._transaction() as db:
            db.create_function("item_key", 1, item_key, deterministic=True)
            db.execute("UPDATE features SET key = (SELECT item_key(items.id) FROM items WHERE items.key = features.key)")
            db.execute("DELETE FROM features WHERE key IS NULL")
            db.execute("UPDATE items SET key = item_key(id)")
            db.execute("INSERT OR REPLACE INTO state(name, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),))

    def _add_text_index(self) -> None:
        """Stores written before text search get its index from their items (words come with the
        ``text`` feature's next run)."""
        self._db.executescript(_TEXT_SCHEMA)  # outside the transaction: executescript commits first
        with self._transaction() as db:
            db.execute("DELETE FROM item_text")
            rows = db.execute("SELECT key, id, title, category, attributes FROM items").fetchall()
            db.executemany("INSERT INTO item_text(rowid, ident, title, category, attributes, words) VALUES(?, ?, ?, ?, ?, ?)",
                           [(row["key"], *ItemText.of(row["id"], row["title"], row["category"],
                                                      json.loads(row["attributes"])).fields()) for row in rows])
            db.execute("INSERT OR REPLACE INTO state(name, value) VALUES('text_index', '1')")

    def verify(self) -> str | None:
        """What SQLite's own check finds wrong with the whole file (it reads every page), or None."""
        try:
            rows = self._query("PRAGMA quick_check")
        except sqlite3.DatabaseError as error:
            return str(error)
        problems = [row[0] for row in rows if row[0] != "ok"]
        return "; ".join(problems[:3]) if problems else None

    # --- reading items

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM items")[0]["n"])

    def records(self) -> dict[str, ItemRecord]:
        return {row["id"]: _record(row) for row in self._query("SELECT * FROM items ORDER BY key")}

    def items(self, keys: Iterable[int]) -> dict[int, ItemRecord]:
        found: dict[int, ItemRecord] = {}
        for chunk in _chunks([int(key) for key in keys]):
            rows = self._query(f"SELECT * FROM items WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            found.update({row["key"]: _record(row) for row in rows})
        return found

    def item_by_id(self, item_id: str) -> ItemRecord | None:
        rows = self._query("SELECT * FROM items WHERE id = ?", (item_id,))
        return _record(rows[0]) if rows else None

    def categories(self) -> dict[str, int]:
        return {row["category"]: row["n"] for row in self._query("SELECT category, COUNT(*) AS n FROM items GROUP BY category")}

    def category_filter(self, prefix: str) -> ItemFilter:
        clause, params = category_clause(prefix)
        keys = np.array([row["key"] for row in self._query(f"SELECT key FROM items WHERE {clause}", params)], np.int64)
        return ItemFilter(keys=keys, category=prefix.strip("/"))

    # --- reading rows

    def row_count(self, feature: str) -> int:
        """How many items hold a ``feature`` row, rows unread."""
        return int(self._query("SELECT COUNT(*) AS n FROM features WHERE feature = ?", (feature,))[0]["n"])

    def row_keys(self, feature: str) -> set[int]:
        return {int(row["key"]) for row in self._query("SELECT key FROM features WHERE feature = ?", (feature,))}

    def rows(self, feature: str, keys: Iterable[int] | None = None) -> dict[int, bytes]:
        if keys is None:
            rows = self._query("SELECT key, data FROM features WHERE feature = ? ORDER BY key", (feature,))
            return {row["key"]: row["data"] for row in rows}
        found: dict[int, bytes] = {}
        for chunk in _chunks([int(key) for key in keys]):
            rows = self._query(
                f"SELECT key, data FROM features WHERE feature = ? AND key IN ({','.join('?' * len(chunk))})",
                (feature, *chunk),
            )
            found.update({row["key"]: row["data"] for row in rows})
        return found

    def keys_with_row_prefix(self, feature: str, prefix: bytes) -> set[int]:
        """Keys whose ``feature`` row starts with ``prefix`` (which vocabulary words came from), unread."""
        rows = self._query("SELECT key FROM features WHERE feature = ? AND substr(data, 1, ?) = ?",
                           (feature, len(prefix), prefix))
        return {int(row["key"]) for row in rows}

    # --- writing

    def write(self, updates: Sequence[ItemUpdate]) -> list[int]:
        keys = []
        dims = {name: len(row) for update in updates for name, row in update.rows.items() if isinstance(row, np.ndarray)}
        with self._transaction() as db:
            self._record_dims(db, dims)
            for update in updates:
                item, key = update.item, item_key(update.item.id)
                db.execute(
                    "INSERT OR REPLACE INTO items(key, id, image, category, title, attributes, fingerprint, updated_at) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, item.id, str(item.image), item.category, item.title,
                     json.dumps(item.attributes, ensure_ascii=False), update.fingerprint, time.time()),
                )
                # Rows of the item's previous image (an anomaly score, words) go with it.
                db.execute("DELETE FROM features WHERE key = ?", (key,))
                db.executemany(
                    "INSERT INTO features(feature, key, data) VALUES(?, ?, ?)",
                    [(name, key, _blob(row)) for name, row in update.rows.items()],
                )
                db.execute("DELETE FROM failures WHERE item_id = ?", (item.id,))
                # Words read from the image are the rows that are text (the ``text`` feature's).
                words = " ".join(row for row in update.rows.values() if isinstance(row, str))
                db.execute("DELETE FROM item_text WHERE rowid = ?", (key,))
                db.execute("INSERT INTO item_text(rowid, ident, title, category, attributes, words) VALUES(?, ?, ?, ?, ?, ?)",
                           (key, *ItemText.of(item.id, item.title, item.category, item.attributes, words).fields()))
                keys.append(key)
        return keys

    def update_metadata(self, items: Sequence[CatalogItem]) -> None:
        if not items:
            return
        with self._transaction() as db:
            db.executemany(
                "UPDATE items SET category = ?, title = ?, attributes = ?, image = ?, updated_at = ? WHERE id = ?",
                [(item.category, item.title, json.dumps(item.attributes, ensure_ascii=False), str(item.image),
                  time.time(), item.id) for item in items],
            )
            db.executemany(
                "UPDATE item_text SET ident = ?, title = ?, category = ?, attributes = ? WHERE rowid = ?",
                [(*ItemText.of(item.id, item.title, item.category, item.attributes).fields()[:4], item_key(item.id))
                 for item in items],
            )

    def delete(self, ids: Sequence[str]) -> list[int]:
        keys = []
        with self._transaction() as db:
            for chunk in _chunks(list(dict.fromkeys(ids))):
                marks = ",".join("?" * len(chunk))
                found = [int(row[0]) for row in db.execute(f"SELECT key FROM items WHERE id IN ({marks})", chunk)]
                db.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk)
                for key_chunk in _chunks(found):
                    db.execute(f"DELETE FROM features WHERE key IN ({','.join('?' * len(key_chunk))})", key_chunk)
                    db.execute(f"DELETE FROM item_text WHERE rowid IN ({','.join('?' * len(key_chunk))})", key_chunk)
                keys.extend(found)
        return keys

    def put_rows(self, feature: str, rows: dict[int, bytes]) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO features(feature, key, data) VALUES(?, ?, ?)",
                           [(feature, int(key), _blob(data)) for key, data in rows.items()])

    def delete_rows(self, feature: str, keys: Collection[int]) -> None:
        if not keys:
            return
        with self._transaction() as db:
            db.executemany("DELETE FROM features WHERE feature = ? AND key = ?", [(feature, int(key)) for key in keys])

    def replace_rows(self, rows: dict[str, dict[int, bytes]], dims: dict[str, int] | None = None) -> None:
        """Every row of each feature of ``rows`` replaced; ``dims``: the new dimension of those that are vectors."""
        with self._transaction() as db:
            self._record_dims(db, dims or {})
            for feature, by_key in rows.items():
                db.execute("DELETE FROM features WHERE feature = ?", (feature,))
                db.executemany("INSERT INTO features(feature, key, data) VALUES(?, ?, ?)",
                               [(feature, int(key), _blob(data)) for key, data in by_key.items()])

    def delete_feature(self, feature: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM features WHERE feature = ?", (feature,))

    # --- text search

    def text_terms(self) -> list[str]:
        """Every term of the text index (what a query term is matched against, typos allowed)."""
        return self._cached_terms()[1]

    def _cached_terms(self) -> tuple[int, list[str]]:
        generation = self.generation
        cached = getattr(self, "_terms", None)
        if cached is None or cached[0] != generation:
            cached = self._terms = (generation, [row[0] for row in self._query("SELECT term FROM item_text_terms")])
        return cached

    def search_text(self, query: str, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, BM25 scores > 0) of the ``k`` items whose text best matches ``query``, best first.

        Each query term matches the indexed terms within ``fuzziness: AUTO`` typos of it and those
        containing it; the item's fields weigh as ``FIELD_WEIGHTS``."""
        if not self.has_text_index:
            raise ItemStoreDamagedError(f"{self.path}: written before text search; open it once writable "
                                        "(any command but a read-only serve) to add its text index")
        vocabulary = self.text_terms()
        expansions = [found for term in query_terms(query) for found in matching_terms(term, vocabulary)]
        if not expansions or (filter is not None and filter.empty):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        # An exact term counts again on its own, so that it ranks above its typos (p0003 above p0013).
        exact = [term for term in query_terms(query) if term in set(expansions)]
        scores: dict[int, float] = {}
        for expression in (fts_expression(expansions), fts_expression(exact)):
            if expression:
                for row in self._match(expression, k, filter):
                    scores[row["key"]] = scores.get(row["key"], 0.0) + max(row["score"], 1e-6)
        ranked = sorted(scores.items(), key=lambda pair: -pair[1])[:k]
        return np.array([key for key, _ in ranked], np.int64), np.array([score for _, score in ranked], np.float32)

    def _match(self, expression: str, k: int, filter: ItemFilter | None) -> list[sqlite3.Row]:
        weights = ", ".join(str(weight) for weight in FIELD_WEIGHTS)
        sql = f"SELECT rowid AS key, -bm25(item_text, {weights}) AS score FROM item_text WHERE item_text MATCH ?"
        params: list[Any] = [expression]
        if filter is not None and filter.category and filter.keys is None:
            clause, values = category_clause(filter.category)
            sql += f" AND rowid IN (SELECT key FROM items WHERE {clause})"
            params += values
        sql += " ORDER BY score DESC"
        if filter is None or filter.keys is None:
            sql += " LIMIT ?"
            params.append(int(k))
        rows = self._query(sql, params)
        if filter is not None and filter.keys is not None:
            allowed = set(filter.keys.tolist())
            rows = [row for row in rows if row["key"] in allowed][:k]
        return rows

    # --- failures

    def record_failures(self, failures: Sequence[Failure]) -> None:
        if not failures:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO failures(source, item_id, reason, at) VALUES(?, ?, ?, ?)",
                [(failure.source, failure.item_id, failure.reason, time.time()) for failure in failures],
            )

    def failures(self) -> list[Failure]:
        return [Failure(row["source"], row["item_id"], row["reason"]) for row in self._query("SELECT * FROM failures ORDER BY source")]


def read_only_uri(path: Path) -> str:
    """How to open ``path`` writing nothing beside it: ``immutable=1`` (no lock, no -wal/-shm
    created), unless a write-ahead log holds commits not yet in the file (a writer is at work,
    or one was killed): then ``mode=ro``, which reads the log through its -shm, as SQLite must.
    An immutable store does not see later commits: ``reopen`` it when the file changes."""
    wal = path.with_name(path.name + "-wal")
    mode = "mode=ro" if wal.is_file() and wal.stat().st_size > 0 else "immutable=1"
    return f"{path.absolute().as_uri()}?{mode}"


def header_damage(path: Path) -> str | None:
    """Why the file at ``path`` cannot be a whole SQLite database, from its 100-byte header and
    its size alone (cheap on any size), or None. A file cut short is shorter than the page count
    its header records; with WAL, the main file only grows past it until a checkpoint."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    with path.open("rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "not an SQLite database (its header is not SQLite's)"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages = struct.unpack(">II", header[24:32])
    valid_for = struct.unpack(">I", header[92:96])[0]  # the page count is trusted only when this matches
    if page_size < 512 or page_size & (page_size - 1):
        return f"garbled header (page size {page_size})"
    if pages and valid_for == change_counter and size < pages * page_size:
        return f"cut short ({size} bytes, its header records {pages * page_size})"
    return None


def _blob(row: np.ndarray | bytes | str) -> bytes:
    if isinstance(row, str):  # words read from the image
        return row.encode("utf-8")
    return np.asarray(row, np.float32).tobytes() if isinstance(row, np.ndarray) else bytes(row)
