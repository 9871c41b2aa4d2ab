"""``catalens search``, ``classify`` and ``anomaly``: questions asked of an index with photos."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from catalens.api.cli.arguments import (
    UsageError,
    add_location_arguments,
    add_query_arguments,
    open_service,
    read_queries,
)
from catalens.api.tables import format_table


def print_results(results: Iterable, as_json: bool, render: Callable[[Any], None]) -> int:
    """Each query's result as a JSON line, an error line, or ``render``-ed; returns how many failed."""
    failed = 0
    for result in results:
        failed += result.error is not None
        if as_json:
            print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
        elif result.error:
            print(f"{result.query}: error: {result.error}")
        else:
            render(result)
    return failed


def _search_table(result) -> None:
    print(f"\n{result.query}")
    rows = [(rank, hit.id, f"{hit.score:.3f}", hit.category, hit.title) for rank, hit in enumerate(result.results, 1)]
    print(format_table(["#", "id", "score", "category", "title"], rows))


def _classify_table(result) -> None:
    print(f"\n{result.query}: {result.category}")
    rows = [(depth, level.name, f"{level.confidence:.2f}") for depth, level in enumerate(result.levels, 1)]
    if rows:
        print(format_table(["level", "category", "confidence"], rows))
    print("nearest items: " + ", ".join(result.neighbours))


def _anomaly_line(result) -> None:
    verdict = "ANOMALOUS" if result.anomalous else "normal"
    extra = f"  heatmap {result.heatmap}" if result.heatmap else ""
    print(f"{result.query}: {verdict} (score {result.score:.4f}, threshold {result.threshold:.4f}){extra}")


def cmd_search(args: argparse.Namespace) -> int:
    queries = read_queries(args)
    if args.k < 1:
        raise UsageError("--k must be at least 1")
    service = open_service(args)
    try:
        service.engine.check_mode(args.mode)
        results = service.search(queries, category=args.category, k=args.k, mode=args.mode,
                                 collapse=args.collapse or None)
        print_results(results, args.json, _search_table)
        for result in results:
            if args.explain and not result.error:
                service.explain(result, Path(args.explain))
    finally:
        service.close()
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    queries = read_queries(args)
    service = open_service(args)
    try:
        failed = print_results(service.classify(queries), args.json, _classify_table)
    finally:
        service.close()
    return 1 if failed and failed == len(queries) else 0


def cmd_anomaly(args: argparse.Namespace) -> int:
    service = open_service(args)
    try:
        if args.audit:
            if args.images or args.from_file:
                raise UsageError("--audit scores the catalog's own items; give no query images with it")
            entries = service.audit(limit=args.top, progress=not args.json)
            if args.json:
                for entry in entries:
                    print(json.dumps({"id": entry.id, "image": entry.image, "category": entry.category,
                                      "score": round(entry.score, 6), "anomalous": entry.anomalous}, ensure_ascii=False))
            else:
                rows = [(rank, f"{e.score:.4f}", "yes" if e.anomalous else "", e.category, e.id)
                        for rank, e in enumerate(entries, 1)]
                print(format_table(["#", "score", "anomalous", "category", "id"], rows))
            return 0
        print_results(service.anomaly(read_queries(args), heatmaps=args.heatmaps), args.json, _anomaly_line)
        return 0
    finally:
        service.close()


def register(commands) -> None:
    p = commands.add_parser("search", help="find catalog items matching photos")
    add_query_arguments(p)
    add_location_arguments(p)
    p.add_argument("--k", type=int, default=10, help="results per photo (default 10)")
    p.add_argument("--mode", default=None,
                   help="fused (default), local, or a global feature of the index: deep, colour, ae, ...")
    p.add_argument("--category", help="only items under this category path prefix")
    p.add_argument("--collapse", action="store_true",
                   help="one result per product (the item's 'product' attribute, else its category)")
    p.add_argument("--explain", metavar="OUT", help="folder for images showing why each result matched")
    p.add_argument("--config", help="TOML configuration file (its [search] table)")
    p.set_defaults(run=cmd_search)

    p = commands.add_parser("classify", help="propose a category path for item photos")
    add_query_arguments(p)
    add_location_arguments(p)
    p.set_defaults(run=cmd_classify)

    p = commands.add_parser("anomaly", help="score photos by autoencoder reconstruction error, or audit the catalog")
    add_query_arguments(p)
    add_location_arguments(p)
    p.add_argument("--heatmaps", metavar="OUT", help="folder for heatmaps of where reconstruction failed")
    p.add_argument("--audit", action="store_true", help="list the catalog's own most anomalous items")
    p.add_argument("--top", type=int, default=20, help="with --audit: how many items to list (default 20)")
    p.set_defaults(run=cmd_anomaly)
