"""Top-1 product accuracy of deep, local and fused search on the grocery val split, logo-crop mAP,
and indexing throughput with local features on against deep-only.

    .venv/bin/python benchmarks/bench_retrieval.py [--index DIR] [--throughput-images 200] [--sweep]
        [--ae-weights 0,0.1,0.2,0.5 [--ae-epochs 15]]

The catalog is iconic + train; queries are the val photos; a hit is right when its fine category
(the product) is the query's. ``--index`` reuses an index of that catalog built with local
features (otherwise one is built in a temporary folder, and its build time is reported).
``--ae-weights`` measures adding ``w * ae_cosine`` (autoencoder codes) to the fused score and to
the deep cosine alone (``deep+ae``: deep top-40 re-ranked); it trains the index's autoencoder
first where the index has none (this writes into ``--index``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.catalog import write_manifest  # noqa: E402
from datasets.grocery import catalog_items, grocery_root, split_photos  # noqa: E402
from indexer.config import IndexConfig  # noqa: E402
from indexer.imageio import load_rgb  # noqa: E402
from indexer.index import CatalogIndex  # noqa: E402
from indexer.pipeline import index_catalog  # noqa: E402
from search.engine import Query, SearchEngine, deep_retriever  # noqa: E402
from search.fusion import FusionConfig, ae_cosines, fuse_scores, fused_retriever  # noqa: E402
from search.local import local_retriever  # noqa: E402

GROUPS = ("Fruit", "Packages", "Vegetables")
MODES = {"deep": deep_retriever, "local": local_retriever, "fused": fused_retriever}
LOGO_BOXES = Path(__file__).resolve().parents[1] / "tests" / "data" / "logo_boxes.json"


def build(folder: Path, items, local: bool) -> tuple[Path, float, int]:
    manifest = write_manifest(items, folder / "catalog.jsonl")
    started = time.perf_counter()
    report = index_catalog(manifest, folder / "index", IndexConfig(local_features=local), progress=False)
    return folder / "index", time.perf_counter() - started, report.extracted


def deep_ae_retriever(weight: float):
    """Deep top-40 re-ranked by ``deep_cosine + weight * ae_cosine`` (no local side)."""

    def retrieve(engine: SearchEngine, query: Query, k: int, allowed):
        keys, scores = deep_retriever(engine, query, max(k, 40), allowed)
        config = FusionConfig(ae_weight=weight)
        fused_keys, fused_scores = fuse_scores(keys, scores, np.zeros(0, np.int64), {}, config, 1,
                                               ae_cosines(engine, query, keys))
        return fused_keys[:k], fused_scores[:k]

    return retrieve


def top1_table(engine: SearchEngine, photos, sweep: bool, ae_weights: tuple[float, ...] = ()) -> dict[str, dict[str, float]]:
    queries = [Query(load_rgb(photo.path), str(photo.path)) for photo in photos]
    table: dict[str, dict[str, float]] = {}
    latency: dict[str, float] = {}

    def evaluate(name: str, retriever) -> None:
        correct = np.zeros(len(photos), bool)
        started = time.perf_counter()
        for i, (photo, query) in enumerate(zip(photos, queries, strict=True)):
            keys, _ = retriever(engine, query, 1, None)
            record = engine.index.store.items([int(keys[0])]).get(int(keys[0])) if len(keys) else None
            correct[i] = record is not None and record.category == photo.category
        latency[name] = (time.perf_counter() - started) / len(photos) * 1000
        row = {"all": 100 * correct.mean()}
        for group in GROUPS:
            mask = np.array([photo.top == group for photo in photos])
            row[group] = 100 * correct[mask].mean()
        table[name] = row

    for name, retriever in MODES.items():
        evaluate(name, retriever)
    extra = engine.index.config.extra
    saved = extra.get("fusion")
    for weight in ae_weights:
        evaluate(f"deep+ae w={weight}", deep_ae_retriever(weight))
    for weight in ae_weights:
        extra["fusion"] = {**(saved or {}), "ae_weight": weight}
        evaluate(f"fused ae_weight={weight}", fused_retriever)
    if sweep:
        for rule, weights in (("weighted", (0.1, 0.25, 0.5, 1.0, 2.0)), ("rrf", (0.5, 1.0, 2.0))):
            for weight in weights:
                extra["fusion"] = {"rule": rule, "local_weight": weight}
                evaluate(f"fused {rule} w={weight}", fused_retriever)
    if sweep or ae_weights:
        if saved is None:
            extra.pop("fusion", None)
        else:
            extra["fusion"] = saved
    for name in table:
        table[name]["ms/query"] = latency[name]
    return table


def logo_map(engine: SearchEngine, root: Path) -> tuple[float, dict[str, float], float]:
    crops = json.loads(LOGO_BOXES.read_text())["crops"]
    products = list(engine.index.store.categories())

    def brand_of(category: str) -> str:
        return category.rsplit("/", 1)[-1].replace("-", " ")

    per_brand: dict[str, list[float]] = {}
    started = time.perf_counter()
    for crop in crops:
        image = Image.open(root / crop["image"]).convert("RGB").crop(tuple(crop["box"]))
        keys, _ = local_retriever(engine, Query(image, crop["image"]), 100, None)
        records = engine.index.store.items(keys)
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
    parser.add_argument("--index", type=Path, help="an index of the grocery iconic+train catalog with local features")
    parser.add_argument("--throughput-images", type=int, default=200, help="images per throughput run (0: skip)")
    parser.add_argument("--sweep", action="store_true", help="also compare fusion rules and weights")
    parser.add_argument("--ae-weights", default="", help="comma-separated ae_weight values to measure, e.g. 0,0.1,0.2,0.5")
    parser.add_argument("--ae-epochs", type=int, default=15, help="epochs when the autoencoder must be trained first")
    args = parser.parse_args()
    ae_weights = tuple(float(w) for w in args.ae_weights.split(",") if w.strip())
    root = grocery_root()
    items = catalog_items(("iconic", "train"), root)

    with tempfile.TemporaryDirectory() as tmp:
        if args.throughput_images:
            subset = items[:: max(1, len(items) // args.throughput_images)][: args.throughput_images]
            rates = {}
            for local in (False, True):
                _, seconds, extracted = build(Path(tmp) / f"tp-{local}", subset, local)
                rates[local] = extracted / seconds
            print(f"\nindexing throughput on {len(subset)} images (same script, same machine):")
            print(f"  deep only       {rates[False]:6.1f} img/s")
            print(f"  deep + RootSIFT {rates[True]:6.1f} img/s  ({rates[True] / rates[False]:.2f}x deep-only)")
        index_dir = args.index
        if index_dir is None:
            index_dir, seconds, extracted = build(Path(tmp) / "full", items, True)
            print(f"\nfull catalog with local features: {extracted} images in {seconds:.0f}s ({extracted / seconds:.1f} img/s)")
        index = CatalogIndex.open(index_dir)
        try:
            if ae_weights:
                from indexer.autoencoder import has_model, train_index_autoencoder

                if not has_model(index):
                    started = time.perf_counter()
                    train_index_autoencoder(index, epochs=args.ae_epochs, progress=False)
                    print(f"\nautoencoder trained on the catalog ({args.ae_epochs} epochs) in "
                          f"{time.perf_counter() - started:.0f}s")
            engine = SearchEngine(index)
            table = top1_table(engine, split_photos("val", root), args.sweep, ae_weights)
            print(f"\ntop-1 product accuracy (%) on val ({len(split_photos('val', root))} queries), catalog iconic+train:")
            columns = ["all", *GROUPS, "ms/query"]
            print(f"  {'mode':24s}" + "".join(f"{c:>11s}" for c in columns))
            for name, row in table.items():
                print(f"  {name:24s}" + "".join(f"{row[c]:11.1f}" for c in columns))
            mean_ap, per_brand, ms = logo_map(engine, root)
            print(f"\nlogo crops, --mode local: mAP over brands {mean_ap:.3f} ({ms:.0f} ms/query)")
            print("  " + "  ".join(f"{brand} {value:.2f}" for brand, value in sorted(per_brand.items())))
        finally:
            index.close()


if __name__ == "__main__":
    main()
