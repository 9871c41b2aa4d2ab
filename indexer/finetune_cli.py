"""``catalens finetune --index DIR``: train the metric-learning projection head on an index."""

from __future__ import annotations

import argparse
import json


def cmd_finetune(args: argparse.Namespace) -> int:
    from api.cli import UsageError, _open_catalog
    from api.tables import format_table
    from indexer.finetune import finetune_index
    from indexer.index import CatalogIndex

    index = _open_catalog(args)
    if args.top_block:
        return _finetune_top_block(index, args)
    if not isinstance(index, CatalogIndex):
        # The head re-embeds every deep vector into a FAISS index beside the folder index.
        raise UsageError(f"{index.root}: the projection head needs an --index folder; on Elasticsearch use --top-block")
    try:
        with index.lock:
            report = finetune_index(index, steps=args.steps)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    rows = [
        ("classify (held-out accuracy)", f"{report.classify_raw:.3f}", f"{report.classify_projected:.3f}"),
        ("search (held-out 1-NN accuracy)", f"{report.search_raw:.3f}", f"{report.search_projected:.3f}"),
    ]
    print(format_table(["use", "frozen features", "finetuned head"], rows))
    kept = ", ".join(report.kept_for) or "nothing (the head did not help; none stored)"
    print(f"\n{report.items} items, {report.categories} categories, {report.holdout} held out; "
          f"head kept for: {kept}; {report.seconds:.0f}s")
    return 0


def _finetune_top_block(index, args: argparse.Namespace) -> int:
    from api.cli import UsageError
    from indexer.finetune_top import finetune_top_block

    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    try:
        report = finetune_top_block(index, epochs=args.epochs, progress=not args.json)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(json.dumps(report))
    else:
        print(f"fine-tuned the top block on {report['items']} items in {report['categories']} categories "
              f"({report['epochs']} epochs, final loss {report['final_loss']:.3f}, {report['seconds']:.0f}s); "
              "classify now uses it")
    return 0


def register(subparsers) -> None:
    from indexer.stores import add_backend_arguments

    p = subparsers.add_parser("finetune", help="train a projection head on the index's deep features (CPU)")
    p.add_argument("--index", help="the index folder (not needed with --backend es)")
    add_backend_arguments(p)
    p.add_argument("--steps", type=int, default=300, help="training steps (batches of P categories x K items)")
    p.add_argument("--top-block", action="store_true",
                   help="instead: fine-tune the backbone's last block on the categories (for classify)")
    p.add_argument("--epochs", type=int, default=None,
                   help="with --top-block: passes over the catalog (default: 6, more for small catalogs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_finetune)
