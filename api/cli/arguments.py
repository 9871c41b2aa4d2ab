"""What the command line's sub-commands share: where the index is, its service, the query photos."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ES_URL_ENV = "CATALENS_ES_URL"
BACKENDS = ("folder", "es")


class UsageError(Exception):
    """A command line that cannot be carried out; printed as one line, exit code 2."""


def add_location_arguments(parser: argparse.ArgumentParser, creates: bool = False) -> None:
    """``--index DIR`` and the Elasticsearch alternative, ``--backend es`` / ``--es-url URL``."""
    parser.add_argument("--index", metavar="DIR",
                        help="index folder" + (" (created if absent)" if creates else "") + " (not needed with --backend es)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help=f"where items and vectors live (default: es if --es-url or {ES_URL_ENV} is set, else folder)")
    parser.add_argument("--es-url", metavar="URL", default=None,
                        help=f"Elasticsearch URL (or {ES_URL_ENV}); the index name is CATALENS_ES_INDEX, default catalens")


def location(args: argparse.Namespace) -> str:
    """The index location the arguments name: a folder, or ``es+URL/INDEX``."""
    from catalens.indexer.stores.elastic.catalog import elastic_location

    es_url = getattr(args, "es_url", None) or os.environ.get(ES_URL_ENV)
    backend = getattr(args, "backend", None) or ("es" if es_url else "folder")
    if backend == "es":
        if not es_url:
            raise UsageError(f"--backend es needs --es-url URL or {ES_URL_ENV}")
        return elastic_location(es_url)
    if not args.index:
        raise UsageError("--index DIR is required (or --backend es with --es-url URL)")
    return args.index


def open_service(args: argparse.Namespace):
    """The service over the catalog the arguments name (``UsageError`` when it cannot be opened)."""
    from catalens.api.service import CatalogService
    from catalens.indexer.catalog import IndexUnavailableError
    from catalens.search.settings import load_search_settings

    settings = load_search_settings(getattr(args, "config", None))
    try:
        return CatalogService.open(location(args), settings)
    except IndexUnavailableError as error:
        raise UsageError(str(error)) from None


def read_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.images)
    if args.from_file:
        path = Path(args.from_file)
        if not path.is_file():
            raise UsageError(f"--from-file {path}: no such file")
        queries.extend(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not queries:
        raise UsageError("give at least one query image (or --from-file LIST)")
    return queries


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="PHOTO", help="query photos")
    parser.add_argument("--json", action="store_true", help="one JSON object per query per line")
    parser.add_argument("--from-file", metavar="LIST", help="file with one query image path per line")
