"""A catalog's index on one backend: items, a vector store per global feature, words per local
feature, and the models fitted on the catalog.

``Catalog`` is what indexing, search, classification, anomaly scoring and training work on;
they never ask which backend is underneath (``catalens.indexer.stores.backends.open_catalog`` opens one).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from catalens.errors import UnavailableError
from catalens.indexer.config import IndexConfig
from catalens.indexer.features import (
    Feature,
    FeatureSpec,
    FeatureUnavailableError,
    feature_spec,
)
from catalens.indexer.files import atomic_path
from catalens.indexer.stores import ItemStore, ItemUpdate, VectorStore, WordIndex

log = logging.getLogger(__name__)

T = TypeVar("T")


class IndexUnavailableError(UnavailableError, RuntimeError):
    """An index that cannot be opened or used as asked; the message names it and what to do."""


class IndexDamagedError(IndexUnavailableError):
    """A file of the index is damaged beyond what can be rebuilt; the message names it and what to do."""


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))


class Catalog(ABC):
    """One catalog's index. Open one with ``open_catalog``.

    ``items`` is the item store (the source of truth); ``vectors(name)`` and ``words(name)``
    the backend's search structures; ``models_dir`` holds what was fitted on the catalog;
    ``meta`` what the index records about itself (``catalens.json``). Writers take ``lock``.
    """

    backend: str

    def __init__(self, location: str, config: IndexConfig, items: ItemStore, models_dir: Path, meta: dict[str, Any],
                 read_only: bool = False):
        self.location = location
        self.config = config
        self.items = items
        self.models_dir = Path(models_dir)
        self.read_only = read_only
        if not read_only:
            self.models_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.lock = threading.RLock()
        self._cache: dict[str, tuple[Any, Any]] = {}
        self._seen = self._shared_values()

    # --- metadata other processes write too (catalens.json)

    # Values that this process and others both change: the configuration (an explicit
    # ``--faiss-factory`` of this run; the features a training adds) and the record of the last
    # finetune (which network made the deep_ft rows; the match calibration digests it). The file's
    # wins unless this process changed its own since it last read or wrote the file.
    def _shared_values(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "adaptation": copy.deepcopy(self.meta.get("adaptation"))}

    def _set_shared(self, key: str, value: Any) -> None:
        if key == "config":
            self.config = IndexConfig.from_json(value)
        elif value is None:
            self.meta.pop(key, None)
        else:
            self.meta[key] = value

    def _take_in_meta(self, theirs: dict[str, Any]) -> None:
        """catalens.json as another process wrote it: what it knows that this process does not, and
        the shared values unless this process changed its own since it last read or wrote the file."""
        for key, value in theirs.items():
            self.meta.setdefault(key, value)
        for key, value in self._shared_values().items():
            if value == self._seen.get(key) and (key != "config" or theirs.get("config")):
                self._set_shared(key, theirs.get(key))
        self._meta_saved()

    def _meta_saved(self) -> None:
        """After this process read or wrote catalens.json: what it holds now is what the file holds."""
        self._seen = self._shared_values()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"

    # --- the backend's stores

    @abstractmethod
    def vectors(self, feature: str) -> VectorStore:
        """The vector store of a global feature (``IndexUnavailableError`` if the index has none)."""

    @abstractmethod
    def words(self, feature: str) -> WordIndex:
        """The word index of a local feature."""

    @abstractmethod
    def dims(self) -> dict[str, int]:
        """Dimension of every global feature the index holds vectors of."""

    @property
    @abstractmethod
    def generation(self) -> int:
        """Changes whenever the catalog is written: what ``cached`` results are checked against."""

    @property
    def logs_dir(self) -> Path:
        path = self.models_dir.parent / "logs"
        path.mkdir(exist_ok=True)
        return path

    # --- writes

    @abstractmethod
    def write(self, updates: Sequence[ItemUpdate]) -> list[int]:
        """Items with their feature rows, durably, and into the vector stores; returns their keys."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> np.ndarray:
        """Remove items from every store, durably, without the upkeep ``remove`` adds; returns their keys."""

    @abstractmethod
    def _prepare_replace(self, feature: str, dim: int, scalars: Sequence[str]) -> None:
        """Before a feature's rows are replaced: forget the old vectors, set up ``dim`` (and the scalars)."""

    @abstractmethod
    def _reindex(self, feature: str) -> None:
        """After a feature's rows were replaced: make them searchable."""

    @abstractmethod
    def save(self) -> None:
        """Make everything written durable and searchable, and record the index's metadata."""

    def close(self) -> None:
        self.items.close()

    def catch_up(self, force: bool = False) -> bool:
        """Take in what other processes wrote to this index since this one last looked (a
        long-running server calls this for each request); returns whether anything changed.
        A backend whose searches read the shared store itself has nothing to do."""
        return False

    def remove(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Delete ``ids`` from every store durably; returns (removed, not found)."""
        ids = list(dict.fromkeys(ids))
        with self.lock:
            found = [item_id for item_id in ids if self.items.item_by_id(item_id) is not None]
            missing = [item_id for item_id in ids if item_id not in found]
            if found:
                keys = self.delete(found)
                self.refresh(np.zeros(0, np.int64), keys)
                self.save()
        return found, missing

    def replace_feature(self, feature: str, keys: Sequence[int], rows: np.ndarray,
                        scalars: dict[str, np.ndarray] | None = None,
                        committed: Callable[[], None] | None = None) -> None:
        """Every item's ``feature`` row replaced (and one value a key of each ``scalars`` entry),
        the vectors re-indexed: what a model fitted on the whole catalog does once it has
        re-coded every item. ``committed`` is called once the rows are durable, before the
        derived files (vector indexes, metadata) are written."""
        scalars = scalars or {}
        with self.lock:
            self._prepare_replace(feature, int(rows.shape[1]), list(scalars))
            replaced = {feature: {int(key): rows[i].astype(np.float32).tobytes() for i, key in enumerate(keys)}}
            for name, values in scalars.items():
                replaced[name] = {int(key): np.float32(values[i]).tobytes() for i, key in enumerate(keys)}
            self.items.replace_rows(replaced, dims={feature: int(rows.shape[1])})
            if committed is not None:
                committed()
            self._reindex(feature)
            self.save()

    def refresh(self, changed_keys: np.ndarray, removed_keys: np.ndarray) -> None:
        """Bring what depends on the whole catalog (visual words...) in line after writes."""
        for spec in self.feature_specs():
            if spec.refresh is not None:
                spec.refresh(self, changed_keys, removed_keys)

    # --- features

    def feature_specs(self) -> list[FeatureSpec]:
        """The registry entries of the configured features, in configuration order."""
        return [feature_spec(name) for name in self.config.features]

    def feature(self, name: str) -> Feature:
        """The built feature ``name`` (cached; rebuilt when its fitted model changes).

        Raises ``FeatureUnavailableError`` where a fitted model it needs is missing, and
        ``ModelFileError`` where its stored file does not load.
        """
        spec = feature_spec(name)
        stamp: Any = "static"
        if spec.model is not None:
            # The model itself tells one fit from another: a new fit is a new object.
            stamp = spec.model.require(self, FeatureUnavailableError(
                f"{name}: no model fitted for this index yet (run '{spec.fitted_by or 'the training command'}')"))
        return self.cached(f"feature:{name}", lambda: spec.build(self), stamp=stamp)

    def stored_descriptors(self, name: str, keys: Iterable[int]) -> dict[int, Any]:
        """The stored descriptors of the local feature ``name`` of each of ``keys`` that has them,
        decoded (geometric verification reads them)."""
        feature = self.feature(name)
        return {key: feature.decode(blob) for key, blob in self.items.rows(name, [int(k) for k in keys]).items()}

    def features(self) -> list[Feature]:
        """Every configured feature this catalog can compute now; one whose model is missing is
        skipped with a warning (items get it once the model is fitted again)."""
        built = []
        for spec in self.feature_specs():
            try:
                built.append(self.feature(spec.name))
            except FeatureUnavailableError as error:
                log.warning("%s: %s", self.location, error)
        return built

    def enable_feature(self, name: str) -> None:
        """Add a feature to the configuration (a model fitted for it now exists) and save."""
        if name not in self.config.features:
            self.config.features = [*self.config.features, name]
            self.save()

    def global_features(self) -> list[str]:
        """Names of the configured global features this index holds vectors of."""
        dims = self.dims()
        return [spec.name for spec in self.feature_specs() if spec.kind == "global" and spec.name in dims]

    def local_features(self) -> list[str]:
        return [spec.name for spec in self.feature_specs() if spec.kind == "local"]

    def text_features(self) -> list[str]:
        """Names of the configured features that read words from images."""
        return [spec.name for spec in self.feature_specs() if spec.kind == "text"]

    # --- caches for what is derived from the catalog (classifier, inverted file, built features)

    def cached(self, name: str, build: Callable[[], T], stamp: Any = None) -> T:
        """``build()``, kept until ``stamp`` changes (by default: until the catalog is written)."""
        with self.lock:
            stamp = self.generation if stamp is None else stamp
            entry = self._cache.get(name)
            if entry is None or entry[0] != stamp:
                entry = (stamp, build())
                self._cache[name] = entry
            return entry[1]

    # --- reporting

    def info(self) -> dict[str, Any]:
        return {
            "index": self.location,
            "backend": self.backend,
            "items": self.items.count(),
            "categories": len(self.items.categories()),
            "failures": len(self.items.failures()),
            "backbone": self.config.backbone,
            "features": list(self.config.features),
            "dims": self.dims(),
            "created": self.meta.get("created"),
            "updated": self.meta.get("updated"),
        }
