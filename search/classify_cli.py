"""``catalens classify IMAGE... --index DIR``: where query photos go in the catalog's category tree."""

from __future__ import annotations

import argparse
import json


def cmd_classify(args: argparse.Namespace) -> int:
    from api.cli import _open_catalog, _read_queries
    from api.tables import format_table
    from search.classify import classify

    queries = _read_queries(args)
    index = _open_catalog(args)
    failed = 0
    for result in classify(index, queries):
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
            failed += result.error is not None
            continue
        if result.error:
            print(f"{result.query}: error: {result.error}")
            failed += 1
            continue
        print(f"\n{result.query}: {result.category}")
        rows = [(depth, level.name, f"{level.confidence:.2f}") for depth, level in enumerate(result.levels, 1)]
        if rows:
            print(format_table(["level", "category", "confidence"], rows))
        print("nearest items: " + ", ".join(result.neighbours))
    return 1 if failed and failed == len(queries) else 0


def register(subparsers) -> None:
    from indexer.stores import add_backend_arguments

    p = subparsers.add_parser("classify", help="propose a category path for item photos")
    p.add_argument("images", nargs="*")
    p.add_argument("--index", help="the index folder (not needed with --backend es)")
    add_backend_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per query per line")
    p.add_argument("--from-file", help="file with one query image path per line")
    p.set_defaults(run=cmd_classify)
