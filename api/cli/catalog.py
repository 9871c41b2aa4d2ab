"""``catalens index``, ``info``, ``remove`` and ``demo``: building and keeping an index."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from catalens.api.cli.arguments import add_location_arguments, location, open_service
from catalens.api.tables import format_table


def cmd_index(args: argparse.Namespace) -> int:
    from catalens.api.service import index
    from catalens.datasets.catalog import load_catalog
    from catalens.indexer.config import load_config

    items = load_catalog(args.catalog)
    config = load_config(args.config, backbone=args.backbone, faiss_factory=args.faiss_factory)
    report = index(items, location(args), config, prune=not args.keep_missing, progress=not args.quiet)
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


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def cmd_info(args: argparse.Namespace) -> int:
    service = open_service(args)
    try:
        info = service.info()
    finally:
        service.close()
    if args.json:
        print(json.dumps(info))
        return 0
    dims = info.pop("dims")
    size = info.pop("size_bytes", None)
    info["created"], info["updated"] = _when(info.get("created")), _when(info.get("updated"))
    rows = [(key, ", ".join(value) if isinstance(value, list) else value) for key, value in info.items()]
    rows += [(f"dims.{name}", dim) for name, dim in dims.items()]
    if size is not None:
        rows.append(("size on disk", f"{size / 1e6:.1f} MB"))
    print(format_table(["index", "value"], rows))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    service = open_service(args)
    try:
        removed, missing = service.remove(args.ids)
    finally:
        service.close()
    print(f"removed {len(removed)} item(s)" + (f"; not in the index: {', '.join(missing)}" if missing else ""))
    return 0 if not missing else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from catalens.api.demo import run_demo

    return run_demo(Path(args.workdir))


def register(commands) -> None:
    p = commands.add_parser("index", help="index a catalog (folder tree or JSONL manifest)")
    p.add_argument("catalog", help="a folder tree (folders are the category path) or a .jsonl manifest")
    add_location_arguments(p, creates=True)
    p.add_argument("--backbone", help="deep feature backbone (default efficientnet_lite0)")
    p.add_argument("--faiss-factory", help="faiss index type, e.g. Flat, IVF1024,PQ32, HNSW32")
    p.add_argument("--config", help="TOML configuration file (tables [index] and [search])")
    p.add_argument("--keep-missing", action="store_true", help="keep indexed items the catalog no longer lists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_index)

    p = commands.add_parser("info", help="describe an index")
    add_location_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("remove", help="delete items from an index by id")
    p.add_argument("ids", nargs="+", metavar="ID")
    add_location_arguments(p)
    p.set_defaults(run=cmd_remove)

    p = commands.add_parser("demo", help="build a generated sample catalog, index it and search it")
    p.add_argument("--workdir", default="demo-index", help="folder for the sample catalog and its index")
    p.set_defaults(run=cmd_demo)
