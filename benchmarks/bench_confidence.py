"""Calibrated match confidence on an open-set split of grocery: how well the top result's
confidence says "right", how calibrated it is, and what ``match`` gives at the default threshold.

    .venv/bin/python -m benchmarks.bench_confidence [--catalogs full,iconic] [--work DIR] [--modes ...]
        [--queries 240] [--absent 0.2] [--seed 0] [--finetune [--paired]]

Protocol: ``--absent`` of the 81 products (chosen with ``--seed``) are left out of the catalog;
the catalog is the iconic + train photos of the rest (``full``), or their iconic images alone
(``iconic``); the queries are all 296 val photos, so the absent products' photos (whose top-1 is
always wrong) are queried too. Each catalog's index is built once under ``--work`` and calibrated
as ``catalens calibrate`` does (held-out queries made from its own items, never from val). A
result is right when its leaf category is the query's.

Per catalog and mode it prints: top-1 accuracy; AUROC of the top result's confidence for "the
top-1 is right", beside the raw score's AUROC; the expected calibration error (10 equal-width
bins) of that confidence; at the index's default threshold, the precision and coverage of
``match`` and the share of absent-product photos that still get one. It saves a reliability
diagram per catalog (``DIR/reliability-<catalog>.png``). ``--finetune`` runs ``catalens finetune`` on
each catalog first (its own index folder), as a shop following the README would, and calibrates after it.
``--paired`` (with ``--finetune``) then fits the calibration a second time on the same index from any
stored item (as before finetune kept its held-out photos for it) and prints the fused row of both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

# `catalens index` as the CLI runs it: then fits what search uses (the classifier, the confidence)
from catalens.api.service import index as index_catalog
from catalens.api.tables import format_table
from catalens.datasets.catalog import write_manifest
from catalens.datasets.grocery import catalog_items, grocery_root, iconic_photos, split_photos
from catalens.indexer.config import IndexConfig
from catalens.indexer.imageio import load_query
from catalens.indexer.stores.backends import open_catalog
from catalens.search.calibration import (
    CALIBRATION,
    MODEL_FILE,
    MatchCalibrator,
    annotate,
    calibrate_catalog,
)
from catalens.search.classify import HierarchicalFewShotClassifier
from catalens.search.engine import Query, QueryResult, SearchEngine

SPLITS = {"full": ("iconic", "train"), "iconic": ("iconic",)}


def absent_products(fraction: float, seed: int) -> set[str]:
    """The leaf categories left out of the catalog: ``fraction`` of them, chosen with ``seed``."""
    categories = sorted({photo.category for photo in iconic_photos()})
    rng = np.random.default_rng(seed)
    return set(rng.choice(categories, round(fraction * len(categories)), replace=False).tolist())


def build(folder: Path, splits: tuple[str, ...], absent: set[str]) -> Path:
    index = folder / "index"
    if not (index / "catalens.json").is_file():
        items = [item for item in catalog_items(splits) if item.category not in absent]
        manifest = write_manifest(items, folder / "catalog.jsonl")
        started = time.perf_counter()
        report = index_catalog(manifest, index, IndexConfig(), progress=True)
        print(f"  indexed {report.added} images into {index} in {time.perf_counter() - started:.0f}s")
    return index


def adapted(index: Path) -> None:
    """``catalens finetune`` on the index, once (its report is kept in the index's metadata)."""
    from catalens.indexer.training.adaptation import adapt_catalog

    catalog = open_catalog(index)
    try:
        if "adaptation" not in catalog.meta:
            from catalens.search.refit import refit_catalog

            report = adapt_catalog(catalog, progress=True)
            refit_catalog(catalog, progress=True)  # as `catalens finetune` does at its end
            print(f"  finetune: {report.items} items, {report.steps} steps, {report.seconds:.0f}s, held-out "
                  f"{report.held_out_kind} {report.held_out}: frozen {100 * report.frozen_accuracy:.1f}%, adapted "
                  f"{100 * report.adapted_accuracy:.1f}%, kept: {report.kept}")
    finally:
        catalog.close()


def calibrated(index: Path, queries: int) -> MatchCalibrator:
    """The index's stored calibration where it still describes the index, else one fitted now."""
    path = index / "models" / MODEL_FILE
    catalog = open_catalog(index)
    try:
        state = CALIBRATION.status(catalog)
        if state.stored and state.fresh:
            print(f"  calibration: reusing {path}")
            return state.model
        if state.model is not None:
            print(f"  calibration: {path} is stale ({state.reason})")
        started = time.perf_counter()
        model = calibrate_catalog(catalog, max_queries=queries)
        print(f"  calibration: fitted on the catalog in {time.perf_counter() - started:.0f}s (as catalens calibrate)")
        return model
    finally:
        catalog.close()


def paired_row(engine: SearchEngine, photos, queries, is_absent: np.ndarray, label: str,
               only_untrained: bool) -> tuple:
    """The fused row of a calibration fitted here on ``engine``'s catalog, asked only from untrained
    items or from any."""
    from catalens.search.calibration import fit_match_calibration

    calibrator = fit_match_calibration(engine.catalog, only_untrained=only_untrained)
    right, confidence, matched = [], [], []
    for photo, query in zip(photos, queries, strict=True):
        result = answer(engine, query, "fused", calibrator)
        right.append(result.results[0].category == photo.category)
        confidence.append(result.results[0].confidence)
        matched.append(result.match is not None)
    right, confidence, matched = map(np.asarray, (right, confidence, matched))
    precision = right[matched].mean() if matched.any() else float("nan")
    return (label, f"{auroc(confidence, right):.3f}", f"{reliability(confidence, right)[0]:.3f}",
            f"{calibrator.threshold('fused'):.2f}", f"{100 * precision:.1f}", f"{100 * matched.mean():.1f}",
            f"{100 * matched[is_absent].mean():.1f}")


def auroc(scores: np.ndarray, right: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(right, scores)) if 0 < right.sum() < len(right) else float("nan")


def reliability(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> tuple[float, list[tuple[float, float, int]]]:
    """(expected calibration error, per non-empty bin (mean confidence, accuracy, count))."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        inside = which == b
        if inside.any():
            mean, accuracy = float(confidence[inside].mean()), float(right[inside].mean())
            ece += inside.mean() * abs(mean - accuracy)
            table.append((mean, accuracy, int(inside.sum())))
    return ece, table


def answer(engine: SearchEngine, query: Query, mode: str, calibrator: MatchCalibrator) -> QueryResult:
    """What ``SearchEngine.search`` answers, for a query decoded once and ranked in several modes."""
    settings = engine.settings
    keys, scores = engine.rank_products(query, mode, settings.k, None, settings)
    result = QueryResult(query=query.name, results=engine.hits(keys, scores))
    return annotate(engine.catalog, query, mode, None, settings, result, calibrator)


def classification(catalog, photos, queries, is_absent: np.ndarray) -> list[tuple]:
    """Rows: the best guess at the leaf, and where the confident ``category`` stops and how often it is right.

    "its leaf" is the guess's own leaf, at whatever depth the tree puts it (some grocery leaves
    sit at the second level, most at the third)."""
    from catalens.search.classify import UNKNOWN, classify

    results = []
    for first in range(0, len(queries), 16):
        chunk = queries[first:first + 16]
        results += classify(catalog, [q.image for q in chunk], names=[q.name for q in chunk])
    leaf_right, depth, at_leaf, right = [], [], [], []
    for photo, result in zip(photos, results, strict=True):
        guess = "/".join(level.name for level in result.levels)
        leaf_right.append(guess == photo.category)
        stopped = 0 if result.category == UNKNOWN else result.category.count("/") + 1
        depth.append(stopped)
        at_leaf.append(stopped > 0 and stopped == len(result.levels))
        right.append(stopped > 0 and (photo.category + "/").startswith(result.category + "/"))
    leaf_right, depth, at_leaf, right = map(np.asarray, (leaf_right, depth, at_leaf, right))
    rows = []
    for label, subset in (("all val photos", np.ones(len(photos), bool)), ("present products", ~is_absent),
                          ("absent products", is_absent)):
        d, r, leaf = depth[subset], right[subset], at_leaf[subset]
        answered = d > 0
        rows.append((label, int(subset.sum()), f"{100 * leaf_right[subset].mean():.1f}",
                     *(f"{100 * (d == k).mean():.1f}" for k in (0, 1, 2, 3)), f"{100 * leaf.mean():.1f}",
                     f"{100 * r[answered].mean():.1f}" if answered.any() else "-",
                     *(f"{100 * r[d == k].mean():.1f}" if (d == k).any() else "-" for k in (1, 2, 3)),
                     f"{100 * r[leaf].mean():.1f}" if leaf.any() else "-"))
    return rows


def plot(path: Path, title: str, curves: dict[str, list[tuple[float, float, int]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for mode, table in curves.items():
        axes.plot([t[0] for t in table], [t[1] for t in table], marker="o", label=mode)
    axes.set(xlabel="confidence of the top result", ylabel="share of top results that are right", xlim=(0, 1),
             ylim=(0, 1), title=title)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogs", default="full,iconic", help="full (iconic + train) and/or iconic")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "confidence",
                        help="where the indexes are built once and reused, and the diagrams are saved")
    parser.add_argument("--modes", default=None, help="comma-separated modes (default: every mode of the index)")
    parser.add_argument("--queries", type=int, default=240, help="held-out catalog queries the calibration uses")
    parser.add_argument("--absent", type=float, default=0.2, help="share of products left out of the catalog")
    parser.add_argument("--seed", type=int, default=0, help="which products are left out")
    parser.add_argument("--finetune", action="store_true", help="adapt the network (catalens finetune) before calibrating")
    parser.add_argument("--paired", action="store_true",
                        help="with --finetune: also calibrate from any stored item, not only untrained ones, and compare")
    args = parser.parse_args()
    grocery_root()
    absent = absent_products(args.absent, args.seed)
    photos = split_photos("val")
    queries = [Query(load_query(photo.path), str(photo.path)) for photo in photos]
    is_absent = np.array([photo.category in absent for photo in photos])
    print(f"{len(absent)} of 81 products absent from the catalogs; {len(photos)} val photos queried, "
          f"{is_absent.sum()} of them of absent products")
    for name in args.catalogs.split(","):
        print(f"\n== catalog: {' + '.join(SPLITS[name])} of the present products")
        work = args.work / f"{name}-absent{args.absent:g}-seed{args.seed}{'-finetune' if args.finetune else ''}"
        index = build(work, SPLITS[name], absent)
        if args.finetune:
            adapted(index)
        calibrator = calibrated(index, args.queries)
        catalog = open_catalog(index)
        engine = SearchEngine(catalog)
        modes = args.modes.split(",") if args.modes else engine.modes()
        rows, curves = [], {}
        for mode in modes:
            right, confidence, score, matched, seconds = [], [], [], [], time.perf_counter()
            for photo, query in zip(photos, queries, strict=True):
                result = answer(engine, query, mode, calibrator)
                top = result.results[0]
                right.append(top.category == photo.category)
                confidence.append(top.confidence)
                score.append(top.score)
                matched.append(result.match is not None)
            right, confidence, score, matched = map(np.asarray, (right, confidence, score, matched))
            ece, table = reliability(confidence, right)
            curves[mode] = table
            precision = right[matched].mean() if matched.any() else float("nan")
            rows.append((mode, f"{100 * right.mean():.1f}", f"{auroc(confidence, right):.3f}", f"{auroc(score, right):.3f}",
                         f"{ece:.3f}", f"{calibrator.threshold(mode):.2f}", f"{100 * precision:.1f}",
                         f"{100 * matched.mean():.1f}", f"{100 * matched[is_absent].mean():.1f}",
                         f"{1000 * (time.perf_counter() - seconds) / len(photos):.0f}"))
        print(format_table(["mode", "top-1 right %", "AUROC conf", "AUROC score", "ECE", "threshold",
                            "match precision %", "coverage %", "absent matched %", "ms/query"], rows))
        print("  calibration data (held-out catalog queries): " + "; ".join(
            f"{r['mode']} precision {100 * r['precision']:.1f}% coverage {100 * r['coverage']:.1f}%"
            for r in calibrator.summary()))
        print("\n  classify: best guess at the leaf (levels), and the confident category (threshold "
              f"{HierarchicalFewShotClassifier().level_threshold:g}): % stopping at each depth and at the guess's own "
              "leaf, % right where it stops")
        print(format_table(["photos", "n", "leaf guess right %", "unknown %", "depth 1 %", "depth 2 %", "depth 3 %",
                            "its leaf %", "right % (answered)", "right @1", "right @2", "right @3", "right @leaf"],
                           classification(catalog, photos, queries, is_absent)))
        diagram = args.work / f"reliability-{name}.png"
        plot(diagram, f"{name} catalog, open-set val ({len(photos)} photos)", curves)
        print(f"  reliability diagram: {diagram}")
        if args.finetune and args.paired:
            print("\n  fused, the calibration asked from the items the adapted network never trained on, and from any item:")
            print(format_table(["calibration queries", "AUROC conf", "ECE", "threshold", "match precision %",
                                "coverage %", "absent matched %"],
                               [paired_row(engine, photos, queries, is_absent, label, only_untrained)
                                for label, only_untrained in (("untrained items (shipped)", True), ("any item", False))]))
        catalog.close()


if __name__ == "__main__":
    main()
