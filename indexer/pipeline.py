"""Indexing runs: bring an index in line with a catalog, incrementally, durably, resumably.

Only new and changed images are decoded; removed items are deleted; a bad file is recorded and
skipped. Every ``commit_every`` images the work done is committed to SQLite in one transaction,
so a run killed at any point loses at most that batch, and the next run picks up from there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from datasets.catalog import CatalogItem, load_catalog
from indexer.config import IndexConfig, load_config
from indexer.features import GlobalFeature, extensions, iter_prepared
from indexer.index import CatalogIndex
from indexer.metadata import ItemRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    source: str
    item_id: str | None
    reason: str


@dataclass
class IndexReport:
    """What one indexing run did."""

    index: str
    added: int = 0
    updated: int = 0
    metadata_updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    extracted: int = 0
    log_path: str = ""

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds else 0.0


def file_fingerprint(path: Path) -> str | None:
    """Size and modification time: cheap to read for a million files, changes when a file does."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def features_for(index: Any) -> list:
    """What indexing extracts from each image: the deep feature, then each extension's.

    ``index`` is a ``CatalogIndex`` or an ``indexer.elastic.ElasticIndexView``: both backends
    index the same features (local keypoints, colour, autoencoder codes once a model exists).
    """
    features = [index.deep_extractor()]
    for extension in extensions():
        features.extend(extension.features(index))
    return features


def complete_keys(store: Any, features: list) -> set[int]:
    """Keys of the stored items that hold every one of ``features`` (a ``feature_keys`` store)."""
    return set.intersection(*(store.feature_keys(feature.name) for feature in features)) if features else set()


@dataclass
class RunPlan:
    """What a run does with each catalog item: ``extract`` and ``metadata_only`` are (item, fingerprint)."""

    extract: list[tuple[CatalogItem, str]] = field(default_factory=list)
    metadata_only: list[tuple[CatalogItem, str]] = field(default_factory=list)
    missing: list[Failure] = field(default_factory=list)
    unchanged: int = 0


def plan_run(items: list[CatalogItem], existing: Mapping[str, ItemRecord], complete: Container[int]) -> RunPlan:
    """Sort the catalog into new or changed images, metadata-only changes, unchanged and missing files.

    ``existing`` is the stored records by id; ``complete`` the keys of those holding every
    configured feature. An item indexed before a feature was configured (or added to catalens)
    lacks it and is extracted again, so an upgraded index fills in on its next run instead of
    staying half-built.
    """
    plan = RunPlan()
    for item in items:
        fingerprint = file_fingerprint(item.image)
        if fingerprint is None:
            plan.missing.append(Failure(str(item.image), item.id, f"{item.image}: file not found"))
            continue
        record = existing.get(item.id)
        if (record is None or record.fingerprint != fingerprint or record.image != str(item.image)
                or record.key not in complete):
            plan.extract.append((item, fingerprint))
        elif (record.category, record.title, record.attributes) != (item.category, item.title, item.attributes):
            plan.metadata_only.append((item, fingerprint))
        else:
            plan.unchanged += 1
    return plan


def index_catalog(
    catalog: str | Path | list[CatalogItem],
    index_dir: str | Path | CatalogIndex,
    config: IndexConfig | None = None,
    prune: bool = True,
    progress: bool = True,
) -> IndexReport:
    """Index ``catalog`` (a folder, a manifest, or items) into ``index_dir``.

    ``prune`` deletes indexed items the catalog no longer lists. ``index_dir`` may be an open
    ``CatalogIndex`` (a server adding items); it is then left open.
    """
    started = time.perf_counter()
    items = catalog if isinstance(catalog, list) else load_catalog(catalog)
    owned = not isinstance(index_dir, CatalogIndex)
    index = CatalogIndex.open_or_create(index_dir, config or load_config()) if owned else index_dir
    log_path = index.root / "logs" / time.strftime("index-%Y%m%d-%H%M%S.log")
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    previous_level = logging.getLogger().level
    if previous_level > logging.INFO or previous_level == logging.NOTSET:
        logging.getLogger().setLevel(logging.INFO)
    report = IndexReport(index=str(index.root), log_path=str(log_path))
    try:
        _run(index, items, prune, progress, report)
    finally:
        report.seconds = time.perf_counter() - started
        log.info(
            "indexed %s: %d added, %d updated, %d metadata-only, %d removed, %d unchanged, %d failed in %.1fs",
            index.root, report.added, report.updated, report.metadata_updated, report.removed,
            report.unchanged, len(report.failures), report.seconds,
        )
        for failure in report.failures:
            log.warning("skipped %s", failure.reason)
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(previous_level)
        handler.close()
        if owned:
            index.close()
    return report


