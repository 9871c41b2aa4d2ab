"""The Elasticsearch backend: a ``Catalog`` whose items, vectors and words live in one cluster index.

Vectors are searched with filtered kNN, words with a scored term query, and keypoints are
fetched for the candidates being verified only. What the cluster does not keep (the models
fitted on the catalog, the configuration, failures, run logs) lives in a state folder beside
the client: ``$CATALENS_ES_STATE`` or ``~/.cache/catalens/elasticsearch/<index>``. Point every
machine that searches the index at the same folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from catalens.indexer.catalog import Catalog, IndexUnavailableError, write_json_atomic
from catalens.indexer.config import IndexConfig, load_config
from catalens.indexer.files import file_stamp
from catalens.indexer.stores import ItemFilter, ItemUpdate
from catalens.indexer.stores.elastic.items import ElasticItemStore

log = logging.getLogger(__name__)

META_FILE = "catalens.json"
ELASTIC_SCHEMES = ("es+http://", "es+https://")


def parse_location(location: str) -> tuple[str, str]:
    """``es+http://host:9200/shop`` -> (``http://host:9200``, ``shop``); the index defaults to
    ``$CATALENS_ES_INDEX`` or ``catalens``."""
    if not location.startswith(ELASTIC_SCHEMES):
        raise ValueError(f"{location!r} is not an Elasticsearch location (es+http://host:port/index)")
    url = urlsplit(location[len("es+"):])
    index = url.path.strip("/") or os.environ.get("CATALENS_ES_INDEX", "catalens")
    if "/" in index:
        raise ValueError(f"{location!r}: the path names one index, not {index!r}")
    # Credentials of a secured cluster stay in the URL the client gets.
    return f"{url.scheme}://{url.netloc}", index


def elastic_location(url: str, index: str | None = None) -> str:
    """The location string of ``index`` on the cluster at ``url``."""
    index = index or os.environ.get("CATALENS_ES_INDEX", "catalens")
    return f"es+{url.rstrip('/')}/{index}"


def default_state_dir(index: str) -> Path:
    default = Path.home() / ".cache" / "catalens" / "elasticsearch" / index
    return Path(os.environ.get("CATALENS_ES_STATE", default))


class ElasticVectors:
    """``VectorStore`` over one ``dense_vector`` field of the index."""

    def __init__(self, items: ElasticItemStore, feature: str, dim: int):
        self.items, self.feature, self.dim = items, feature, dim

    @property
    def ntotal(self) -> int:
        return len(self.items.row_keys(self.feature))

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.items.put_rows(self.feature, {int(key): np.asarray(row, np.float32).tobytes() for key, row in zip(ids, x, strict=True)})

    def search(self, x: np.ndarray, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.items.knn(self.feature, x, k, filter)

    def remove(self, ids: np.ndarray) -> int:
        self.items.delete_rows(self.feature, [int(key) for key in ids])
        return len(ids)


class ElasticWordIndex:
    """``WordIndex`` over a local feature's ``<feature>_words`` / ``<feature>_vocab`` fields."""

    def __init__(self, items: ElasticItemStore, feature: str):
        self.items, self.feature = items, feature

    def search(self, words: np.ndarray, k: int, filter: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.items.word_candidates(self.feature, words, k, filter)

    def stale(self, vocabulary_id: str, changed: Collection[int] = ()) -> list[int]:
        # A re-extracted item was written whole with its words pending, so ``changed`` adds nothing.
        return sorted(self.items.keys_not_quantised(self.feature, vocabulary_id))

    def put(self, words: dict[int, np.ndarray], vocabulary_id: str) -> None:
        self.items.set_words(self.feature, words, vocabulary_id)


class ElasticCatalog(Catalog):
    """A catalog in an Elasticsearch index. Use ``open``, or the constructor with a store in tests."""

    backend = "elasticsearch"

    def __init__(self, items: ElasticItemStore, config: IndexConfig | None = None, state_dir: str | Path | None = None,
                 url: str = "http://localhost:9200"):
        state = Path(state_dir) if state_dir is not None else default_state_dir(items.index)
        state.mkdir(parents=True, exist_ok=True)
        items.state_dir = state
        meta_path = state / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"created": time.time()}
        if config is None:
            config = IndexConfig.from_json(meta["config"]) if "config" in meta else load_config()
        super().__init__(f"es+{url}/{items.index}", config, items, state / "models", meta)
        self.state_dir = state
        self._written = 0
        self._meta_stamp = file_stamp(meta_path)

    @classmethod
    def open(cls, location: str, config: IndexConfig | None = None, create: bool = False, **options: Any) -> ElasticCatalog:
        url, index = parse_location(location)
        items = ElasticItemStore.connect(url, index=index, **options)
        # An index keeps the configuration it was built with (features fitted since included);
        # ``config`` is the configuration of a new one.
        catalog = cls(items, url=url)
        try:
            if not create:
                if not items.exists():
                    raise IndexUnavailableError(f"{location}: no such Elasticsearch index (run 'catalens index "
                                                f"CATALOG --backend es' first)")
            elif "config" not in catalog.meta:
                catalog.config = config or load_config()
            elif config is not None and catalog.config.backbone != config.backbone:
                raise IndexUnavailableError(f"{location}: the index was built with backbone "
                                            f"{catalog.config.backbone!r}, not {config.backbone!r}; use another index")
        except IndexUnavailableError:
            catalog.close()
            raise
        return catalog

    # --- stores

    @property
    def generation(self) -> int:
        """Writes this process made (another process's writes are not seen: caches last a process)."""
        return self._written

    def dims(self) -> dict[str, int]:
        return self.items.dims()

    def vectors(self, feature: str) -> ElasticVectors:
        dims = self.dims()
        if feature not in dims:
            raise IndexUnavailableError(f"{self.location}: this index has no {feature!r} vectors")
        return ElasticVectors(self.items, feature, dims[feature])

    def words(self, feature: str) -> ElasticWordIndex:
        return ElasticWordIndex(self.items, feature)

    @property
    def logs_dir(self) -> Path:
        path = self.state_dir / "logs"
        path.mkdir(exist_ok=True)
        return path

    # --- writes

    def write(self, updates: Sequence[ItemUpdate]) -> list[int]:
        dims: dict[str, int] = {}
        local: set[str] = set()
        texts: set[str] = set()
        for update in updates:
            for name, row in update.rows.items():
                if isinstance(row, np.ndarray):
                    dims[name] = len(row)
                elif isinstance(row, str):
                    texts.add(name)
                else:
                    local.add(name)
        with self.lock:
            self.items.ensure_index(dims, sorted(local), text_features=sorted(texts))
            keys = self.items.write(updates)
            self._written += 1
        return keys

    def delete(self, ids: Sequence[str]) -> np.ndarray:
        self._written += 1
        return np.asarray(self.items.delete(ids), np.int64)

    def refresh(self, changed_keys: np.ndarray, removed_keys: np.ndarray) -> None:
        """Make the writes searchable, then bring what depends on the whole catalog in line: the
        upkeep finds the items it works on with searches, which see refreshed documents only."""
        if self.items.exists():
            self.items.refresh()
        super().refresh(changed_keys, removed_keys)

    def _prepare_replace(self, feature: str, dim: int, scalars: Sequence[str]) -> None:
        # A field keeps its dims: other dims are refused here, before the old rows are deleted.
        self.items.ensure_index({feature: dim}, (), scalars)

    def _reindex(self, feature: str) -> None:
        # The cluster indexes vectors as they are written: make them searchable now.
        self._written += 1
        self.items.refresh()

    def save(self) -> None:
        with self.lock:
            if self.items.exists():
                self.items.refresh()
            self.meta.update({"config": self.config.to_json(), "updated": time.time()})
            write_json_atomic(self.state_dir / META_FILE, self.meta)
            self._meta_stamp = file_stamp(self.state_dir / META_FILE)
            self._meta_saved()

    def catch_up(self, force: bool = False) -> bool:
        """Searches read the cluster itself; what another process changed in the shared state
        folder's catalens.json (a CLI ``finetune`` or ``train-ae``: the features it added, the record
        of the network) is taken in when the file changes. Returns whether it did."""
        path = self.state_dir / META_FILE
        if file_stamp(path) == self._meta_stamp or not self.lock.acquire(blocking=force):
            return False
        try:
            stamp = file_stamp(path)
            try:
                theirs = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                log.warning("%s: %s; keeping what this process knows", path, error)
                self._meta_stamp = stamp
                return False
            self._take_in_meta(theirs)
            self._meta_stamp = stamp
            return True
        finally:
            self.lock.release()

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["state"] = str(self.state_dir)
        return info

