"""Several products in one photo: recall, precision and time of ``locate`` on composites of grocery val
photos, against whole-photo ``search`` as the baseline.

    .venv/bin/python benchmarks/bench_locate.py [--work /tmp/locate] [--count 40] [--draw artifacts/locate]

Composites (``catalens.datasets.composites``, seeded): 2x2 and 3x3 grids of val photos of different
products (cells 300-400 px), and 3 products pasted at random places and scales on clutter. The
catalog is iconic + train, indexed and fine-tuned once under ``--work`` (as bench_retrieval
builds it; about 20 minutes on 2 cores). Thresholds were tuned on seeds 100+; the default
seeds 0.. are held out from that.

A detection is right when its product (the fine category) is one the composite shows and its box
has IoU >= 0.5 with that product's cell, each shown product matched once (best-scored detection
first). Recall: right detections / products shown; precision: right detections / detections.
Confidence: the AUROC of the detections' confidences for "this detection is right", their expected
calibration error (10 bins), and precision / recall of the detections at confidence >= 0.5.
The baseline is ``search`` on the whole photo: the products among its top 4 (one per product),
with no box. Time: one ``locate`` call per photo, decoding included, after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from catalens.api.tables import format_table
from catalens.datasets.composites import Composite, layouts
from catalens.datasets.grocery import split_photos
from catalens.indexer.config import IndexConfig
from catalens.indexer.stores.backends import open_catalog
from catalens.search.engine import SearchEngine
from catalens.search.locate import Detection, LocateSettings, draw_detections, iou, locate

try:  # run as a script or as a module
    from benchmarks.bench_confidence import auroc, reliability
    from benchmarks.bench_retrieval import build, finetune
except ImportError:
    from bench_confidence import auroc, reliability  # type: ignore[no-redef]
    from bench_retrieval import build, finetune  # type: ignore[no-redef]


def score(composite: Composite, detections: list[Detection]) -> list[bool]:
    """Whether each detection is right: greedy matching, best detection first."""
    unmatched = list(composite.products)
    right = []
    for detection in detections:
        match = next((p for p in unmatched if p.category == detection.category and iou(detection.box, p.box) >= 0.5), None)
        if match is not None:
            unmatched.remove(match)
        right.append(match is not None)
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/locate"), help="where the index and photos are kept")
    parser.add_argument("--count", type=int, default=40, help="composites per layout")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--draw", type=Path, default=Path("artifacts/locate"),
                        help="folder for drawn examples: the best and worst photo of each layout")
    parser.add_argument("--min-region-score", type=float, default=None, help="override LocateSettings")
    parser.add_argument("--vote-tolerance", default=None,
                        help="override LocateSettings' box voting: a tolerance, or 'none' for the kept window's own box")
    parser.add_argument("--union-covered", default=None,
                        help="override LocateSettings' union test in NMS: a fraction, or 'none' for pairwise tests only")
    parser.add_argument("--snap-band", default=None,
                        help="override LocateSettings' box snapping: a band, or 'none' for boxes as found")
    parser.add_argument("--classify", choices=("yes", "no"), default=None,
                        help="override LocateSettings: whether the catalog's classifier names the boxes found")
    parser.add_argument("--window-maps", choices=("yes", "no"), default=None,
                        help="override LocateSettings: windows embedded from shared trunk maps (yes) or cropped (no)")
    parser.add_argument("--no-baseline", action="store_true", help="skip whole-photo search")
    args = parser.parse_args()
    overrides = {} if args.min_region_score is None else {"min_region_score": args.min_region_score}
    if args.vote_tolerance is not None:
        overrides["vote_tolerance"] = None if args.vote_tolerance.lower() == "none" else float(args.vote_tolerance)
    if args.union_covered is not None:
        overrides["union_covered"] = None if args.union_covered.lower() == "none" else float(args.union_covered)
    if args.snap_band is not None:
        overrides["snap_band"] = None if args.snap_band.lower() == "none" else float(args.snap_band)
    if args.classify is not None:
        overrides["classify"] = args.classify == "yes"
    if args.window_maps is not None:
        overrides["window_maps"] = args.window_maps == "yes"
    settings = LocateSettings(**overrides)
    index = build(args.work / "full", ("iconic", "train"), IndexConfig())
    finetune(index)  # the default workflow (index, then finetune); kept in the index, done once
    catalog = open_catalog(index)
    engine = SearchEngine(catalog)
    photos = split_photos("val")
    rows = []
    args.draw.mkdir(parents=True, exist_ok=True)
    for layout, composites in layouts(photos, args.count, args.seed).items():
        folder = args.work / "composites"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for composite in composites:
            path = folder / f"{composite.name}.jpg"
            if not path.is_file():
                composite.image.save(path, quality=92)
            paths.append(path)
        locate(engine, [paths[0]], settings=settings)  # warm-up: models loaded
        engine.search([paths[0]], k=4)  # warm-up: the match calibration fitted or read
        right = shown = found = 0
        seconds, per_photo, confident = [], [], []
        for composite, path in zip(composites, paths, strict=True):
            started = time.perf_counter()
            detections = locate(engine, [path], settings=settings)[0].detections or []
            seconds.append(time.perf_counter() - started)
            flags = score(composite, detections)
            r, n = sum(flags), len(flags)
            right, found, shown = right + r, found + n, shown + len(composite.products)
            confident += [(d.confidence, flag) for d, flag in zip(detections, flags, strict=True) if d.confidence is not None]
            per_photo.append((r / len(composite.products), -n, composite, detections))
        confidence, flags = (np.array([c for c, _ in confident]), np.array([f for _, f in confident], bool)) \
            if confident else (np.zeros(0), np.zeros(0, bool))
        sure = confidence >= 0.5
        rows.append((layout, "locate", f"{100 * right / shown:.1f}", f"{100 * right / max(found, 1):.1f}",
                     f"{found / len(composites):.1f}", f"{statistics.median(seconds):.2f}", f"{max(seconds):.2f}",
                     f"{auroc(confidence, flags):.3f}" if len(flags) else "-",
                     f"{reliability(confidence, flags)[0]:.3f}" if len(flags) else "-",
                     f"{100 * flags[sure].mean():.1f} / {100 * flags[sure].sum() / shown:.1f}" if sure.any() else "-"))
        if not args.no_baseline:
            hit = listed = 0
            b_seconds = []
            for composite, path in zip(composites, paths, strict=True):
                started = time.perf_counter()
                results = engine.search([path], k=4, settings=engine.settings.merged(collapse=True))[0].results or []
                b_seconds.append(time.perf_counter() - started)
                categories = {h.category for h in results}
                hit += len(categories & {p.category for p in composite.products})
                listed += len(results)
            rows.append((layout, "search, top 4 (no boxes)", f"{100 * hit / shown:.1f}", f"{100 * hit / max(listed, 1):.1f}",
                         f"{listed / len(composites):.1f}", f"{statistics.median(b_seconds):.2f}", f"{max(b_seconds):.2f}",
                         "", "", ""))
        per_photo.sort(key=lambda entry: (entry[0], entry[1]))
        for tag, (_, _, composite, detections) in (("worst", per_photo[0]), ("best", per_photo[-1])):
            out = args.draw / f"{composite.name}-{tag}.png"
            draw_detections(composite.image, detections).save(out)
        print(f"  {layout}: done ({len(composites)} photos)", flush=True)
    catalog.close()
    print(f"\nlocate on composites of grocery val ({args.count} photos a layout; catalog iconic + train):")
    print(format_table(["layout", "method", "recall %", "precision %", "detections/photo", "median s", "max s",
                        "AUROC confidence", "ECE", "confidence >= 0.5: precision / recall %"], rows))


if __name__ == "__main__":
    main()