def _run(index: CatalogIndex, items: list[CatalogItem], prune: bool, progress: bool, report: IndexReport) -> None:
    store = index.store
    existing = {record.id: record for record in store.all_items()}
    features = features_for(index)
    plan = plan_run(items, existing, complete_keys(store, features))
    with store.transaction() as db:
        for failure in plan.missing:
            store.record_failure(db, failure.source, failure.item_id, failure.reason)
        for item, fingerprint in plan.metadata_only:
            store.upsert(db, item, fingerprint)
    report.failures.extend(plan.missing)
    report.unchanged, report.metadata_updated = plan.unchanged, len(plan.metadata_only)
    to_extract = plan.extract

    global_features = [f for f in features if isinstance(f, GlobalFeature)]
    for feature in global_features:
        index.set_dim(feature.name, feature.dim)

    removed_keys = np.zeros(0, np.int64)
    if prune:
        listed = {item.id for item in items}
        gone = [item_id for item_id in existing if item_id not in listed]
        if gone:
            with store.transaction() as db:
                removed_keys = np.asarray(store.delete(db, gone), np.int64)
            for feature in global_features:
                index.vector_store(feature.name).remove(removed_keys)
            report.removed = len(removed_keys)

    changed_keys: list[int] = []
    if to_extract:
        _extract(index, to_extract, features, global_features, existing, progress, report, changed_keys)
    for extension in extensions():
        extension.after_update(index, np.asarray(changed_keys, np.int64), removed_keys)
    index.save()


def _extract(index, to_extract, features, global_features, existing, progress, report, changed_keys) -> None:
    store, config = index.store, index.config
    sources = [item.image for item, _ in to_extract]
    preparers = {feature.name: feature.preparer for feature in features}
    draft = max(getattr(feature, "draft_size", 0) or 0 for feature in features) or None
    vector_stores = {f.name: index.vector_store(f.name) for f in global_features}
    pending: list = []
    started = time.perf_counter()
    bar = tqdm(total=len(sources), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True)

    def commit() -> None:
        if not pending:
            return
        with store.transaction() as db:
            additions: dict[str, tuple[list[int], list[np.ndarray]]] = {f.name: ([], []) for f in global_features}
            for position, results, error in pending:
                item, fingerprint = to_extract[position]
                if error is not None:
                    store.record_failure(db, str(item.image), item.id, error)
                    report.failures.append(Failure(str(item.image), item.id, error))
                    continue
                key = store.upsert(db, item, fingerprint)
                for name, value in results.items():
                    data = value.astype(np.float32).tobytes() if isinstance(value, np.ndarray) else value
                    store.put_feature(db, name, key, data)
                    if name in additions:
                        additions[name][0].append(key)
                        additions[name][1].append(value)
                changed_keys.append(key)
                if item.id in existing:
                    report.updated += 1
                else:
                    report.added += 1
        # SQLite has committed; FAISS follows in memory and is saved at the end of the run
        # (a crash before that is repaired from SQLite when the index is next opened).
        with index.lock:
            for name, (keys, rows) in additions.items():
                if keys:
                    vector_stores[name].remove(np.asarray(keys, np.int64))
                    if vector_stores[name].is_trained:
                        vector_stores[name].add(np.asarray(keys, np.int64), np.stack(rows))
        pending.clear()

    try:
        for batch in iter_prepared(
            sources, preparers, batch_size=config.batch_size, num_workers=config.num_workers,
            max_pixels=config.max_pixels, draft_size=draft,
        ):
            finished = {feature.name: feature.finish(batch.prepared[feature.name]) for feature in features}
            for row, position in enumerate(batch.positions):
                pending.append((position, {name: values[row] for name, values in finished.items()}, None))
            for position, error in batch.errors.items():
                pending.append((position, {}, error))
            report.extracted += len(batch.positions)
            bar.update(len(batch.positions) + len(batch.errors))
            if len(pending) >= config.commit_every:
                commit()
        commit()
    finally:
        bar.close()
    for name, vector_store in vector_stores.items():
        if not vector_store.is_trained:
            # An index type that needs training is built from all stored rows in one go.
            index.replace_vector_store(name, index.rebuild_vector_store(name, index.meta["dims"][name]))
    log.info("extracted %d images in %.1fs", report.extracted, time.perf_counter() - started)
