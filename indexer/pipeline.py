"""Indexing runs: bring a catalog's index in line with the catalog, incrementally, durably, resumably.

One pipeline for every backend: ``run(items, catalog, features)``. Only new and changed images
are decoded; removed items are deleted; a bad file is recorded and skipped. Every
``commit_every`` images the work done is written durably (one SQLite transaction, or one bulk
request), so a run killed at any point loses at most that batch, and the next run picks up
from there. Then each feature brings what depends on the whole catalog in line (the visual
vocabulary and words).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from catalens.datasets.catalog import CatalogItem, load_catalog
from catalens.indexer.catalog import Catalog
from catalens.indexer.config import IndexConfig, load_config
from catalens.indexer.features import Feature
from catalens.indexer.features.decode import iter_prepared
from catalens.indexer.stores import Failure, ItemRecord, ItemUpdate
from catalens.indexer.stores.backends import open_for_indexing

log = logging.getLogger(__name__)


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
    extract_seconds: float = 0.0
    log_path: str = ""
    # What the run's explicit settings did to an existing index (a FAISS rebuild, a new batch size...).
    notes: list[str] = field(default_factory=list)

    @property
    def all_failed(self) -> bool:
        """Every image the run had to read failed, and the catalog has no item that did not."""
        return bool(self.failures) and not (self.added or self.updated or self.metadata_updated or self.unchanged)

    @property
    def images_per_second(self) -> float:
        """Extraction rate, as the progress bar shows it (model loading and upkeep not counted)."""
        return self.extracted / self.extract_seconds if self.extract_seconds else 0.0


def file_fingerprint(path: Path) -> str | None:
    """Size and modification time: cheap to read for a million files, changes when a file does."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@dataclass
class RunPlan:
    """What a run does with each catalog item: ``extract`` and ``metadata_only`` are (item, fingerprint)."""

    extract: list[tuple[CatalogItem, str]] = field(default_factory=list)
    metadata_only: list[CatalogItem] = field(default_factory=list)
    missing: list[Failure] = field(default_factory=list)
    unchanged: int = 0


def plan_run(items: Sequence[CatalogItem], existing: Mapping[str, ItemRecord], complete: Container[int]) -> RunPlan:
    """Sort the catalog into new or changed images, metadata-only changes, unchanged and missing files.

    ``existing`` is the stored records by id; ``complete`` the keys of those holding every
    configured feature. An item indexed before a feature was configured lacks it and is
    extracted again, so an upgraded index fills in on its next run instead of staying half-built.
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
            plan.metadata_only.append(item)
        else:
            plan.unchanged += 1
    return plan


def run(
    items: Sequence[CatalogItem],
    catalog: Catalog,
    features: Sequence[Feature] | None = None,
    prune: bool = True,
    progress: bool = True,
    report: IndexReport | None = None,
) -> IndexReport:
    """Bring ``catalog`` in line with ``items``, extracting ``features`` (default: the catalog's own)."""
    report = report or IndexReport(index=catalog.location)
    features = list(catalog.features() if features is None else features)
    existing = catalog.items.records()
    complete = set.intersection(*(catalog.items.row_keys(f.name) for f in features)) if features else set()
    plan = plan_run(items, existing, complete)
    catalog.items.record_failures(plan.missing)
    catalog.items.update_metadata(plan.metadata_only)
    report.failures.extend(plan.missing)
    report.unchanged, report.metadata_updated = plan.unchanged, len(plan.metadata_only)

    removed = np.zeros(0, np.int64)
    if prune:
        listed = {item.id for item in items}
        gone = [item_id for item_id in existing if item_id not in listed]
        if gone:
            with catalog.lock:
                removed = catalog.delete(gone)
            report.removed = len(removed)

    changed = _extract(catalog, plan.extract, features, existing, progress, report)
    catalog.refresh(np.asarray(changed, np.int64), removed)
    catalog.save()
    return report


def _extract(catalog: Catalog, to_extract: list[tuple[CatalogItem, str]], features: list[Feature],
             existing: Mapping[str, ItemRecord], progress: bool, report: IndexReport) -> list[int]:
    config = catalog.config
    changed: list[int] = []
    if not to_extract or not features:
        return changed
    pending: list[ItemUpdate] = []
    failed: list[Failure] = []
    started = time.perf_counter()

    def commit() -> None:
        catalog.items.record_failures(failed)
        report.failures.extend(failed)
        failed.clear()
        if pending:
            changed.extend(catalog.write(pending))
            for update in pending:
                if update.item.id in existing:
                    report.updated += 1
                else:
                    report.added += 1
            pending.clear()

    preparers = {feature.name: feature.preparer for feature in features}
    draft = max(feature.draft_size or 0 for feature in features) or None
    with tqdm(total=len(to_extract), unit="img", desc="indexing", disable=not progress, dynamic_ncols=True) as bar:
        for batch in iter_prepared(
            [item.image for item, _ in to_extract], preparers, batch_size=config.batch_size,
            num_workers=config.num_workers, max_pixels=config.max_pixels, draft_size=draft,
        ):
            finished = {feature.name: feature.finish(batch.prepared[feature.name]) for feature in features}
            for row, position in enumerate(batch.positions):
                item, fingerprint = to_extract[position]
                pending.append(ItemUpdate(item, fingerprint, {name: values[row] for name, values in finished.items()}))
            for position, error in batch.errors.items():
                item, _ = to_extract[position]
                failed.append(Failure(str(item.image), item.id, error))
            report.extracted += len(batch.positions)
            bar.update(len(batch.positions) + len(batch.errors))
            if len(pending) + len(failed) >= config.commit_every:
                commit()
        commit()
    report.extract_seconds = time.perf_counter() - started
    log.info("extracted %d images in %.1fs", report.extracted, report.extract_seconds)
    return changed


class _RunLog(logging.FileHandler):
    """The run's log file. A record that cannot be written (a full disk) is dropped: the console
    says what matters, and logging's own traceback for each record would bury the one line that
    names the problem."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def index_catalog(
    source: str | Path | Sequence[CatalogItem],
    index: str | Path | Catalog,
    config: IndexConfig | None = None,
    prune: bool = True,
    progress: bool = True,
) -> IndexReport:
    """Index ``source`` (a folder, a manifest, or items) into ``index`` (a location or an open catalog).

    ``prune`` deletes indexed items the catalog no longer lists. An open ``Catalog`` (a server
    adding items) is left open. Each run appends to the day's log in the index's ``logs/``.
    """
    started = time.perf_counter()
    items = list(source) if not isinstance(source, (str, Path)) else load_catalog(source)
    owned = not isinstance(index, Catalog)
    catalog, notes = open_for_indexing(index, config or load_config()) if owned else (index, [])
    log_path = catalog.logs_dir / time.strftime("index-%Y%m%d.log")
    handler = _RunLog(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    if previous_level > logging.INFO or previous_level == logging.NOTSET:
        root.setLevel(logging.INFO)
    report = IndexReport(index=catalog.location, log_path=str(log_path), notes=notes)
    for note in notes:
        log.info("configuration: %s", note)
    try:
        run(items, catalog, prune=prune, progress=progress, report=report)
    finally:
        report.seconds = time.perf_counter() - started
        log.info(
            "indexed %s: %d added, %d updated, %d metadata-only, %d removed, %d unchanged, %d failed in %.1fs",
            catalog.location, report.added, report.updated, report.metadata_updated, report.removed,
            report.unchanged, len(report.failures), report.seconds,
        )
        for failure in report.failures:
            log.warning("skipped %s", failure.reason)
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()
        if owned:
            catalog.close()
    return report
