"""What catalens does with a catalog, once, for every entry point: the CLI and the HTTP API call this.

A ``CatalogService`` holds one open catalog and its search engine, and answers in the
library's own result types (``QueryResult``, ``ClassifyResult``, ``AnomalyResult``,
``IndexReport``); entry points only parse their input and render those.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from catalens.api.uploads import drop_upload, remove_orphan_uploads, save_upload, upload_path
from catalens.datasets.catalog import CatalogItem, FieldError, check_category_path
from catalens.errors import InputError, UnavailableError
from catalens.indexer.catalog import Catalog
from catalens.indexer.config import IndexConfig
from catalens.indexer.estimator import NotFittedError
from catalens.indexer.features import FeatureUnavailableError
from catalens.indexer.imageio import ImageSource
from catalens.indexer.integrity import CheckReport
from catalens.indexer.pipeline import IndexReport, index_catalog
from catalens.indexer.stores import ItemRecord
from catalens.indexer.stores.backends import open_catalog
from catalens.search.engine import QueryResult, SearchEngine
from catalens.search.settings import SearchSettings

T = TypeVar("T")
log = logging.getLogger(__name__)


class ModelMissingError(UnavailableError, RuntimeError):
    """What was asked needs a model the catalog has not fitted yet; the message says what to run."""


class UnknownCategoryError(InputError, ValueError):
    """A category filter that names no category of the catalog; the message names close ones."""


@dataclass
class ItemWrite:
    """What ``CatalogService.write_item`` did: ``status`` is added, updated, metadata_updated or
    unchanged, ``record`` the item as stored; ``failure`` says why the photo could not be indexed
    (then nothing was written)."""

    status: str
    record: ItemRecord | None = None
    failure: str | None = None


def in_chunks(sources: Sequence[T], ask: Callable[[Sequence[T], int], list], size: int = 8) -> Iterator:
    """``ask(chunk, first)`` over ``sources`` a few at a time, each result as soon as its chunk is
    answered: how an entry point streams answers to thousands of photos."""
    for first in range(0, len(sources), size):
        yield from ask(sources[first : first + size], first)


def index(source: str | Path | Sequence[CatalogItem], location: str | Path, config: IndexConfig | None = None,
          prune: bool = True, progress: bool = True, refit: bool = True) -> IndexReport:
    """Index a catalog (folder, manifest or items) into the index at ``location``, creating it if
    needed; with ``refit``, then fit what search uses on the whole catalog where it went stale, so
    that the first search need not."""
    report = index_catalog(source, location, config, prune=prune, progress=progress)
    if refit and not report.all_failed:
        service = CatalogService.open(location)
        try:
            service.refit(progress=progress)
        finally:
            service.close()
    return report


def check(location: str | Path, repair: bool = True) -> CheckReport:
    """Verify a folder index's files and rebuild what its item store can rebuild (``catalens check``)."""
    from catalens.indexer.integrity import check_index

    return check_index(location, repair=repair)


