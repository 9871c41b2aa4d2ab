"""Which backend holds an index, named by a location string, as faiss' ``index_factory`` names an index type:

    path/to/folder                   the folder backend (SQLite, FAISS, inverted files)
    es+http://localhost:9200/shop    an Elasticsearch index ("shop"); es+https:// also works
"""

from __future__ import annotations

import logging
from pathlib import Path

from catalens.indexer.backbones import check_backbone
from catalens.indexer.catalog import Catalog
from catalens.indexer.config import IndexConfig, load_config, settle
from catalens.indexer.features import feature_spec, list_features
from catalens.indexer.stores.elastic.catalog import ELASTIC_SCHEMES, ElasticCatalog
from catalens.indexer.stores.folder import FolderCatalog

log = logging.getLogger(__name__)


def is_elastic(location: str | Path) -> bool:
    return str(location).startswith(ELASTIC_SCHEMES)


def check_buildable(config: IndexConfig) -> None:
    """What a new index needs before anything is written: known features, a known backbone
    whose weights are on this machine (found, not loaded). Raises the one-sentence errors."""
    for name in config.features:
        feature_spec(name)
    check_backbone(config.backbone)


def open_for_indexing(location: str | Path, config: IndexConfig | None = None) -> tuple[Catalog, list[str]]:
    """The catalog at ``location`` to index into, and what the given settings do to it.

    A new index is created with ``config`` (default: the configuration from the environment)
    once ``check_buildable`` passed, so a wrong backbone leaves no half-made index behind. An
    existing index keeps its own configuration, with the settings set explicitly on ``config``
    that may change (``catalens.indexer.config.settle``): one note each; those that cannot
    change are refused (``ConfigError``).
    """
    given = config or load_config()
    check_buildable(given)
    if is_elastic(location):
        catalog = ElasticCatalog.open(str(location), given, create=True)
    else:
        catalog = FolderCatalog.open_or_create(location, given)
    if catalog.config is given:  # created now with the given configuration
        return catalog, []
    fitted = {name for name in list_features() if feature_spec(name).fitted_by}
    try:
        settled, notes = settle(catalog.config, given, fitted, faiss=isinstance(catalog, FolderCatalog))
        if notes:
            apply_settled(catalog, settled)
    except Exception:
        catalog.close()
        raise
    for note in notes:
        log.info("%s: %s", catalog.location, note)
    return catalog, notes


def apply_settled(catalog: Catalog, settled: IndexConfig) -> None:
    """Run ``catalog`` with ``settled`` from now on (stored by its next ``save``)."""
    if isinstance(catalog, FolderCatalog):
        catalog.reconfigure(settled)
    else:
        catalog.config = settled


def open_catalog(location: str | Path, config: IndexConfig | None = None, create: bool = False,
                 read_only: bool = False) -> Catalog:
    """The catalog at ``location``.

    ``create`` makes a new index there when none exists, with ``config`` (default: the
    configuration from the environment); an existing index keeps its own configuration, and the
    settings of ``config`` are applied or refused as ``open_for_indexing`` says. ``read_only``
    opens a folder index without writing anything into it (Elasticsearch's is its cluster's).
    """
    if create:
        return open_for_indexing(location, config)[0]
    if is_elastic(location):
        return ElasticCatalog.open(str(location), config)
    return FolderCatalog.open(location, read_only=read_only)
