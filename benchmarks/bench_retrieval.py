"""Top-1 product accuracy of every search mode on the grocery val split, logo-crop mAP, and indexing
throughput with all default features against deep only.

    .venv/bin/python benchmarks/bench_retrieval.py [--index DIR] [--throughput-images 200] [--sweep]
        [--weights '{"deep": 1, "sift": 0.5}' ...]

The catalog is iconic + train; queries are the val photos; a hit is right when its fine category
(the product) is the query's. ``--index`` reuses an index of that catalog (otherwise one is built
in a temporary folder, and its build time is reported). ``--sweep`` adds fused search under other
feature weights; ``--weights`` measures given weight sets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from catalens.api.tables import format_table
from catalens.datasets.catalog import write_manifest
from catalens.datasets.grocery import catalog_items, grocery_root, split_photos
from catalens.indexer.backends import open_catalog
from catalens.indexer.config import IndexConfig
from catalens.indexer.imageio import load_rgb
from catalens.indexer.pipeline import index_catalog
from catalens.search.engine import Query, SearchEngine
from catalens.search.settings import SearchSettings

GROUPS = ("Fruit", "Packages", "Vegetables")
LOGO_BOXES = Path(__file__).resolve().parents[1] / "tests" / "data" / "logo_boxes.json"
SWEEP = ({"deep": 1.0, "sift": 0.1}, {"deep": 1.0, "sift": 0.5}, {"deep": 1.0, "sift": 1.0},
         {"deep": 1.0, "sift": 0.2, "colour": 0.1}, {"deep": 1.0, "sift": 0.2, "colour": 0.3})


def build(folder: Path, items, features: list[str]) -> tuple[Path, float, int]:
    manifest = write_manifest(items, folder / "catalog.jsonl")
    started = time.perf_counter()
    report = index_catalog(manifest, folder / "index", IndexConfig(features=features), progress=False)
    return folder / "index", time.perf_counter() - started, report.extracted


def top1_rows(engine: SearchEngine, photos, runs: list[tuple[str, str, SearchSettings]]) -> list[tuple]:
    """One row per (name, mode, settings): top-1 accuracy overall and per group, ms a query."""
    queries = [Query(load_rgb(photo.path), str(photo.path)) for photo in photos]
    groups = np.array([photo.top for photo in photos])
    rows = []
    for name, mode, settings in runs:
        correct = np.zeros(len(photos), bool)
        started = time.perf_counter()
        for i, (photo, query) in enumerate(zip(photos, queries, strict=True)):
            keys, _ = engine.rank(query, mode, 1, None, settings)
            record = engine.catalog.items.items([int(keys[0])]).get(int(keys[0])) if len(keys) else None
            correct[i] = record is not None and record.category == photo.category
        ms = (time.perf_counter() - started) / len(photos) * 1000
        rows.append((name, f"{100 * correct.mean():.1f}", *(f"{100 * correct[groups == g].mean():.1f}" for g in GROUPS),
                     f"{ms:.1f}"))
    return rows


def logo_map(engine: SearchEngine, root: Path) -> tuple[float, dict[str, float], float]:
    crops = json.loads(LOGO_BOXES.read_text())["crops"]
    products = list(engine.catalog.items.categories())

    def brand_of(category: str) -> str:
        return category.rsplit("/", 1)[-1].replace("-", " ")

    per_brand: dict[str, list[float]] = {}
    started = time.perf_counter()
    for crop in crops:
        image = Image.open(root / crop["image"]).convert("RGB").crop(tuple(crop["box"]))
        keys, _ = engine.rank(Query(image, crop["image"]), "local", 100)
        records = engine.catalog.items.items(keys)
        relevant = sum(brand_of(c).startswith(crop["brand"]) for c in products)
        seen, hits, total = set(), 0, 0.0
        for key in keys:
            category = records[int(key)].category
            if category in seen:
                continue
            seen.add(category)
            if brand_of(category).startswith(crop["brand"]):
                hits += 1
                total += hits / len(seen)
        per_brand.setdefault(crop["brand"], []).append(total / relevant)
    ms = (time.perf_counter() - started) / len(crops) * 1000
    means = {brand: float(np.mean(values)) for brand, values in per_brand.items()}
    return float(np.mean(list(means.values()))), means, ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="an index of the grocery iconic+train catalog (default features)")
    parser.add_argument("--throughput-images", type=int, default=200, help="images per throughput run (0: skip)")
    parser.add_argument("--sweep", action="store_true", help="also fused search under other feature weights")
    parser.add_argument("--weights", action="append", default=[], help="a JSON weight set for fused search (repeatable)")
    args = parser.parse_args()
    root = grocery_root()
    items = catalog_items(("iconic", "train"), root)

    with tempfile.TemporaryDirectory() as tmp:
        if args.throughput_images:
            subset = items[:: max(1, len(items) // args.throughput_images)][: args.throughput_images]
            rates = {}
            for features in (["deep"], IndexConfig().features):
                _, seconds, extracted = build(Path(tmp) / "-".join(features), subset, features)
                rates[", ".join(features)] = extracted / seconds
            print(f"\nindexing throughput on {len(subset)} images (same script, same machine):")
            print(format_table(["features", "img/s"], [(name, f"{rate:.1f}") for name, rate in rates.items()]))
        index_dir = args.index
        if index_dir is None:
            index_dir, seconds, extracted = build(Path(tmp) / "full", items, IndexConfig().features)
            print(f"\nfull catalog, default features: {extracted} images in {seconds:.0f}s ({extracted / seconds:.1f} img/s)")
        catalog = open_catalog(index_dir)
        try:
            engine = SearchEngine(catalog)
            runs = [(mode, mode, engine.settings) for mode in engine.modes()]
            weight_sets = [json.loads(w) for w in args.weights] + (list(SWEEP) if args.sweep else [])
            runs += [(f"fused {json.dumps(w)}", "fused", SearchSettings(weights=w)) for w in weight_sets]
            photos = split_photos("val", root)
            rows = top1_rows(engine, photos, runs)
            print(f"\ntop-1 product accuracy (%) on val ({len(photos)} queries), catalog iconic+train "
                  f"(fused weights by default: {engine.weights()}):")
            print(format_table(["mode", "all", *GROUPS, "ms/query"], rows))
            mean_ap, per_brand, ms = logo_map(engine, root)
            print(f"\nlogo crops, --mode local: mAP over brands {mean_ap:.3f} ({ms:.0f} ms/query)")
            print("  " + "  ".join(f"{brand} {value:.2f}" for brand, value in sorted(per_brand.items())))
        finally:
            catalog.close()


if __name__ == "__main__":
    main()
