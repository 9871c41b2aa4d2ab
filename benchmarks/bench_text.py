"""The ``text`` feature on grocery Packages: brand search by words, fused top-1, and what it costs.

    .venv/bin/python -m benchmarks.bench_text [--work DIR] [--limit N]

The catalog is every val and train photo of Packages (964) with opaque ids (``pkg-0001``), no
titles and coarse categories only (``Packages/Milk``): the brand is only printed on the pack.
Two indexes are built (or reused, in ``--work``): the default features, and the default plus
``text`` (OCR); the difference of their indexing times is the feature's cost. Then:

- brand search: ``search --text BRAND`` for each of the 9 brands; precision@10 counts results
  whose photo is of a product of that brand;
- fused top-1 on the 100 val photos against the train photos (val items filtered out), right
  when the top result's product (fine class, known to the benchmark only) is the query's; with
  ``text`` at weight 0 and at others; sibling confusions: wrong products of the query's brand;
- logo crops (``tests/data/logo_boxes.json``, cut from the iconic images), ``--mode local``:
  mean over brands of the AP of same-brand products among the top 100, with the words read on
  the crop (``local_text_weight`` 1) and without (0);
- p50 of one fused query, and of one text search.

``--parts`` runs some of brand, fused, logo, speed (default all).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from catalens.api.tables import format_table
from catalens.datasets.catalog import CatalogItem
from catalens.datasets.grocery import grocery_root, split_photos
from catalens.indexer.config import IndexConfig
from catalens.indexer.imageio import load_query
from catalens.indexer.pipeline import index_catalog
from catalens.indexer.stores import ItemFilter, item_key
from catalens.indexer.stores.backends import open_catalog
from catalens.search.engine import Query, SearchEngine
from catalens.search.settings import SearchSettings

LOGO_BOXES = Path(__file__).resolve().parents[1] / "tests" / "data" / "logo_boxes.json"
BRANDS = ("Alpro", "Arla", "Bravo", "Garant", "God-Morgon", "Oatly", "Tropicana", "Valio", "Yoggi")
DEFAULT = ["deep", "colour", "sift"]


def brand_of(fine: str) -> str:
    product = fine.rsplit("/", 1)[-1]
    return next((brand for brand in BRANDS if product.startswith(brand)), "")


def build(folder: Path, items: list[CatalogItem], features: list[str]) -> tuple[Path, float]:
    index = folder / "index"
    stamp = folder / "seconds.txt"
    if not (index / "catalens.json").is_file() or not stamp.is_file():
        report = index_catalog(items, index, IndexConfig(features=features), progress=True)
        stamp.write_text(f"{report.extract_seconds:.1f}")
    return index, float(stamp.read_text())


def top1(engine: SearchEngine, queries, fine_of: dict[int, str], settings: SearchSettings, keep: ItemFilter):
    right = siblings = 0
    for query, fine in queries:
        keys, _ = engine.rank_products(query, "fused", 1, keep, settings)
        found = fine_of.get(int(keys[0]), "") if len(keys) else ""
        right += found == fine
        siblings += found != fine and brand_of(found) == brand_of(fine) != ""
    return 100 * right / len(queries), siblings


def logo_map(engine: SearchEngine, fine_of: dict[int, str], settings: SearchSettings) -> float:
    """Mean over brands of each crop's AP of same-brand products in its top 100, --mode local."""
    products = sorted(set(fine_of.values()))
    per_brand: dict[str, list[float]] = {}
    for crop in json.loads(LOGO_BOXES.read_text())["crops"]:
        brand = crop["brand"].replace(" ", "-")
        image = Image.open(grocery_root() / crop["image"]).convert("RGB").crop(tuple(crop["box"]))
        keys, _ = engine.rank(Query(image, crop["image"]), "local", 100, None, settings)
        relevant = sum(brand_of(product) == brand for product in products)
        seen: list[str] = []
        hits, total = 0, 0.0
        for key in keys.tolist():
            product = fine_of[int(key)]
            if product not in seen:
                seen.append(product)
                if brand_of(product) == brand:
                    hits += 1
                    total += hits / len(seen)
        per_brand.setdefault(brand, []).append(total / relevant)
    return 100 * float(np.mean([np.mean(values) for values in per_brand.values()]))


