"""What catalens does with a catalog, once, for every entry point: the CLI and the HTTP API call this.

A ``CatalogService`` holds one open catalog and its search engine, and answers in the
library's own result types (``QueryResult``, ``ClassifyResult``, ``AnomalyResult``,
``IndexReport``); entry points only parse their input and render those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from catalens.datasets.catalog import CatalogItem
from catalens.indexer.backends import open_catalog
from catalens.indexer.catalog import Catalog
from catalens.indexer.config import IndexConfig
from catalens.indexer.estimator import NotFittedError
from catalens.indexer.features import FeatureUnavailableError
from catalens.indexer.imageio import ImageSource
from catalens.indexer.pipeline import IndexReport, index_catalog
from catalens.search.engine import QueryResult, SearchEngine
from catalens.search.settings import SearchSettings


class ModelMissingError(RuntimeError):
    """What was asked needs a model the catalog has not fitted yet; the message says what to run."""


def index(source: str | Path | Sequence[CatalogItem], location: str | Path, config: IndexConfig | None = None,
          prune: bool = True, progress: bool = True) -> IndexReport:
    """Index a catalog (folder, manifest or items) into the index at ``location``, creating it if needed."""
    return index_catalog(source, location, config, prune=prune, progress=progress)


@dataclass
class CatalogService:
    """One open catalog, and everything an entry point asks of it."""

    catalog: Catalog
    settings: SearchSettings

    @classmethod
    def open(cls, location: str | Path, settings: SearchSettings | None = None) -> CatalogService:
        return cls(open_catalog(location), settings or SearchSettings())

    @property
    def engine(self) -> SearchEngine:
        return self.catalog.cached("engine", lambda: SearchEngine(self.catalog, self.settings), stamp="static")

    def close(self) -> None:
        self.catalog.close()

    # --- reading

    def modes(self) -> list[str]:
        return self.engine.modes()

    def info(self) -> dict[str, Any]:
        return {**self.catalog.info(), "modes": self.modes()}

    def search(self, sources: Sequence[ImageSource | Image.Image], category: str | None = None,
               names: Sequence[str] | None = None, **overrides: Any) -> list[QueryResult]:
        """``overrides`` are ``SearchSettings`` fields for this call (``k``, ``mode``, ``weights``...)."""
        settings = self.settings.merged(**overrides)
        return self.engine.search(sources, category=category, names=names, settings=settings)

    def explain(self, result: QueryResult, out_dir: Path) -> list[Path]:
        from catalens.search.explain import write_explanations

        return write_explanations(self.engine, result, out_dir)

    def classify(self, sources: Sequence[ImageSource | Image.Image], names: Sequence[str] | None = None) -> list:
        from catalens.search.classify import classify

        return classify(self.catalog, sources, names=names)

    def anomaly(self, sources: Sequence[ImageSource | Image.Image], names: Sequence[str] | None = None,
                heatmaps: str | Path | None = None) -> list:
        from catalens.search.anomaly import score_anomalies

        try:
            return score_anomalies(self.catalog, sources, names=names, heatmaps_dir=heatmaps)
        except (NotFittedError, FeatureUnavailableError) as error:
            raise ModelMissingError(str(error)) from None

    def audit(self, limit: int | None = None, progress: bool = False) -> list:
        from catalens.search.anomaly import audit_catalog

        try:
            return audit_catalog(self.catalog, limit=limit, progress=progress)
        except (NotFittedError, FeatureUnavailableError) as error:
            raise ModelMissingError(str(error)) from None

    # --- writing

    def add_items(self, items: Sequence[CatalogItem], progress: bool = False) -> IndexReport:
        """Add or replace items (every store, durably); nothing else in the catalog is touched."""
        return index_catalog(list(items), self.catalog, prune=False, progress=progress)

    def remove(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """(removed, not found)."""
        return self.catalog.remove(ids)

    def train_autoencoder(self, **options: Any):
        from catalens.indexer.training.train_autoencoder import train_autoencoder

        return train_autoencoder(self.catalog, **options)

    def finetune(self, steps: int | None = None, progress: bool = True):
        """Adapt the network to the catalog's products; search and classification use it where it helps."""
        from catalens.indexer.training.adaptation import adapt_catalog

        return adapt_catalog(self.catalog, steps=steps, progress=progress)
