"""``catalens train-ae`` and ``catalens anomaly``: fit the index's autoencoder, score photos, audit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _usage_error(message: str) -> Exception:
    from api.cli import UsageError

    return UsageError(message)


def cmd_train_ae(args: argparse.Namespace) -> int:
    from api.cli import _open_catalog
    from api.tables import format_table
    from indexer.autoencoder import LOSS_PLOT, train_index_autoencoder

    if args.epochs < 1:
        raise _usage_error("--epochs must be at least 1")
    if args.noise < 0:
        raise _usage_error("--noise must be >= 0")
    if not 0 < args.percentile < 100:
        raise _usage_error("--percentile must be between 0 and 100")
    index = _open_catalog(args)
    try:
        model = train_index_autoencoder(
            index, epochs=args.epochs, input_kind=args.input, noise=args.noise, percentile=args.percentile,
            progress=not args.quiet, fresh=args.fresh,
        )
    except ValueError as error:
        raise _usage_error(str(error)) from None
    finally:
        index.close()
    rows = [
        ("input", model.input_kind), ("epochs", model.epochs), ("code dims", model.code_dim),
        ("final loss", f"{model.loss_history_[-1]:.4f}"), ("threshold", f"{model.threshold_:.4f}"),
        ("loss curve", str(Path(index.models_dir) / LOSS_PLOT)),
    ]
    print(format_table(["autoencoder", "value"], rows))
    return 0


def cmd_anomaly(args: argparse.Namespace) -> int:
    from api.cli import _open_catalog, _read_queries
    from api.tables import format_table
    from indexer.autoencoder import NotFittedError
    from search.anomaly import audit_catalog, score_anomalies

    index = _open_catalog(args)
    try:
        if args.audit:
            if args.images or args.from_file:
                raise _usage_error("--audit scores the catalog's own items; give no query images with it")
            entries = audit_catalog(index, limit=args.top, progress=not args.json)
            if args.json:
                for entry in entries:
                    print(json.dumps({"id": entry.id, "image": entry.image, "category": entry.category,
                                      "score": round(entry.score, 6), "anomalous": entry.anomalous}, ensure_ascii=False))
            else:
                rows = [(rank, f"{e.score:.4f}", "yes" if e.anomalous else "", e.category, e.id)
                        for rank, e in enumerate(entries, 1)]
                print(format_table(["#", "score", "anomalous", "category", "id"], rows))
            return 0
        queries = _read_queries(args)
        for result in score_anomalies(index, queries, heatmaps_dir=args.heatmaps):
            if args.json:
                print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
            elif result.error:
                print(f"{result.query}: error: {result.error}")
            else:
                verdict = "ANOMALOUS" if result.anomalous else "normal"
                extra = f"  heatmap {result.heatmap}" if result.heatmap else ""
                print(f"{result.query}: {verdict} (score {result.score:.4f}, threshold {result.threshold:.4f}){extra}")
        return 0
    except NotFittedError as error:
        raise _usage_error(str(error)) from None
    finally:
        index.close()


def register(subparsers) -> None:
    from indexer.stores import add_backend_arguments

    p = subparsers.add_parser("train-ae", help="train the index's autoencoder (codes for --mode ae, anomaly scores)")
    p.add_argument("--index", help="index folder (or --backend es)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--input", choices=("features", "pixels"), default="features",
                   help="reconstruct the backbone's feature maps (default, better anomaly detection) or 64-px pixels")
    p.add_argument("--noise", type=float, default=0.0, help="denoising: std of Gaussian input noise (standardised units)")
    p.add_argument("--percentile", type=float, default=95.0,
                   help="threshold = this percentile of held-out catalog images' scores")
    p.add_argument("--fresh", action="store_true", help="ignore an interrupted run's checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_arguments(p)
    p.set_defaults(run=cmd_train_ae)

    p = subparsers.add_parser("anomaly", help="score photos by autoencoder reconstruction error, or audit the catalog")
    p.add_argument("images", nargs="*")
    p.add_argument("--index", help="index folder (or --backend es)")
    p.add_argument("--json", action="store_true", help="one JSON object per query per line")
    p.add_argument("--from-file", help="file with one query image path per line")
    p.add_argument("--heatmaps", help="folder for heatmaps of where reconstruction failed")
    p.add_argument("--audit", action="store_true", help="list the catalog's own most anomalous items")
    p.add_argument("--top", type=int, default=20, help="with --audit: how many items to list")
    add_backend_arguments(p)
    p.set_defaults(run=cmd_anomaly)
