"""The folder backend: one catalog's index in one directory, for one machine.

Layout of ``DIR``::

    catalens.json    format version, configuration, dimensions, counts, times
    items.sqlite     items, categories, feature rows, visual words, failures (the source of truth)
    <feature>.faiss  one vector index per global feature, rebuilt from SQLite when stale
    models/          what was fitted on the catalog (vocabulary, autoencoder, fine-tuned network)
    logs/            one log a day of indexing runs and HTTP writes
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from catalens.indexer import files
from catalens.indexer.catalog import (
    Catalog,
    IndexDamagedError,
    IndexUnavailableError,
    write_json_atomic,
)
from catalens.indexer.config import IndexConfig
from catalens.indexer.features import feature_spec, list_features
from catalens.indexer.stores import ItemUpdate, vectors_of
from catalens.indexer.stores.faiss_vectors import FaissVectorStore
from catalens.indexer.stores.inverted_file import SqliteWordIndex
from catalens.indexer.stores.sqlite_items import ItemStoreDamagedError, SqliteItemStore

log = logging.getLogger(__name__)

# 2: items keyed by item_key(id) (1 numbered them), words as item rows, one file per fitted model.
FORMAT_VERSION = 2
META_FILE = "catalens.json"
ITEMS_FILE = "items.sqlite"
# Held by a process while it saves FAISS files and catalens.json (``save``).
LOCK_FILE = "catalens.lock"
# How often an open catalog looks for what other processes wrote (``catch_up``): a server sees
# a CLI's writes within about this long, and a search pays one SQLite pragma and one stat a second.
CATCH_UP_SECONDS = 1.0


def _looks_like_a_catalog(root: Path) -> bool:
    """Whether ``root`` holds photos or a JSONL manifest (within two levels): a catalog passed as
    ``--index``, which an index run would litter rather than read."""
    from catalens.datasets.catalog import IMAGE_SUFFIXES

    if not root.is_dir():
        return False
    for pattern in ("*", "*/*", "*/*/*"):
        for path in root.glob(pattern):
            if path.suffix.lower() in IMAGE_SUFFIXES or path.suffix.lower() == ".jsonl":
                return True
    return False


class FolderCatalog(Catalog):
    """SQLite items, FAISS vectors and inverted files in one folder. Use ``open`` / ``create``."""

    backend = "folder"

    def __init__(self, root: Path, config: IndexConfig, meta: dict[str, Any], create: bool = False,
                 read_only: bool = False):
        self.root = Path(root)
        if read_only and meta.get("format_version", 1) < FORMAT_VERSION:
            raise IndexUnavailableError(f"{self.root}: written by an older catalens; open it once writable (any "
                                        "command but a read-only serve) to upgrade it")
        try:
            items = SqliteItemStore(self.root / ITEMS_FILE, create=create and not read_only, read_only=read_only)
        except ItemStoreDamagedError as error:
            recorded = meta.get("counts", {}).get("items", "?")
            raise IndexDamagedError(
                f"{error}; catalens.json records {recorded} items: restore {ITEMS_FILE} from a backup, "
                f"or index the catalog again into a new folder") from None
        super().__init__(str(self.root), config, items, self.root / "models", meta, read_only=read_only)
        files.hold(self.root, read_only)
        self._vectors: dict[str, FaissVectorStore] = {}
        self.meta["dims"] = self._committed_dims()
        # What this process last saw of other writers: SQLite's data_version (which only other
        # connections' commits change), catalens.json's stamp, and the shared values it held.
        self._data_version = self._store_version()
        self._meta_stamp = files.file_stamp(self.root / META_FILE)
        self._caught_up = time.monotonic()
        if meta.get("format_version", 1) < FORMAT_VERSION:
            self._upgrade()

    # --- opening

    @classmethod
    def create(cls, root: str | Path, config: IndexConfig) -> FolderCatalog:
        root = Path(root)
        if (root / META_FILE).exists():
            raise IndexUnavailableError(f"{root}: an index already exists here")
        root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        meta = {"format_version": FORMAT_VERSION, "config": config.to_json(), "dims": {}, "faiss_generation": {},
                "counts": {"items": 0}, "created": now, "updated": now}
        write_json_atomic(root / META_FILE, meta)
        return cls(root, config, meta, create=True)

    @classmethod
    def open(cls, root: str | Path, read_only: bool = False) -> FolderCatalog:
        """The index at ``root``; ``read_only``: without writing anything into its folder (a
        read-only server; always on a read-only filesystem, where reading commands still work)."""
        root = Path(root)
        read_only = read_only or _on_read_only_filesystem(root)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            if _looks_like_a_catalog(root):
                suggested = f"{root.resolve().name or 'catalog'}-index"
                raise IndexUnavailableError(
                    f"{root} is a catalog (photos or a manifest), not an index: index it with 'catalens index {root} "
                    f"--index {suggested}', then use --index {suggested}")
            raise IndexUnavailableError(f"{root}: no catalens index here (run 'catalens index CATALOG --index {root}')")
        meta = _read_meta(meta_path)
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise IndexUnavailableError(
                f"{root}: index format {meta['format_version']} is newer than this catalens ({FORMAT_VERSION})")
        # A run killed between writing catalens.json and creating items.sqlite left an index of
        # no items: only then may a missing or empty item store start afresh.
        never_written = not meta.get("counts", {}).get("items") and not meta.get("dims")
        items_path = root / ITEMS_FILE
        create = never_written and (not items_path.exists() or items_path.stat().st_size == 0)
        return cls(root, IndexConfig.from_json(meta.get("config", {})), meta, create=create, read_only=read_only)

    @classmethod
    def open_or_create(cls, root: str | Path, config: IndexConfig) -> FolderCatalog:
        """The index at ``root`` with its own configuration, or a new one with ``config``
        (``catalens.indexer.stores.backends.open_for_indexing`` says what ``config`` does to an existing one)."""
        root = Path(root)
        if not (root / META_FILE).exists():
            return cls.create(root, config)
        if _on_read_only_filesystem(root):
            raise IndexUnavailableError(f"{root}: on a read-only filesystem; nothing can be written to this index")
        return cls.open(root)

    def reconfigure(self, config: IndexConfig) -> None:
        """Run with ``config`` from now on (saved with the index by ``save``). A new FAISS factory
        or search parameters take effect by rebuilding every vector index from the stored rows,
        at the latest when the run saves."""
        with self.lock:
            rebuild = config.faiss_factory != self.config.faiss_factory
            reload = rebuild or config.faiss_search_params != self.config.faiss_search_params
            self.config = config
            if reload:
                self._vectors.clear()
            if rebuild:
                self.meta["faiss_generation"] = {}

    def _upgrade(self) -> None:
        """A format-1 index: the item store re-keyed itself on open; what was derived from the old
        keys (FAISS files, visual words) is derived again, and models saved in the old file
        format are named so they can be fitted again."""
        log.warning("%s: upgrading the index from format %s to %s", self.root, self.meta.get("format_version", 1),
                    FORMAT_VERSION)
        for feature in list(self.meta.get("dims", {})):
            (self.root / f"{feature}.faiss").unlink(missing_ok=True)
        self.meta["faiss_generation"] = {}
        stale = [name for name in ("local_vocab.npz", "local_words.npz", "autoencoder.pt", "top_block.pt",
                                   "projection.pt", "projection.json") if (self.models_dir / name).exists()]
        for name in stale:
            (self.models_dir / name).rename(self.models_dir / f"{name}.format1")
        if any(name in stale for name in ("autoencoder.pt", "top_block.pt", "projection.pt")):
            log.warning("%s: models from the previous format were set aside (models/*.format1); fit them again "
                        "with 'catalens train-ae' / 'catalens finetune'", self.root)
        self.config.features = [name for name in self.config.features if name in ("deep", "colour", "sift", "style")]
        self.meta["format_version"] = FORMAT_VERSION
        self.refresh(np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.save()

    # --- stores

    @property
    def generation(self) -> int:
        return self.items.generation

    def dims(self) -> dict[str, int]:
        return dict(self.meta["dims"])

    def _committed_dims(self) -> dict[str, int]:
        """The dims ``items.sqlite`` committed with the rows (``catalens.json`` is rewritten only
        after them: a run killed in between left it without them), else derived from one stored
        row of each global feature (an index written before the store kept them)."""
        dims = {**self.meta.get("dims", {}), **self.items.dims()}
        for name in list_features():
            if name not in dims and feature_spec(name).kind == "global":
                width = self.items.row_width(name)
                if width:
                    dims[name] = width // np.dtype(np.float32).itemsize
        return dims

    def catch_up(self, force: bool = False) -> bool:
        """Take in what other processes (a CLI run, another server) committed to this index since
        this one last looked, at most once every ``CATCH_UP_SECONDS`` unless ``force``: their
        dims and configuration, and vector indexes reloaded (from their files where those are
        current, else from ``items.sqlite``) when next used. Returns whether anything changed.
        Caches of what is derived from the catalog follow by themselves: they are keyed by the
        generation, which every commit bumps."""
        now = time.monotonic()
        if not force and now - self._caught_up < CATCH_UP_SECONDS:
            return False
        # A write of this process holds the lock: look next time rather than make a request
        # (/health...) wait for it; the write's own save catches up.
        if not self.lock.acquire(blocking=force):
            return False
        try:
            self._caught_up = now
            version, stamp = self._store_version(), files.file_stamp(self.root / META_FILE)
            if version == self._data_version and stamp == self._meta_stamp:
                return False
            if self.read_only and version[1:] != self._data_version[1:]:
                self.items.reopen()
                version = self._store_version()
            if stamp != self._meta_stamp:
                self._adopt_meta()
            self._data_version, self._meta_stamp = version, stamp
            self.meta["dims"] = self._committed_dims()
            self._vectors.clear()
            log.info("%s: changed by another process; vector indexes reload", self.root)
            return True
        finally:
            self.lock.release()

    def _adopt_meta(self) -> None:
        """catalens.json as another process wrote it: its record of the FAISS files, what it
        knows that this process does not, and its configuration unless this process changed its
        own since it last read it (an explicit ``--faiss-factory`` of this run wins)."""
        try:
            theirs = _read_meta(self.root / META_FILE)
        except (IndexDamagedError, OSError) as error:
            log.warning("%s: %s; keeping what this process knows", self.root / META_FILE, error)
            return
        for key in ("faiss_generation", "faiss_built"):
            self.meta[key] = dict(theirs.get(key, {}))
        self._take_in_meta(theirs)

    def _store_version(self) -> tuple[Any, ...]:
        """What changes when another process commits: SQLite's data_version, and for a read-only
        store (which may be open immutable, blind to commits) the files' stamps."""
        if not self.read_only:
            return (self.items.data_version(),)
        path = self.root / ITEMS_FILE
        return self.items.data_version(), files.file_stamp(path), files.file_stamp(path.with_name(ITEMS_FILE + "-wal"))

    def close(self) -> None:
        super().close()
        files.release(self.root, self.read_only)

    @contextmanager
    def _one_saver(self) -> Iterator[None]:
        """Hold the index's lock file: two processes saving at once could leave one's FAISS file
        under the other's generation in catalens.json."""
        with open(self.root / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def set_dim(self, feature: str, dim: int) -> None:
        known = self.meta["dims"].get(feature)
        if known is not None and known != dim:
            raise IndexUnavailableError(f"{self.root}: feature {feature!r} has {known} dims here, not {dim}")
        self.meta["dims"][feature] = dim

    def vectors(self, feature: str) -> FaissVectorStore:
        """The FAISS index of ``feature``, loaded, or rebuilt from SQLite if it is stale or damaged."""
        with self.lock:
            if feature not in self._vectors:
                self.load_vectors(feature)
            return self._vectors[feature]

    def load_vectors(self, feature: str) -> str | None:
        """Load ``feature``'s FAISS index, rebuilding it from SQLite where it is missing, older than
        SQLite, does not load or does not match; returns why it was rebuilt (None: it loaded). A
        damaged file is one warning, since a crash explains a stale one but not a damaged one."""
        with self.lock:
            dim = self.meta["dims"].get(feature)
            if dim is None:
                raise IndexUnavailableError(f"{self.root}: this index has no {feature!r} vectors")
            path = self.root / f"{feature}.faiss"
            if not path.is_file():
                store, why = None, "missing"
            elif self.meta["faiss_generation"].get(feature) != self.generation:
                store, why = None, f"older than {ITEMS_FILE}"
            else:
                store, why = self._load_vectors(feature, dim)
                if why:
                    log.warning("%s: %s; rebuilt from %s in memory (run 'catalens check --index %s' to save it)",
                                path, why, ITEMS_FILE, self.root)
            self._vectors[feature] = store if store is not None else self._rebuild(feature, dim)
            return why

    def _load_vectors(self, feature: str, dim: int) -> tuple[FaissVectorStore | None, str | None]:
        """``feature``'s FAISS file if it loads and holds exactly the stored rows, else (None, why not)."""
        path = self.root / f"{feature}.faiss"
        try:
            store = FaissVectorStore.load(path, self.config.faiss_factory, search_params=self.config.faiss_search_params)
        except (RuntimeError, ValueError, MemoryError) as error:
            return None, f"does not load ({_faiss_reason(error)})"
        rows = self.items.row_count(feature)
        if store.dim != dim or store.ntotal != rows:
            return None, f"does not match {ITEMS_FILE} ({store.ntotal} vectors of {store.dim} dims, {rows} rows of {dim})"
        return store, None

    def _rebuild(self, feature: str, dim: int) -> FaissVectorStore:
        keys, rows = vectors_of(self.items, feature, dim)
        log.info("rebuilding %s.faiss from %d stored vectors", feature, len(keys))
        store = self._new_vector_store(dim, len(keys))
        if not store.is_trained:
            store.train(rows)
        store.add(keys, rows)
        return store

    def _new_vector_store(self, dim: int, expected_rows: int) -> FaissVectorStore:
        factory = self.config.faiss_factory
        store = FaissVectorStore(dim, factory, search_params=self.config.faiss_search_params)
        if not store.is_trained and expected_rows < _rows_to_train(factory):
            log.warning("faiss %r needs more rows to train than the %d here; using Flat", factory, expected_rows)
            store = FaissVectorStore(dim, "Flat")
        return store

    def words(self, feature: str) -> SqliteWordIndex:
        return SqliteWordIndex(self.items, feature, self.cached)

    # --- writes

    def _check_writable(self) -> None:
        if self.read_only:
            raise IndexUnavailableError(f"{self.root}: opened read-only (a read-only server or filesystem); "
                                        "nothing is written to it")

    def write(self, updates: Sequence[ItemUpdate]) -> list[int]:
        self._check_writable()
        vectors: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        with self.lock:
            for update in updates:
                for name, row in update.rows.items():
                    if isinstance(row, np.ndarray):
                        self.set_dim(name, len(row))
            keys = self.items.write(updates)
            for key, update in zip(keys, updates, strict=True):
                for name, row in update.rows.items():
                    if isinstance(row, np.ndarray):
                        vectors.setdefault(name, ([], []))[0].append(key)
                        vectors[name][1].append(row)
            # SQLite has committed; FAISS follows in memory and is saved by ``save`` (a crash
            # before that is repaired from SQLite when the index is next opened).
            for name, (added, rows) in vectors.items():
                store = self.vectors(name)
                store.remove(np.asarray(added, np.int64))
                if store.is_trained:
                    store.add(np.asarray(added, np.int64), np.stack(rows))
        return keys

    def delete(self, ids: Sequence[str]) -> np.ndarray:
        self._check_writable()
        keys = np.asarray(self.items.delete(ids), np.int64)
        for feature in list(self.meta["dims"]):
            self.vectors(feature).remove(keys)
        return keys

    def _prepare_replace(self, feature: str, dim: int, scalars: Sequence[str]) -> None:
        self._check_writable()
        self._vectors.pop(feature, None)
        self.meta["faiss_generation"].pop(feature, None)
        (self.root / f"{feature}.faiss").unlink(missing_ok=True)
        self.meta["dims"][feature] = dim

    def _reindex(self, feature: str) -> None:
        self._vectors[feature] = self._rebuild(feature, self.meta["dims"][feature])

    def save(self) -> None:
        """Write every loaded FAISS index and the metadata file, each atomically.

        An index type that needs training (IVF) is trained on all stored rows first; so is one
        that stood in for it (exact search, while the catalog was too small to train it) once the
        catalog is large enough. A vector index whose configuration changed is rebuilt now.
        """
        self._check_writable()
        with self.lock, self._one_saver():
            # Read before looking for other writers: if one commits after this, the files are
            # stamped older than they are (rebuilt once more), never newer (trusted wrongly).
            generation = self.generation
            self.catch_up(force=True)
            for feature in self.meta["dims"]:
                if feature not in self._vectors and feature not in self.meta["faiss_generation"]:
                    self.vectors(feature)
            wanted = self.config.faiss_factory
            for feature, store in list(self._vectors.items()):
                if not store.is_trained or (store.factory != wanted and store.ntotal >= _rows_to_train(wanted)):
                    self._vectors[feature] = store = self._rebuild(feature, self.meta["dims"][feature])
            for feature, store in self._vectors.items():
                store.save(self.root / f"{feature}.faiss")
                self.meta["faiss_generation"][feature] = generation
                self.meta.setdefault("faiss_built", {})[feature] = store.factory
            self.meta["counts"] = {"items": self.items.count(), "failures": len(self.items.failures())}
            self.meta["updated"] = time.time()
            self.meta["config"] = self.config.to_json()
            write_json_atomic(self.root / META_FILE, self.meta)
            self._meta_stamp = files.file_stamp(self.root / META_FILE)
            self._meta_saved()

    @property
    def logs_dir(self) -> Path:
        path = self.root / "logs"
        path.mkdir(exist_ok=True)
        return path

    def info(self) -> dict[str, Any]:
        """What ``Catalog.info`` says, with the FAISS index type really built (``faiss_factory``;
        ``faiss_configured`` too where the catalog is still too small to train the configured
        one) and the size on disk."""
        info = super().info()
        built = {self.meta.get("faiss_built", {}).get(feature, self.config.faiss_factory) for feature in self.dims()}
        info["faiss_factory"] = ", ".join(sorted(built)) if built else self.config.faiss_factory
        if built and built != {self.config.faiss_factory}:
            info["faiss_configured"] = self.config.faiss_factory
            if _rows_to_train(self.config.faiss_factory):
                info["faiss_note"] = (f"{self.config.faiss_factory} needs {_rows_to_train(self.config.faiss_factory)} "
                                      "items to train; exact search until the catalog has them")
        info["size_bytes"] = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return info


def _faiss_reason(error: Exception) -> str:
    """The cause in a faiss error, without the C++ location it starts with."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if "read error" in text:
        return "cut short: " + text.rsplit("read error", 1)[1].split(": ", 1)[-1].split(" (")[0] + " bytes read/expected"
    return text.rsplit(": ", 1)[-1][:120]


def _on_read_only_filesystem(root: Path) -> bool:
    try:
        return bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _read_meta(path: Path) -> dict[str, Any]:
    """``catalens.json``, checked to be an index's metadata (``IndexDamagedError`` naming the file if not)."""
    fix = "restore it from a backup, or index the catalog again into a new folder"
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexDamagedError(f"{path}: unreadable index metadata ({error}); {fix}") from None
    if not isinstance(meta, dict):
        raise IndexDamagedError(f"{path}: not index metadata (a JSON {type(meta).__name__}, not an object); {fix}")
    for key, kind in (("config", dict), ("dims", dict), ("faiss_generation", dict), ("counts", dict)):
        if not isinstance(meta.setdefault(key, kind()), kind):
            raise IndexDamagedError(f"{path}: '{key}' is not a JSON object; {fix}")
    return meta


def _rows_to_train(factory: str) -> int:
    """How many rows a factory needs before it is trained (faiss warns below 39 per IVF cell)."""
    return 40 * _nlist(factory)


def _nlist(factory: str) -> int:
    """The number of coarse cells an IVF factory string asks for (0 for untrained kinds)."""
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            return int(digits) if digits else 0
    return 0
