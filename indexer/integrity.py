"""``catalens check``: verify every file of a folder index, and rebuild what SQLite can rebuild.

SQLite (``items.sqlite``) is the source of truth; the FAISS files, and the models a feature's
fitted slots can fit on it (the visual vocabulary), are derived from it and are rebuilt when
they do not load or do not match. What cannot be derived (the item store itself,
``catalens.json``, the networks fitted by ``train-ae`` and ``finetune``, the backbone's weights)
is reported with the file and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from catalens.indexer.backbones import WeightsNotFoundError, check_backbone
from catalens.indexer.catalog import IndexUnavailableError
from catalens.indexer.estimator import ModelFileError
from catalens.indexer.features import FeatureSpec, FeatureUnavailableError
from catalens.indexer.fitted import FittedSlot
from catalens.indexer.stores.folder import ITEMS_FILE, FolderCatalog

# "rebuildable": damaged, and what ``check`` would rebuild had it been allowed to (--no-repair).
Status = Literal["ok", "repaired", "rebuildable", "damaged"]


@dataclass(frozen=True)
class Finding:
    """One file (or model) of the index, what state it is in, and what was done or is to do."""

    file: str
    status: Status
    detail: str = ""


@dataclass
class CheckReport:
    index: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """Nothing is left damaged or waiting to be rebuilt (what was repaired counts as repaired)."""
        return all(finding.status in ("ok", "repaired") for finding in self.findings)

    @property
    def beyond_repair(self) -> bool:
        """Something is damaged that ``check`` cannot rebuild (restore it, or run what the row names)."""
        return any(finding.status == "damaged" for finding in self.findings)

    def add(self, file: str, status: Status, detail: str = "") -> None:
        self.findings.append(Finding(file, status, detail))


def check_index(root: str | Path, repair: bool = True) -> CheckReport:
    """Verify the folder index at ``root``; with ``repair``, rebuild and save what can be rebuilt."""
    root = Path(root)
    report = CheckReport(str(root))
    try:
        catalog = FolderCatalog.open(root)
    except IndexUnavailableError as error:
        report.add(_file_named(str(error), root), "damaged", str(error))
        return report
    try:
        damage = catalog.items.verify()
        if damage:
            report.add(ITEMS_FILE, "damaged", f"SQLite finds it damaged ({damage}): restore it from a backup, "
                                              "or index the catalog again into a new folder")
            return report
        report.add(ITEMS_FILE, "ok", f"{catalog.items.count()} items")
        _check_vectors(catalog, report)
        _check_models(catalog, report, repair)
        if repair and any(finding.status == "repaired" for finding in report.findings):
            catalog.save()
        elif not repair:
            report.findings = [Finding(f.file, "rebuildable", f.detail + " (not repaired: --no-repair)")
                               if f.status == "repaired" else f for f in report.findings]
    finally:
        catalog.close()
    return report


def _check_vectors(catalog: FolderCatalog, report: CheckReport) -> None:
    for feature in catalog.dims():
        rebuilt = catalog.load_vectors(feature)
        if rebuilt:
            report.add(f"{feature}.faiss", "repaired", f"{rebuilt}; rebuilt from {ITEMS_FILE}")
        else:
            report.add(f"{feature}.faiss", "ok", f"{catalog.items.row_count(feature)} vectors")


def _check_models(catalog: FolderCatalog, report: CheckReport, repair: bool) -> None:
    try:
        check_backbone(catalog.config.backbone)
        report.add(f"backbone {catalog.config.backbone}", "ok", "weights found")
    except WeightsNotFoundError as error:
        report.add(f"backbone {catalog.config.backbone}", "damaged", str(error))
    for spec in catalog.feature_specs():
        for slot in spec.slots:
            _check_fitted(catalog, spec, slot, report, repair)


def _check_fitted(catalog: FolderCatalog, spec: FeatureSpec, slot: FittedSlot, report: CheckReport,
                  repair: bool) -> None:
    """A stored model of a feature: one its slot can fit on the item store (a visual vocabulary) is
    fitted again where it does not load (``repair``), and what the feature derives from it is
    refreshed; one only a training command fits is reported with that command."""
    if not slot.path(catalog).is_file():
        return
    name = f"models/{slot.model_file}"
    try:
        if slot is spec.model:
            catalog.feature(spec.name)
        else:
            slot.require(catalog, FeatureUnavailableError(f"no {slot.name} is stored"))
    except (ModelFileError, FeatureUnavailableError) as error:
        if slot.fitted_by is not None:
            report.add(name, "damaged", f"{error} (run '{slot.fitted_by}')")
            return
        problem = str(error).split(": ", 1)[-1].split(";")[0]
        if not repair:  # the file stays as it is: reported as rebuildable by check_index
            report.add(name, "repaired", problem)
            return
        state = slot.refit(catalog, force=True)
        if state.model is not None and not state.stored:
            report.add(name, "damaged", f"{problem}; fitted again, but it could not be stored")
            return
        if state.model is None and slot.path(catalog).is_file():
            report.add(name, "damaged", f"{problem}; it could not be fitted again ({state.reason})")
            return
        if spec.refresh is not None:  # what the feature derives from it (visual words)
            spec.refresh(catalog, np.zeros(0, np.int64), np.zeros(0, np.int64))
        report.add(name, "repaired", f"{problem}; fitted again from {ITEMS_FILE}" if state.model is not None
                   else f"{problem}; removed (no {spec.name} rows to fit it on)")
        return
    report.add(name, "ok")


def _file_named(message: str, root: Path) -> str:
    """The index file an error message starts with, relative to the index."""
    first = message.split(":", 1)[0]
    try:
        return str(Path(first).relative_to(root))
    except ValueError:
        return first
