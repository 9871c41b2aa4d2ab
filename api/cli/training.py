"""``catalens train-ae``, ``finetune`` and ``calibrate``: models fitted on the index's own catalog."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from catalens.api.cli.arguments import (
    UsageError,
    add_command,
    add_location_arguments,
    error_cause,
    open_service,
)
from catalens.api.tables import format_table


def _refit_after(service, stored: str, progress: bool) -> None:
    """The refit that follows a training command's commit; a full disk there is one line that says
    what is stored already and what to run once there is space (not the whole training again)."""
    from catalens.indexer.files import disk_full

    try:
        service.refit(progress=progress)
    except Exception as error:
        if not disk_full(error):
            raise
        raise UsageError(f"the disk is full ({error_cause(error)}); {stored} is stored with the index, but the match "
                         "calibration and classifier were not refitted: free some space and run 'catalens "
                         "calibrate'") from None


def cmd_train_ae(args: argparse.Namespace) -> int:
    from catalens.indexer.training.train_autoencoder import LOSS_PLOT

    if args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if args.noise < 0:
        raise UsageError("--noise must be >= 0")
    if not 0 < args.percentile < 100:
        raise UsageError("--percentile must be between 0 and 100")
    service = open_service(args)
    try:
        model = service.train_autoencoder(epochs=args.epochs, input_kind=args.input, noise=args.noise,
                                          percentile=args.percentile, progress=not args.quiet, fresh=args.fresh)
        # The 'ae' mode is new (or its codes changed): what search fits on the catalog follows now.
        _refit_after(service, "the autoencoder", progress=not args.quiet)
    except ValueError as error:
        raise UsageError(str(error)) from None
    finally:
        service.close()
    rows = [
        ("input", model.input_kind), ("epochs", model.epochs), ("code dims", model.code_dim),
        ("loss", f"{model.loss_history_[0]:.4f} -> {model.loss_history_[-1]:.4f} (the average photo: "
                 f"{model.baseline_loss_:.4f})"),
        ("threshold", f"{model.threshold_:.4f}"), ("loss curve", str(Path(service.catalog.models_dir) / LOSS_PLOT)),
    ]
    print(format_table(["autoencoder", "value"], rows))
    # Logged on stderr while training too; repeated here, beside the numbers, for whoever reads stdout.
    warning = model.loss_warning()
    if warning:
        print(f"\nwarning: {warning}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    unlabeled = []
    if args.unlabeled:
        from catalens.datasets import CatalogError, read_photo_list

        try:
            unlabeled = read_photo_list(args.unlabeled)
        except CatalogError as error:
            raise UsageError(f"--unlabeled {error}") from None
    service = open_service(args)
    try:
        report = service.finetune(steps=args.steps, progress=not args.json, unlabeled=unlabeled)
        # The features search and classify read may have changed: their fits follow now.
        _refit_after(service, "what finetune found", progress=not args.json)
    except ValueError as error:
        raise UsageError(str(error)) from None
    finally:
        service.close()
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    print(format_table(
        [f"held-out {report.held_out_kind} ({report.held_out})", "frozen network", "adapted network"],
        [("finds the right product", f"{100 * report.frozen_accuracy:.1f}%", f"{100 * report.adapted_accuracy:.1f}%")]))
    verdict = ("kept: search and classification now use it" if report.kept
               else "not kept (it did not find more products); the frozen network serves")
    photos = (f", self-trained on {report.pseudo_labelled} of {report.unlabeled} unlabeled photos"
              f" ({report.toward_shop_photos} products' rows{' and colour' if report.colour_moved else ''}"
              " moved toward them)" if report.unlabeled else "")
    print(f"\n{report.items} items, {report.products} products, {report.views} views, {report.steps} steps{photos}, "
          f"{report.seconds:.0f}s; {verdict}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.queries < 10:
        raise UsageError("--queries must be at least 10")
    service = open_service(args)
    try:
        model = service.calibrate(max_queries=args.queries, progress=not args.json)
    except ValueError as error:
        raise UsageError(str(error)) from None
    finally:
        service.close()
    if args.json:
        print(json.dumps({"modes": model.summary()}))
        return 0
    rows = [(row["mode"], row["queries"], f"{row['threshold']:.3f}", f"{100 * row['precision']:.1f}%",
             f"{100 * row['coverage']:.1f}%") if row["threshold"] < 1.0 else
            (row["mode"], row["queries"], "none", "-", "-") for row in model.summary()]
    print(format_table(["mode", "held-out queries", "match threshold", "match precision", "coverage"], rows))
    unjudged = [row["mode"] for row in model.summary() if row["threshold"] >= 1.0]
    if unjudged:
        one = len(unjudged) == 1
        print(f"\n{', '.join(unjudged)}: no threshold was right 95% of the time on the held-out queries, so "
              f"{'this mode never calls' if one else 'these modes never call'} a result a confident match "
              f"({'its' if one else 'their'} confidences are still given; a larger catalog, or finetune, can change it)")
    print(f"\nstored with the index; it counts as stale once more than {100 * model.max_stale:.0f}% of the catalog "
          "changes (index, remove, finetune and train-ae refit it at their end, a server in the background)")
    return 0


def register(commands) -> None:
    p = add_command(
        commands, "train-ae", "train the index's autoencoder (codes for --mode ae, anomaly scores)",
        description="Train an autoencoder on the index's own catalog: its codes become the 'ae' feature "
                    "(search --mode ae) and its reconstruction error the anomaly score (catalens anomaly). An "
                    "interrupted run resumes from its checkpoint.",
        epilog="example: catalens train-ae --index shop-index --epochs 20")
    add_location_arguments(p)
    p.add_argument("--epochs", type=int, default=15, help="passes over the catalog")
    p.add_argument("--input", choices=("features", "pixels"), default="features",
                   help="reconstruct the backbone's feature maps (better anomaly detection) or 64-px pixels")
    p.add_argument("--noise", type=float, default=0.0,
                   help="denoising: std of Gaussian noise added to the input (standardised units)")
    p.add_argument("--percentile", type=float, default=95.0,
                   help="anomaly threshold: this percentile of held-out catalog images' scores")
    p.add_argument("--fresh", action="store_true", help="ignore an interrupted run's checkpoint and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_train_ae)

    p = add_command(
        commands, "finetune", "adapt the network to the catalog's products, for search and classify (CPU)",
        description="Fine-tune the backbone's top stages on the catalog's products; search and classification "
                    "use the adapted network when it finds more products on held-out photos than the frozen one.",
        epilog="example: catalens finetune --index shop-index --unlabeled shelf-photos/")
    add_location_arguments(p)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 200, more for larger catalogs, at most 600)")
    p.add_argument("--unlabeled", metavar="PATH",
                   help="the shop's own photos without labels (a folder of photos, or a file listing one photo "
                        "path a line): the network is trained again on those it can name surely, which teaches "
                        "it what the shop's photos look like")
    # Before finetune did this by default, --top-block asked for the top stages alone.
    p.add_argument("--top-block", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.set_defaults(run=cmd_finetune)

    p = add_command(
        commands, "calibrate", "fit the calibrated match confidence of every search mode on the catalog itself",
        description="Search held-out queries made from the catalog's own items (photos left out, augmented views "
                    "of single photos, whole products left out) in every mode, and fit how a result's score, "
                    "margin, verified inliers and neighbours predict that it shows the query's product. Stored "
                    "with the index; index, remove, finetune and train-ae refit it at their end where the catalog "
                    "has changed by more than 20%% since; a search never fits it.",
        epilog="example: catalens calibrate --index shop-index")
    add_location_arguments(p)
    p.add_argument("--queries", type=int, default=240, help="held-out queries (more: steadier, slower)")
    p.add_argument("--json", action="store_true", help="the summary as one JSON object")
    p.set_defaults(run=cmd_calibrate)
