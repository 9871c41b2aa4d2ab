"""Which backend holds an index, named by a location string, as faiss' ``index_factory`` names an index type:

    path/to/folder                   the folder backend (SQLite, FAISS, inverted files)
    es+http://localhost:9200/shop    an Elasticsearch index ("shop"); es+https:// also works
"""

from __future__ import annotations

from pathlib import Path

from catalens.indexer.catalog import Catalog
from catalens.indexer.config import IndexConfig, load_config
from catalens.indexer.stores.elastic.catalog import ELASTIC_SCHEMES, ElasticCatalog
from catalens.indexer.stores.folder import FolderCatalog


def is_elastic(location: str | Path) -> bool:
    return str(location).startswith(ELASTIC_SCHEMES)


def open_catalog(location: str | Path, config: IndexConfig | None = None, create: bool = False) -> Catalog:
    """The catalog at ``location``.

    ``create`` makes a new index there when none exists, with ``config`` (default: the
    configuration from the environment); an existing index keeps its own configuration, and a
    ``config`` that contradicts what cannot change (the backbone) is refused.
    """
    if is_elastic(location):
        return ElasticCatalog.open(str(location), config, create=create)
    if create:
        return FolderCatalog.open_or_create(location, config or load_config())
    return FolderCatalog.open(location)
