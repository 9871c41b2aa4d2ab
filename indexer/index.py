"""An index directory: SQLite items and features, FAISS files derived from them, a metadata file.

Layout of ``DIR``::

    catalens.json    format version, configuration, dimensions, counts, times
    items.sqlite     items, categories, feature blobs, failures (the source of truth)
    <feature>.faiss  one vector index per global feature, rebuilt from SQLite when stale
    models/          what was fitted on the catalog (vocabulary, autoencoder, heads)
    logs/            one log per indexing run
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from indexer.config import IndexConfig
from indexer.metadata import MetadataStore
from indexer.vector_store import FaissVectorStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "catalens.json"


class IndexUnavailableError(RuntimeError):
    """An index directory that cannot be opened or used as asked."""


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CatalogIndex:
    """One catalog's index. Use ``CatalogIndex.open`` / ``CatalogIndex.create``."""

    def __init__(self, root: Path, config: IndexConfig, meta: dict[str, Any]):
        self.root = root
        self.config = config
        self.meta = meta
        self.store = MetadataStore(root / "items.sqlite")
        self.models_dir = root / "models"
        self.models_dir.mkdir(exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        self._vectors: dict[str, FaissVectorStore] = {}
        # Writers take this lock; searches read a consistent snapshot under it.
        self.lock = threading.RLock()
        self._cache: dict[str, Any] = {}
        self._deep_extractor = None

    # --- opening

    @classmethod
    def create(cls, root: str | Path, config: IndexConfig) -> CatalogIndex:
        root = Path(root)
        if (root / META_FILE).exists():
            raise IndexUnavailableError(f"{root}: an index already exists here")
        root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config.to_json(),
            "dims": {},
            "faiss_generation": {},
            "counts": {"items": 0},
            "created": now,
            "updated": now,
        }
        write_json_atomic(root / META_FILE, meta)
        return cls(root, config, meta)

    @classmethod
    def open(cls, root: str | Path) -> CatalogIndex:
        root = Path(root)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise IndexUnavailableError(f"{root}: no catalens index here (run 'catalens index CATALOG --index {root}')")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise IndexUnavailableError(f"{meta_path}: unreadable index metadata ({error})") from None
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise IndexUnavailableError(f"{root}: index format {meta['format_version']} is newer than this catalens ({FORMAT_VERSION})")
        return cls(root, IndexConfig.from_json(meta.get("config", {})), meta)

    @classmethod
    def open_or_create(cls, root: str | Path, config: IndexConfig) -> CatalogIndex:
        root = Path(root)
        if (root / META_FILE).exists():
            index = cls.open(root)
            if index.config.backbone != config.backbone:
                raise IndexUnavailableError(
                    f"{root}: index was built with backbone {index.config.backbone!r}, not {config.backbone!r}; "
                    "use another --index folder"
                )
            return index
        return cls.create(root, config)

    def close(self) -> None:
        self.store.close()

    # --- global-feature vector indexes

    def set_dim(self, feature: str, dim: int) -> None:
        known = self.meta["dims"].get(feature)
        if known is not None and known != dim:
            raise IndexUnavailableError(f"{self.root}: feature {feature!r} has {known} dims here, not {dim}")
        self.meta["dims"][feature] = dim

    def vector_store(self, feature: str) -> FaissVectorStore:
        """The FAISS index of ``feature``, loaded, or rebuilt from SQLite if it is stale."""
        with self.lock:
            if feature in self._vectors:
                return self._vectors[feature]
            dim = self.meta["dims"].get(feature)
            if dim is None:
                raise IndexUnavailableError(f"{self.root}: this index has no {feature!r} vectors")
            path = self.root / f"{feature}.faiss"
            generation = self.store.generation
            if path.exists() and self.meta["faiss_generation"].get(feature) == generation:
                store = FaissVectorStore.load(path, self.config.faiss_factory, search_params=self.config.faiss_search_params)
            else:
                store = self.rebuild_vector_store(feature, dim)
            self._vectors[feature] = store
            return store

    def rebuild_vector_store(self, feature: str, dim: int) -> FaissVectorStore:
        keys, rows = self.store.vectors(feature, dim)
        log.info("rebuilding %s.faiss from %d stored vectors", feature, len(keys))
        store = self.new_vector_store(dim, len(keys))
        if not store.is_trained:
            store.train(rows)
        store.add(keys, rows)
        return store

    def new_vector_store(self, dim: int, expected_rows: int) -> FaissVectorStore:
        factory = self.config.faiss_factory
        store = FaissVectorStore(dim, factory, search_params=self.config.faiss_search_params)
        if not store.is_trained and expected_rows < 40 * _nlist(factory):
            log.warning("faiss %r needs more rows to train than the %d here; using Flat", factory, expected_rows)
            store = FaissVectorStore(dim, "Flat")
        return store

    def replace_vector_store(self, feature: str, store: FaissVectorStore) -> None:
        with self.lock:
            self._vectors[feature] = store

    def drop_vector_store(self, feature: str) -> None:
        with self.lock:
            self._vectors.pop(feature, None)
            self.meta["dims"].pop(feature, None)
            self.meta["faiss_generation"].pop(feature, None)
            (self.root / f"{feature}.faiss").unlink(missing_ok=True)

    def save(self) -> None:
        """Write every loaded FAISS index and the metadata file, each atomically."""
        with self.lock:
            generation = self.store.generation
            for feature, store in self._vectors.items():
                store.save(self.root / f"{feature}.faiss")
                self.meta["faiss_generation"][feature] = generation
            self.meta["counts"] = {"items": self.store.count(), "failures": len(self.store.failures())}
            self.meta["updated"] = time.time()
            self.meta["config"] = self.config.to_json()
            write_json_atomic(self.root / META_FILE, self.meta)

    def local_index(self):
        """The visual vocabulary and inverted file (``indexer.local.LocalIndex``), or None."""
        from indexer.local import load_local_index

        return load_local_index(self)

    # --- what extracts features for this index (built once per process)

    def deep_extractor(self):
        from indexer.deep import DeepFeatureExtractor

        with self.lock:
            if self._deep_extractor is None:
                self._deep_extractor = DeepFeatureExtractor(
                    self.config.backbone, runtime=self.config.runtime, batch_size=self.config.batch_size
                )
            return self._deep_extractor

    # --- caches for things fitted on the catalog (vocabulary, classifier...), dropped on writes

    def cached(self, name: str, build):
        with self.lock:
            stamp = (self.store.generation, name)
            entry = self._cache.get(name)
            if entry is None or entry[0] != stamp:
                entry = (stamp, build())
                self._cache[name] = entry
            return entry[1]

    # --- reporting

    def info(self) -> dict[str, Any]:
        size = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return {
            "index": str(self.root),
            "items": self.store.count(),
            "categories": len(self.store.categories()),
            "failures": len(self.store.failures()),
            "backbone": self.config.backbone,
            "dims": dict(self.meta["dims"]),
            "faiss_factory": self.config.faiss_factory,
            "size_bytes": size,
            "created": self.meta.get("created"),
            "updated": self.meta.get("updated"),
        }


def _nlist(factory: str) -> int:
    """The number of coarse cells an IVF factory string asks for (0 for untrained kinds)."""
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            return int(digits) if digits else 0
    return 0
