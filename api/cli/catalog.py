"""``catalens index``, ``info``, ``remove`` and ``demo``: building and keeping an index."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from catalens.api.cli.arguments import (
    add_command,
    add_config_argument,
    add_location_arguments,
    location,
    open_service,
)
from catalens.api.tables import format_table


def cmd_index(args: argparse.Namespace) -> int:
    from catalens.api.service import index
    from catalens.datasets.catalog import load_catalog
    from catalens.indexer.config import load_config

    items = load_catalog(args.catalog)
    config = load_config(args.config, backbone=args.backbone, faiss_factory=args.faiss_factory)
    report = index(items, location(args), config, prune=not args.keep_missing, progress=not args.quiet)
    for note in report.notes:
        print(f"configuration: {note}")
    rows = [
        ("added", report.added), ("updated", report.updated), ("metadata updated", report.metadata_updated),
        ("removed", report.removed), ("unchanged", report.unchanged), ("failed", len(report.failures)),
        ("images/s (extraction)", f"{report.images_per_second:.1f}" if report.extracted else "-"), ("seconds", f"{report.seconds:.1f}"),
    ]
    print(format_table(["indexing", "count"], rows))
    if report.failures:
        print(f"\nskipped {len(report.failures)} file(s) (details in {report.log_path}):")
        for failure in report.failures[:20]:
            print(f"  {failure.reason}")
        if len(report.failures) > 20:
            print(f"  ... and {len(report.failures) - 20} more")
    if report.all_failed:
        print("\nno image of the catalog could be read: check the paths above (a manifest's relative paths "
              "are read from the manifest's folder)")
        return 1
    return 0


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def mode_threshold_text(row: dict) -> str:
    """A mode's match threshold for a person, or why it has none worth the name."""
    if row["threshold"] >= 1.0:
        return "none: this mode cannot judge its matches on this catalog (no threshold was right 95% of the time)"
    return (f"{row['threshold']:.2f} (matches right {100 * row['precision']:.0f}% of the time on held-out photos, "
            f"{100 * row['coverage']:.0f}% of them matched)")


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
    calibration = info.pop("calibration", None) or {}
    fitted = info.pop("fitted", None) or {}
    for name, state in fitted.items():
        if not state["present"]:
            info[name] = f"missing: {state['reason']} (run catalens calibrate; searches answer without it)"
            continue
        info[name] = f"fitted {_when(state['fitted'])}" + ("" if state["stored"] else " (in memory)")
        if name == "match calibration" and calibration.get("present"):
            info[name] += f", {100 * calibration['changed']:.0f}% of the catalog changed since"
        if state["stale"]:
            info[name] += f"; stale: {state['reason']} (run catalens calibrate; searches use this fit meanwhile)"
    rows = [(key, ", ".join(value) if isinstance(value, list) else value) for key, value in info.items()]
    rows += [(f"match threshold, {row['mode']}", mode_threshold_text(row)) for row in calibration.get("modes") or []]
    rows += [(f"dims.{name}", dim) for name, dim in dims.items()]
    if size is not None:
        rows.append(("size on disk", f"{size / 1e6:.1f} MB"))
    print(format_table(["index", "value"], rows))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    service = open_service(args)
    try:
        removed, missing = service.remove(args.ids)
        if removed:  # what search fits on the whole catalog follows now, not in the next search
            service.refit(progress=not args.quiet)
    finally:
        service.close()
    print(f"removed {len(removed)} item(s)" + (f"; not in the index: {', '.join(missing)}" if missing else ""))
    return 0 if not missing else 1


def cmd_check(args: argparse.Namespace) -> int:
    from catalens.api.cli.arguments import UsageError
    from catalens.api.service import check
    from catalens.indexer.stores.backends import is_elastic

    where = location(args)
    if is_elastic(where):
        raise UsageError("check verifies a folder index (--index DIR); Elasticsearch checks its own shards")
    report = check(where, repair=not args.no_repair)
    print(format_table(["file", "status", "detail"], [(f.file, f.status, f.detail) for f in report.findings]))
    if report.beyond_repair:
        print(f"\n{where}: damaged beyond what can be rebuilt (see the rows marked damaged)")
        return 1
    if not report.healthy:
        print(f"\n{where}: damaged, and all of it can be rebuilt: run 'catalens check --index {where}' "
              "without --no-repair")
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from catalens.api.demo import run_demo

    return run_demo(Path(args.workdir))


def register(commands) -> None:
    p = add_command(
        commands, "index", "index a catalog (folder tree or JSONL manifest)",
        description="Index a catalog, or bring an existing index in line with it: only new and changed images "
                    "are read, items the catalog no longer lists are removed, a run that dies resumes. "
                    "Exit status 1 when no image could be read.",
        epilog="example: catalens index shop.jsonl --index shop-index")
    p.add_argument("catalog", help="a folder tree (ROOT/Top/Coarse/Fine/*.jpg: the folders are the category path) "
                                   "or a .jsonl manifest (one item per line)")
    add_location_arguments(p, creates=True)
    p.add_argument("--backbone", help="deep feature backbone of a new index: efficientnet_lite0 (the default), "
                                      "efficientnet_lite1/2, resnet50, vgg16_fc7, alexnet_fc7")
    p.add_argument("--faiss-factory", metavar="FACTORY",
                   help="FAISS index type (default Flat): e.g. IVF4096,PQ32 or HNSW32; on an existing index "
                        "its vector indexes are rebuilt")
    add_config_argument(p, "table [index]")
    p.add_argument("--keep-missing", action="store_true", help="keep indexed items the catalog no longer lists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_index)

    p = add_command(commands, "info", "describe an index: counts, configuration, FAISS type, modes, dates, size",
                    epilog="example: catalens info --index shop-index")
    add_location_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object (dates as epoch seconds)")
    p.set_defaults(run=cmd_info)

    p = add_command(commands, "remove", "delete items from an index by id",
                    description="Delete items from an index by id. Exit status 1 when an id is not in the index.",
                    epilog="example: catalens remove sku-1 sku-2 --index shop-index")
    p.add_argument("ids", nargs="+", metavar="ID", help="catalog ids of the items to delete")
    add_location_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_remove)

    p = add_command(commands, "check", "verify an index's files and rebuild what can be rebuilt",
                    description="Verify every file of a folder index: items.sqlite (SQLite's own check), each FAISS "
                                "file against the stored vectors, catalens.json, the fitted models and the "
                                "backbone's weights. FAISS files and the visual vocabulary are rebuilt from "
                                "items.sqlite; what cannot be rebuilt is named with what to do. Exit status 1 "
                                "when something is left damaged.",
                    epilog="example: catalens check --index shop-index")
    add_location_arguments(p)
    p.add_argument("--no-repair", action="store_true", help="only report; rebuild nothing")
    p.set_defaults(run=cmd_check)

    p = add_command(commands, "demo", "build a generated sample catalog, index it and search it with a shop photo",
                    description="Generate a sample catalog (24 items), index it and search it with a shop photo of "
                                "one item, offline. Exit status 0 when that item comes first.",
                    epilog="example: catalens demo --workdir demo-index")
    p.add_argument("--workdir", default="demo-index", metavar="DIR",
                   help="folder for the sample catalog, its index and the query photo")
    p.set_defaults(run=cmd_demo)
