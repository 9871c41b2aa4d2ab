"""Top-1 product accuracy on the grocery val split, one row per step of the search pipeline, for a
catalog of iconic + train photos and for the iconic images alone; logo-crop mAP; latency.

    .venv/bin/python benchmarks/bench_retrieval.py [--catalogs full,iconic] [--work DIR] [--folds 0]
        [--sweep] [--weights '{"deep_ft": 1, "sift": 0.5}' ...]

For each catalog it builds (or reuses, in ``--work``, default benchmarks/out/retrieval) an index
with ImageNet scaling (catalens 0.1's preprocessing) and one with the default configuration,
runs ``catalens finetune`` on the latter (its time is printed), and measures, on the 296 val
photos (a hit is right when its product, the fine category, is the query's):

    deep, imagenet scaling   the frozen network as catalens 0.1 ran it
    deep                     + input scaling as the weights were trained
    deep_ft                  + the network adapted to the catalog (finetune)
    + verified local matches fused search of deep_ft (or deep) and SIFT verification
    + every photo of a product  a product's other photos count too (product_weight 0.1)
    + colour                 the colour histogram in the fused score: the default mode as shipped

``--sweep`` adds fused search under other weights. p50 is one query through
``SearchEngine.search`` (decoding and extraction included), one at a time, after a warm-up.
``--folds N`` also runs every row on the first N shooting-session folds of train: for iconic +
train, each fold's photos as queries against the rest (a key filter on the full index; the
adapted rows are optimistic, finetune saw those photos); for the iconic catalog, each fold's
photos as queries (held out from everything it was built and adapted on). Val alone over-fits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

# `catalens index` as the CLI runs it: then fits what search uses (the classifier, the confidence)
from catalens.api.service import index as index_catalog
from catalens.api.tables import format_table
from catalens.datasets.catalog import write_manifest
from catalens.datasets.grocery import catalog_items, grocery_root, split_photos, train_folds
from catalens.indexer.config import IndexConfig
from catalens.indexer.imageio import load_query
from catalens.indexer.stores import ItemFilter, item_key
from catalens.indexer.stores.backends import open_catalog
from catalens.search.engine import Query, SearchEngine
from catalens.search.settings import SearchSettings

GROUPS = ("Fruit", "Packages", "Vegetables")
LOGO_BOXES = Path(__file__).resolve().parents[1] / "tests" / "data" / "logo_boxes.json"
SPLITS = {"full": ("iconic", "train"), "iconic": ("iconic",)}


def build(folder: Path, splits: tuple[str, ...], config: IndexConfig) -> Path:
    index = folder / "index"
    if not (index / "catalens.json").is_file():
        manifest = write_manifest(catalog_items(splits), folder / "catalog.jsonl")
        started = time.perf_counter()
        report = index_catalog(manifest, index, config, progress=True)
        print(f"  indexed {report.added} images into {index} in {time.perf_counter() - started:.0f}s")
    return index


def finetune(index: Path) -> dict:
    catalog = open_catalog(index)
    try:
        if "adaptation" not in catalog.meta:
            from catalens.indexer.training.adaptation import adapt_catalog
            from catalens.search.refit import refit_catalog

            adapt_catalog(catalog, progress=True)
            refit_catalog(catalog, progress=True)  # as `catalens finetune` does at its end
        return catalog.meta["adaptation"]
    finally:
        catalog.close()


def accuracy(engine: SearchEngine, photos, queries, mode: str, settings: SearchSettings,
             filters: list[ItemFilter | None] | None = None) -> tuple[str, ...]:
    groups = np.array([photo.top for photo in photos])
    correct = np.zeros(len(photos), bool)
    for i, (photo, query) in enumerate(zip(photos, queries, strict=True)):
        keys, _ = engine.rank_products(query, mode, 1, filters[i] if filters else None, settings)
        record = engine.catalog.items.items([int(keys[0])]).get(int(keys[0])) if len(keys) else None
        correct[i] = record is not None and record.category == photo.category
    return (f"{100 * correct.mean():.1f}", *(f"{100 * correct[groups == g].mean():.1f}" for g in GROUPS))


def p50_ms(engine: SearchEngine, paths: list[Path], mode: str, settings: SearchSettings, n: int = 40) -> float:
    engine.search([paths[0]], mode=mode, settings=settings)  # warm-up: models loaded, caches filled
    times = []
    for path in paths[:n]:
        started = time.perf_counter()
        engine.search([path], mode=mode, settings=settings)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def logo_map(engine: SearchEngine, root: Path) -> float:
    crops = json.loads(LOGO_BOXES.read_text())["crops"]
    products = list(engine.catalog.items.categories())

    def brand_of(category: str) -> str:
        return category.rsplit("/", 1)[-1].replace("-", " ")

    per_brand: dict[str, list[float]] = {}
    for crop in crops:
        image = Image.open(root / crop["image"]).convert("RGB").crop(tuple(crop["box"]))
        keys, _ = engine.rank(Query(image, crop["image"]), "local", 100)
        records = engine.catalog.items.items(keys)
        relevant = sum(brand_of(c).startswith(crop["brand"]) for c in products)
        seen, hits, total = set(), 0, 0.0
        for key in keys:
            category = records[int(key)].category
            if category not in seen:
                seen.add(category)
                if brand_of(category).startswith(crop["brand"]):
                    hits += 1
                    total += hits / len(seen)
        per_brand.setdefault(crop["brand"], []).append(total / relevant)
    return float(np.mean([np.mean(v) for v in per_brand.values()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogs", default="full,iconic", help="full (iconic + train) and/or iconic")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "retrieval",
                        help="where the indexes are built once and reused")
    parser.add_argument("--folds", type=int, default=0, help="also this many shooting-session folds of train")
    parser.add_argument("--sweep", action="store_true", help="also fused search under other feature weights")
    parser.add_argument("--weights", action="append", default=[], help="a JSON weight set for fused search (repeatable)")
    args = parser.parse_args()
    root = grocery_root()
    photos = split_photos("val", root)
    paths = [photo.path for photo in photos]
    defaults = SearchSettings()
    for name in args.catalogs.split(","):
        splits = SPLITS[name]
        print(f"\n== catalog: {' + '.join(splits)}")
        old = build(args.work / f"{name}-imagenet", splits, IndexConfig(input_scaling="imagenet"))
        new = build(args.work / name, splits, IndexConfig())
        started = time.perf_counter()
        report = finetune(new)
        print(f"  finetune: {report['items']} items, {report['views']} views, {report['steps']} steps, "
              f"{report['seconds']:.0f}s (held-out {report['held_out_kind']}: frozen "
              f"{100 * report['frozen_accuracy']:.1f}%, adapted {100 * report['adapted_accuracy']:.1f}%, "
              f"kept: {report['kept']}){'' if time.perf_counter() - started > 5 else ' [from an earlier run]'}")
        rows = []
        # Decoded as a search decodes them; each Query keeps what it computed per catalog.
        queries = [Query(load_query(path), str(path)) for path in paths]
        catalog = open_catalog(old)
        engine = SearchEngine(catalog)
        rows.append(("deep, imagenet scaling", *accuracy(engine, photos, queries, "deep", defaults),
                     f"{p50_ms(engine, paths, 'deep', defaults):.0f}"))
        catalog.close()
        catalog = open_catalog(new)
        engine = SearchEngine(catalog)
        adapted = "deep_ft" in catalog.config.features
        ft = "deep_ft" if adapted else "deep"
        # Each step adds one thing to the one before; the last row is the default mode as shipped.
        verified = {ft: 1.0, "sift": 0.2}
        steps = [("deep", "deep", defaults)]
        if adapted:
            steps.append(("deep_ft", "deep_ft", defaults))
        steps += [
            ("+ verified local matches", "fused", defaults.merged(weights=verified, product_weight=0.0)),
            ("+ every photo of a product", "fused", defaults.merged(weights=verified, product_weight=0.1)),
            ("+ colour (fused, the default)", "fused", defaults),
        ]
        if adapted:  # what the same default search gives before finetune (the frozen network)
            frozen = {name: w for name, w in engine.weights(defaults).items() if name != "deep_ft"}
            steps.append(("fused before finetune", "fused", defaults.merged(weights={**frozen, "deep": 1.0})))
        weight_sets = [json.loads(w) for w in args.weights]
        if args.sweep:
            weight_sets += [{ft: 1.0, "sift": w, "colour": 0.3} for w in (0.1, 0.5)] + \
                [{ft: 1.0, "sift": 0.2, "colour": w} for w in (0.2, 0.5)]
        steps += [(f"fused {json.dumps(w)}", "fused", defaults.merged(weights=w)) for w in weight_sets]
        for label, mode, settings in steps:
            rows.append((label, *accuracy(engine, photos, queries, mode, settings), f"{p50_ms(engine, paths, mode, settings):.0f}"))
        print(f"\ntop-1 product accuracy (%) on val ({len(photos)} queries):")
        print(format_table(["step", "all", *GROUPS, "p50 ms"], rows))
        print(f"logo crops, --mode local: mAP over brands {logo_map(engine, root):.3f}")
        if args.folds:
            train = split_photos("train", root)
            folds = train_folds(train)
            fold_rows = []
            for fold in range(args.folds):
                chosen = [photo for photo, f in zip(train, folds, strict=True) if f == fold]
                filters = None
                if name == "full":  # the fold's own photos leave the catalog
                    held = np.array([item_key(p.path.relative_to(root).as_posix()) for p in chosen], np.int64)
                    keep = np.setdiff1d(np.array(sorted(item_key(i.id) for i in catalog_items(splits, root)), np.int64), held)
                    filters = [ItemFilter(keys=keep)] * len(chosen)
                fold_queries = [Query(load_query(p.path), str(p.path)) for p in chosen]
                for label, mode, settings in steps:
                    fold_rows.append((f"fold {fold}", label,
                                      *accuracy(engine, chosen, fold_queries, mode, settings, filters)))
            if name == "full":
                print(f"\nshooting-session folds of train (queries: the fold's photos; catalog: the rest; {ft} from "
                      "the model trained on all of train, so adapted rows are optimistic):")
            else:
                print("\nshooting-session folds of train as queries (photos the iconic catalog and its finetune "
                      "never saw: a held-out check as fair as val, and larger):")
            print(format_table(["fold", "step", "all", *GROUPS], fold_rows))
        catalog.close()


if __name__ == "__main__":
    main()
