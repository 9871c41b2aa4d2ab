"""The ``catalens`` command line. It parses and prints; the work is done in indexer/ and search/."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from api.tables import format_table


class UsageError(Exception):
    """A command line that cannot be carried out; printed as one line, exit code 2."""


def _read_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.images)
    if args.from_file:
        path = Path(args.from_file)
        if not path.is_file():
            raise UsageError(f"--from-file {path}: no such file")
        queries.extend(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not queries:
        raise UsageError("give at least one query image (or --from-file LIST)")
    return queries


def _open_index(path: str):
    from indexer.index import CatalogIndex, IndexUnavailableError

    try:
        return CatalogIndex.open(path)
    except IndexUnavailableError as error:
        raise UsageError(str(error)) from None


def _elastic_store(args: argparse.Namespace):
    """The Elasticsearch store when ``--backend es`` / ``--es-url`` / ``CATALENS_ES_URL`` asks for one."""
    from indexer.stores import open_store

    es_url = args.es_url or os.environ.get("CATALENS_ES_URL")
    backend = args.backend or ("es" if es_url else "embedded")
    if backend != "es":
        return None
    try:
        return open_store(None, "es", es_url)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _open_catalog(args: argparse.Namespace):
    """What a command reads the catalog through: the cluster's index view, or the ``--index`` folder.

    The cluster when ``--backend es`` / ``--es-url`` / ``CATALENS_ES_URL`` asks for it; search,
    classification and anomaly code take either without knowing which.
    """
    elastic = _elastic_store(args)
    if elastic is not None:
        from indexer.elastic import ElasticIndexView

        return ElasticIndexView(elastic)
    if not args.index:
        raise UsageError("--index DIR is required (or --backend es with --es-url URL)")
    return _open_index(args.index)


def cmd_index(args: argparse.Namespace) -> int:
    from datasets.catalog import CatalogError, load_catalog
    from indexer.config import load_config
    from indexer.index import IndexUnavailableError
    from indexer.pipeline import index_catalog

    try:
        items = load_catalog(args.catalog)
        config = load_config(args.config, backbone=args.backbone, faiss_factory=args.faiss_factory)
        elastic = _elastic_store(args)
        if elastic is not None:
            from indexer.elastic import index_catalog_to_elastic

            report = index_catalog_to_elastic(items, elastic, config, prune=not args.keep_missing, progress=not args.quiet)
        elif not args.index:
            raise UsageError("--index DIR is required (or --backend es with --es-url URL)")
        else:
            report = index_catalog(items, args.index, config, prune=not args.keep_missing, progress=not args.quiet)
    except (CatalogError, IndexUnavailableError) as error:
        raise UsageError(str(error)) from None
    rows = [
        ("added", report.added), ("updated", report.updated), ("metadata updated", report.metadata_updated),
        ("removed", report.removed), ("unchanged", report.unchanged), ("failed", len(report.failures)),
        ("images/s", f"{report.images_per_second:.1f}"), ("seconds", f"{report.seconds:.1f}"),
    ]
    print(format_table(["indexing", "count"], rows))
    if report.failures:
        print(f"\nskipped {len(report.failures)} file(s) (details in {report.log_path}):")
        for failure in report.failures[:20]:
            print(f"  {failure.reason}")
        if len(report.failures) > 20:
            print(f"  ... and {len(report.failures) - 20} more")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from search.engine import SearchEngine, available_modes

    queries = _read_queries(args)
    if args.mode and args.mode not in available_modes():
        raise UsageError(f"--mode {args.mode}: choose one of {', '.join(available_modes())}")
    if args.k < 1:
        raise UsageError("--k must be at least 1")
    engine = SearchEngine(_open_catalog(args))
    explain = getattr(args, "explain", None)
    for result in engine.search(queries, k=args.k, mode=args.mode, category=args.category):
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
        elif result.error:
            print(f"{result.query}: error: {result.error}")
        else:
            print(f"\n{result.query}")
            rows = [(rank, hit.id, f"{hit.score:.3f}", hit.category, hit.title) for rank, hit in enumerate(result.results, 1)]
            print(format_table(["#", "id", "score", "category", "title"], rows))
        if explain and not result.error:
            from search.explain import write_explanations

            write_explanations(engine, result, Path(explain))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    index = _open_index(args.index)
    info = index.info()
    if args.json:
        print(json.dumps(info))
        return 0
    size = info.pop("size_bytes")
    dims = info.pop("dims")
    rows = [(key, value) for key, value in info.items()]
    rows += [(f"dims.{name}", dim) for name, dim in dims.items()]
    rows.append(("size on disk", f"{size / 1e6:.1f} MB"))
    print(format_table(["index", "value"], rows))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from indexer.maintenance import remove_items

    index = _open_index(args.index)
    removed, missing = remove_items(index, args.ids)
    print(f"removed {len(removed)} item(s)" + (f"; not in the index: {', '.join(missing)}" if missing else ""))
    return 0 if not missing else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from api.demo import run_demo

    return run_demo(Path(args.workdir))


def build_parser() -> argparse.ArgumentParser:
    from indexer.stores import add_backend_arguments

    parser = argparse.ArgumentParser(prog="catalens", description="Visual search for product catalogs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("index", help="index a catalog (folder tree or JSONL manifest)")
    p.add_argument("catalog")
    p.add_argument("--index", help="index folder (created if absent)")
    p.add_argument("--backbone", help="deep feature backbone (default efficientnet_lite0)")
    p.add_argument("--faiss-factory", help="faiss index type, e.g. Flat, IVF1024,PQ32, HNSW32")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--keep-missing", action="store_true", help="keep indexed items the catalog no longer lists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_arguments(p)
    p.set_defaults(run=cmd_index)

    p = commands.add_parser("search", help="find catalog items matching photos")
    p.add_argument("images", nargs="*")
    p.add_argument("--index")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mode", default=None, help="deep | local | fused | ae (default: fused where available)")
    p.add_argument("--category", help="only items under this category path prefix")
    p.add_argument("--json", action="store_true", help="one JSON object per query per line")
    p.add_argument("--from-file", help="file with one query image path per line")
    p.add_argument("--explain", help="folder for images showing why each result matched")
    add_backend_arguments(p)
    p.set_defaults(run=cmd_search)

    p = commands.add_parser("info", help="describe an index")
    p.add_argument("--index", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("remove", help="delete items from an index by id")
    p.add_argument("ids", nargs="+")
    p.add_argument("--index", required=True)
    p.set_defaults(run=cmd_remove)

    p = commands.add_parser("demo", help="build a generated sample catalog, index it and search it")
    p.add_argument("--workdir", default="demo-index")
    p.set_defaults(run=cmd_demo)

    for register in _extra_commands():
        register(commands)
    return parser


def _extra_commands():
    """Sub-commands that live beside their feature (classify, anomaly, serve...)."""
    found = []
    for module in ("search.classify_cli", "search.anomaly_cli", "api.serve_cli", "indexer.finetune_cli"):
        try:
            found.append(__import__(module, fromlist=["register"]).register)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = logging.StreamHandler()
    # The handler's level, not the root's: indexing runs raise the root to INFO for their log file.
    console.setLevel(logging.INFO if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"catalens {args.command}: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if type(error).__module__.startswith("elastic_transport"):
            print(f"catalens {args.command}: Elasticsearch unreachable or refused the request: {error}", file=sys.stderr)
            return 3
        raise
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