@dataclass
class CatalogService:
    """One open catalog, and everything an entry point asks of it."""

    catalog: Catalog
    settings: SearchSettings

    @classmethod
    def open(cls, location: str | Path, settings: SearchSettings | None = None, read_only: bool = False) -> CatalogService:
        """``read_only``: nothing is written into the index (``open_catalog``)."""
        return cls(open_catalog(location, read_only=read_only), settings or SearchSettings())

    @property
    def engine(self) -> SearchEngine:
        return self.catalog.cached("engine", lambda: SearchEngine(self.catalog, self.settings), stamp="static")

    def close(self) -> None:
        self.catalog.close()

    def warm_up(self) -> None:
        """Load now what answering needs, so that the first question neither waits for it nor meets
        a bare error: the backbone's weights, every fitted model and every vector index (a damaged
        FAISS file is rebuilt from SQLite, with one warning). Raises what makes the index unanswerable
        (``ModelFileError`` naming a model that does not load, ``WeightsNotFoundError``...)."""
        from catalens.indexer.backbones import check_backbone

        check_backbone(self.catalog.config.backbone)
        for feature in self.catalog.dims():
            self.catalog.vectors(feature)
        self.catalog.features()

    # --- reading

    def modes(self) -> list[str]:
        return self.engine.modes()

    def item(self, item_id: str) -> ItemRecord | None:
        """The item stored under ``item_id``; None if there is none."""
        return self.catalog.items.item_by_id(item_id)

    def count(self) -> int:
        """How many items the catalog holds."""
        return self.catalog.items.count()

    def info(self) -> dict[str, Any]:
        from catalens.search.refit import fitted_status

        fitted = {name: state.to_json() for name, state in fitted_status(self.catalog).items()}
        return {**self.catalog.info(), "modes": self.modes(), "calibration": self.calibration_info(),
                "fitted": fitted}

    def calibration_info(self) -> dict[str, Any]:
        """The match calibration searches use now: whether there is one, stored or in memory, when it
        was fitted, how much the catalog has changed since, whether it is stale and why."""
        from catalens.search.calibration import CALIBRATION, current_keys

        state = CALIBRATION.status(self.catalog)
        if state.model is None:
            return {"present": False, "stored": False, "stale": False, "reason": state.reason,
                    "refitting": state.refitting}
        changed = state.model.changed_fraction(current_keys(self.catalog))
        return {"present": True, "stored": state.stored, "fitted": state.model.fitted_at_, "changed": round(changed, 4),
                "stale": not state.fresh, "reason": state.reason or None, "refitting": state.refitting,
                "modes": state.model.summary()}

    def categories(self) -> dict[str, int]:
        """Every category path of the catalog, with its number of items."""
        return self.catalog.cached("categories", self.catalog.items.categories)

    def check_category(self, category: str | None) -> str | None:
        """``category`` (a path prefix of whole levels) without its outer slashes, if the catalog has
        it; ``UnknownCategoryError`` naming close ones otherwise, and ``FieldError`` for a path with no
        level, over the caps of ``check_category_path`` or with a refused character."""
        if not category or not category.strip():
            return None
        if not category.strip("/"):
            raise FieldError(f"category {category!r} names no category level")
        category = category.strip("/")
        problem = check_category_path(category)
        if problem:  # checked before any work, which grows with the path's levels
            raise FieldError(problem)
        paths = self.categories()
        if any(path == category or path.startswith(category + "/") for path in paths):
            return category
        prefixes = {"/".join(path.split("/")[:depth]) for path in paths for depth in range(1, path.count("/") + 2)}
        close = difflib.get_close_matches(category, sorted(prefixes), n=3, cutoff=0.6)
        levels = category.split("/")
        # The path's own proper prefixes, shortest first: at most MAX_CATEGORY_LEVELS of them.
        own = [category[:end] for end, character in enumerate(category) if character == "/"]
        parent = next((prefix for prefix in reversed(own) if prefix in prefixes), None)
        if parent and parent not in close:  # the deepest level of the path that does exist
            close.append(parent)
        if not close:  # the same leaf name under another branch
            leaf = levels[-1].lower()
            close = sorted(p for p in prefixes if p.rsplit("/", 1)[-1].lower() == leaf)[:3]
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; it has {len(paths)} categories"
        raise UnknownCategoryError(f"category {category!r} is not in this index{hint}")

    def search(self, sources: Sequence[ImageSource | Image.Image] = (), category: str | None = None,
               names: Sequence[str] | None = None, text: str | None = None, **overrides: Any) -> list[QueryResult]:
        """``overrides`` are ``SearchSettings`` fields for this call (``k``, ``mode``, ``weights``...).
        ``text``: words to search for, alone (no sources: one result) or with each photo (fused).
        A category the catalog does not have is an ``UnknownCategoryError``, not an empty answer."""
        settings = self.settings.merged(**overrides)
        category = self.check_category(category)
        return self.engine.search(sources, category=category, names=names, settings=settings, text=text)

    def locate(self, sources: Sequence[ImageSource | Image.Image], names: Sequence[str] | None = None,
               max_detections: int | None = None) -> list:
        """The catalog products each photo shows, each with its box (``search.locate``): the best
        ``max_detections`` of them."""
        from catalens.search.locate import LocateSettings, locate

        # A smaller cap would end the search for products early and change which are found: the
        # second best of 20 must stay the second best of 2. So the search runs to at least the
        # default cap, and the answer is cut.
        settings = LocateSettings()
        if max_detections and max_detections > settings.max_detections:
            settings = LocateSettings(max_detections=max_detections)
        results = locate(self.engine, sources, names=names, settings=settings)
        if max_detections:
            for result in results:
                if result.detections:
                    result.detections = result.detections[:max_detections]
        return results

    def explain(self, result: QueryResult, out_dir: Path, query_image: Image.Image | None = None) -> list[Path]:
        from catalens.search.explain import write_explanations

        return write_explanations(self.engine, result, out_dir, query_image)

    def explain_match(self, image: Image.Image, item_id: str, name: str = "query", category: str | None = None,
                      **overrides: Any) -> bytes | None:
        """A JPEG of the keypoints the decoded query ``image`` shares with ``item_id``, drawn in memory:
        None where ``item_id`` is not among the results of its search (``overrides``: ``k``, ``mode``...),
        empty where there is nothing to draw."""
        from catalens.search.explain import draw_explanations, jpeg_bytes

        result = self.search([image], category=category, names=[name], **overrides)[0]
        hits = [hit for hit in result.results or [] if hit.id == item_id]
        if not hits:
            return None
        result.results = hits
        # The query as decoded once: decoding it again cost 0.7 s of CPU for a 5790 px PNG.
        drawn = draw_explanations(self.engine, result, image)
        return jpeg_bytes(drawn[0][1]) if drawn else b""

    def classify(self, sources: Sequence[ImageSource | Image.Image], names: Sequence[str] | None = None) -> list:
        from catalens.search.classify import ClassifierMissingError, classify

        try:
            return classify(self.catalog, sources, names=names)
        except ClassifierMissingError as error:
            raise ModelMissingError(str(error)) from None

    def can_score_anomalies(self) -> bool:
        """Whether the index holds what anomaly scoring needs (a trained autoencoder's codes)."""
        from catalens.search.anomaly import can_score

        return can_score(self.catalog)

    def anomaly(self, sources: Sequence[ImageSource | Image.Image], names: Sequence[str] | None = None,
                heatmaps: str | Path | None = None, first: int = 0) -> list:
        """Anomaly scores; with ``heatmaps``, a heatmap each, numbered from ``first`` (the position
        of ``sources[0]`` among all the queries, when they come a chunk at a time)."""
        from catalens.search.anomaly import score_anomalies

        try:
            if heatmaps is None or first == 0:
                return score_anomalies(self.catalog, sources, names=names, heatmaps_dir=heatmaps)
            # Heatmaps are numbered by position in the call: a later chunk's are drawn aside and
            # renumbered, so that no chunk overwrites another's.
            Path(heatmaps).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=heatmaps, prefix=".chunk-") as staging:
                results = score_anomalies(self.catalog, sources, names=names, heatmaps_dir=staging)
                for position, result in enumerate(results):
                    if result.heatmap:
                        drawn = Path(result.heatmap)
                        result.heatmap = Path(heatmaps) / f"{first + position:04d}_{drawn.name.split('_', 1)[-1]}"
                        shutil.move(drawn, result.heatmap)
            return results
        except (NotFittedError, FeatureUnavailableError) as error:
            raise ModelMissingError(str(error)) from None

    def audit(self, limit: int | None = None, progress: bool = False) -> list:
        from catalens.search.anomaly import audit_catalog

        try:
            return audit_catalog(self.catalog, limit=limit, progress=progress)
        except (NotFittedError, FeatureUnavailableError) as error:
            raise ModelMissingError(str(error)) from None

    def anomaly_threshold(self) -> tuple[float, float]:
        """(threshold, percentile) of the index's autoencoder: the threshold is that percentile of
        held-out catalog photos' scores."""
        from catalens.search.anomaly import anomaly_threshold

        try:
            return anomaly_threshold(self.catalog)
        except (NotFittedError, FeatureUnavailableError) as error:
            raise ModelMissingError(str(error)) from None

    def catalog_audit(self, top: int | None = None, category: str | None = None, problem: str | None = None,
                      progress: bool = False):
        """The catalog's suspicious items, most probable first (``search.audit``): misfiled, duplicated,
        not a product; a category prefix of whole levels and one problem select among them."""
        from catalens.search.audit import PROBLEMS, audit, select

        if problem is not None and problem not in PROBLEMS:
            raise FieldError(f"problem {problem!r} is not one of {', '.join(PROBLEMS)}")
        category = self.check_category(category)
        report = audit(self.catalog, progress=progress)
        report.findings = select(report.findings, category=category, problem=problem, top=top)
        return report

    # --- writing

    def dismiss_finding(self, item_id: str) -> dict[str, Any]:
        """Hide ``item_id``'s audit findings until the item changes (``KeyError`` for an unknown id)."""
        from catalens.search.audit import dismiss

        return dismiss(self.catalog, item_id)

    def add_items(self, items: Sequence[CatalogItem], progress: bool = False) -> IndexReport:
        """Add or replace items (every store, durably); nothing else in the catalog is touched."""
        return index_catalog(list(items), self.catalog, prune=False, progress=progress)

    def remove(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """(removed, not found)."""
        return self.catalog.remove(ids)

    @property
    def uploads_dir(self) -> Path:
        """Where the images written as bytes (``write_item``) are kept: ``uploads/`` beside the models."""
        return self.catalog.models_dir.parent / "uploads"

    def write_item(self, item: CatalogItem, data: bytes, image_format: str | None = None) -> ItemWrite:
        """Add ``item`` with the image ``data`` (``item.image`` is ignored: the image is kept in
        ``uploads_dir``), or replace the item with its id; every store is updated durably.

        What items.sqlite holds decides: a write whose commit failed raises, and leaves nothing (not
        its image either); one that failed after it (a FAISS file on a full disk: derived, rebuilt
        from items.sqlite) is written, and answered so. The caller holds writes to the catalog back
        meanwhile."""
        self.uploads_dir.mkdir(exist_ok=True)
        path = upload_path(self.uploads_dir, item.id, data, image_format)
        item = dataclasses.replace(item, image=path)
        previous = self.item(item.id)
        saved = not path.exists()
        try:
            if saved:
                save_upload(path, data)
            report = self.add_items([item])
        except Exception as error:
            if not self._holds(item):
                if saved:
                    path.unlink(missing_ok=True)
                raise
            _committed_anyway(error, item.id)
            report = IndexReport(index=self.catalog.location, added=previous is None, updated=previous is not None)
        if report.failures:
            if previous is None or Path(previous.image) != path:
                path.unlink(missing_ok=True)
            return ItemWrite(status="failed", failure=report.failures[0].reason)
        if previous is not None and Path(previous.image) != path:
            drop_upload(self.uploads_dir, Path(previous.image))
        status = ("added" if report.added else "updated" if report.updated
                  else "metadata_updated" if report.metadata_updated else "unchanged")
        return ItemWrite(status=status, record=self.item(item.id))

    def delete_item(self, item_id: str) -> bool:
        """Remove an item from every store, durably, and its uploaded image; False if there was no
        such item. Raises where the removal was not committed to items.sqlite."""
        record = self.item(item_id)
        try:
            removed, _ = self.remove([item_id])
        except Exception as error:
            if record is None or self.item(item_id) is not None:
                raise
            _committed_anyway(error, item_id)
            removed = [item_id]
        if removed and record is not None:
            drop_upload(self.uploads_dir, Path(record.image))
        return bool(removed)

    def remove_orphan_uploads(self) -> int:
        """Delete the uploads no item uses (what a write killed before its commit left behind); run
        when no write is under way."""
        return remove_orphan_uploads(self.uploads_dir, (record.image for record in self.catalog.items.records().values()))

    def _holds(self, item: CatalogItem) -> bool:
        """Whether the item store holds ``item`` as given (its image, category, title and attributes)."""
        record = self.item(item.id)
        return record is not None and (record.image, record.category, record.title, record.attributes) == (
            str(item.image), item.category, item.title, item.attributes)

    def train_autoencoder(self, **options: Any):
        from catalens.indexer.training.train_autoencoder import train_autoencoder

        return train_autoencoder(self.catalog, **options)

    def refit(self, progress: bool = False, store: bool = True, force: Sequence[str] = ()) -> list:
        """Fit what search uses on the whole catalog (classifier, match calibration) where it is stale
        or missing: what a command that changed the catalog runs at its end."""
        from catalens.search.refit import refit_catalog

        return refit_catalog(self.catalog, progress=progress, store=store, force=force)

    def calibrate(self, max_queries: int = 240, progress: bool = False):
        """Fit the match calibration on held-out queries made from the catalog's items, and store it
        (the classifier too, where it is stale)."""
        from catalens.search.calibration import calibrate_catalog
        from catalens.search.classify import CLASSIFIER

        CLASSIFIER.refit(self.catalog, progress=progress)
        return calibrate_catalog(self.catalog, max_queries=max_queries, progress=progress)

    def finetune(self, steps: int | None = None, progress: bool = True, unlabeled: Sequence[ImageSource] = ()):
        """Adapt the network to the catalog's products; search and classification use it where it helps.

        ``unlabeled``: the shop's own photos without labels, to self-train on (``--unlabeled``)."""
        from catalens.indexer.training.adaptation import adapt_catalog

        return adapt_catalog(self.catalog, steps=steps, progress=progress, unlabeled=unlabeled)


def _committed_anyway(error: Exception, item_id: str) -> None:
    log.warning("%r: the write is committed to items.sqlite, but what is derived from it was not saved (%s); "
                "it is rebuilt from items.sqlite when the index is next opened", item_id, error)