def p50(call, inputs) -> float:
    call(inputs[0])
    times = []
    for value in inputs:
        started = time.perf_counter()
        call(value)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "text")
    parser.add_argument("--limit", type=int, default=0, help="use every n-th photo only (quick runs)")
    parser.add_argument("--parts", default="brand,fused,logo,speed")
    parser.add_argument("--text-weights", default="0.05,0.1,0.3", help="weights of the text feature in fused search")
    args = parser.parse_args()
    photos = [(split, photo) for split in ("val", "train") for photo in split_photos(split) if photo.top == "Packages"]
    if args.limit:
        photos = photos[:: args.limit]
    items = [CatalogItem(id=f"pkg-{i:04d}", image=photo.path, category=photo.coarse, title="")
             for i, (_, photo) in enumerate(photos)]
    fine_of = {item_key(item.id): photo.category for item, (_, photo) in zip(items, photos, strict=True)}
    split_of = {item_key(item.id): split for item, (split, _) in zip(items, photos, strict=True)}
    print(f"catalog: {len(items)} Packages photos (val + train), opaque ids, coarse categories, no titles")

    plain, plain_seconds = build(args.work / "default", items, DEFAULT)
    worded, worded_seconds = build(args.work / "text", items, [*DEFAULT, "text"])
    n = len(items)
    print(format_table(["index", "features", "extraction s", "ms / image"], [
        ("default", ",".join(DEFAULT), f"{plain_seconds:.0f}", f"{1000 * plain_seconds / n:.0f}"),
        ("+ text", ",".join([*DEFAULT, "text"]), f"{worded_seconds:.0f}", f"{1000 * worded_seconds / n:.0f}"),
    ]))

    parts = set(args.parts.split(","))
    rows = []
    for label, index in (("default", plain), ("+ text", worded)) if "brand" in parts else ():
        catalog = open_catalog(index)
        engine = SearchEngine(catalog)
        for brand in BRANDS:
            result = engine.search_text(brand.replace("-", " "), 10)
            hits = [brand_of(fine_of[hit.key]) == brand for hit in result.results]
            rows.append((label, brand, f"{100 * sum(hits) / 10:.0f}"))
        catalog.close()
    if rows:
        by_index = {label: np.mean([float(p) for lab, _, p in rows if lab == label]) for label in ("default", "+ text")}
        print("\nbrand search, precision@10 (%):")
        print(format_table(["index", "brand", "P@10"], rows))
        print("mean P@10: " + ", ".join(f"{label} {value:.1f}" for label, value in by_index.items()))

    if "logo" in parts:
        logo_rows = []
        for label, index, weight in (("default", plain, 0.0), ("+ text, words not used", worded, 0.0),
                                     ("+ text, words of the crop", worded, 1.0)):
            catalog = open_catalog(index)
            engine = SearchEngine(catalog)
            logo_rows.append((label, f"{logo_map(engine, fine_of, SearchSettings(local_text_weight=weight)):.1f}"))
            catalog.close()
        print("\nlogo crops, --mode local, mAP over brands (%):")
        print(format_table(["index", "mAP"], logo_rows))

    val = [(photo, item) for (split, photo), item in zip(photos, items, strict=True) if split == "val"]
    train_keys = np.array(sorted(key for key, split in split_of.items() if split == "train"), np.int64)
    keep = ItemFilter(keys=train_keys)
    queries = [(Query(load_query(photo.path), str(photo.path)), photo.category) for photo, _ in val]
    table = []
    defaults = SearchSettings()
    runs = [] if "fused" not in parts else [("default", plain, None), ("+ text, weight 0", worded, {"text": 0.0})]
    runs += [(f"+ text, weight {weight}", worded, {"text": float(weight)}) for weight in args.text_weights.split(",")]
    for label, index, weights in runs:
        catalog = open_catalog(index)
        engine = SearchEngine(catalog)
        if weights is not None:
            weights = {**engine.weights(defaults), **weights}
        settings = defaults.merged(weights=weights)
        accuracy, siblings = top1(engine, queries, fine_of, settings, keep)
        latency = p50(lambda path, engine=engine, settings=settings: engine.search([path], settings=settings),
                      [photo.path for photo, _ in val[:30]])
        table.append((label, f"{accuracy:.1f}", siblings, f"{latency:.0f}"))
        catalog.close()
    if table:
        print(f"\nfused top-1 on {len(val)} val Packages photos against the train photos:")
        print(format_table(["index", "top-1 %", "sibling confusions", "p50 ms"], table))

    if "speed" in parts:
        catalog = open_catalog(worded)
        engine = SearchEngine(catalog)
        words = ["arla", "mjolk", "ekologisk mjölk", "god morgon", "yoghurt", "oatly", "tropicana", "apelsin"]
        print(f"\ntext search p50: {p50(lambda text: engine.search_text(text, 10), words * 3):.1f} ms")
        paths = [photo.path for photo, _ in val[:30]]
        for weight in (0.0, 0.05):
            settings = defaults.merged(weights={**engine.weights(defaults), "text": weight})
            latency = p50(lambda path, settings=settings: engine.search([path], settings=settings), paths)
            print(f"fused query p50, text weight {weight}: {latency:.0f} ms")
        catalog.close()


if __name__ == "__main__":
    main()
