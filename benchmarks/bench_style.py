""""More from this brand's line": mean average precision of the style feature against deep and colour.

    .venv/bin/python benchmarks/bench_style.py [--stages 2,4 4,6 2] [--limit 0]

Queries are the grocery val photos of brand products (Packages); the catalog is iconic + train.
For each query the catalog items of the query's own product are left out, and the relevant
items are those of other products of the same brand (Arla, Alpro, Oatly, Garant, Yoggi,
Tropicana, God-Morgon, Bravo share a package design across products). Average precision is
over the whole ranked catalog; the table gives mAP over queries and per brand, for each
descriptor and stage choice, with the extraction time per image.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from PIL import Image
from tqdm import tqdm

from catalens.api.tables import format_table
from catalens.datasets.grocery import catalog_items, grocery_root, split_photos
from catalens.indexer.features import embed, l2_normalise
from catalens.indexer.features.colour import ColourHistogram
from catalens.indexer.features.deep import DeepFeature
from catalens.indexer.features.style import StyleFeature
from catalens.indexer.imageio import load_rgb

BRANDS = ("God-Morgon", "Tropicana", "Garant", "Alpro", "Oatly", "Yoggi", "Valio", "Bravo", "Arla")


def brand_of(category: str) -> str | None:
    product = category.rsplit("/", 1)[-1]
    return next((brand for brand in BRANDS if product.startswith(brand + "-")), None)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = relevant[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def rows_of(feature, images: list[Image.Image], desc: str, batch: int = 16) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    chunks = [embed(feature, images[i : i + batch]) for i in tqdm(range(0, len(images), batch), desc=desc, leave=False)]
    return np.concatenate(chunks), (time.perf_counter() - started) / len(images) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=["2,4", "6,9", "9,12"],
                        help="stage sets to compare, each comma-separated (EfficientNet-Lite0 stage indices)")
    parser.add_argument("--limit", type=int, default=0, help="use every n-th catalog item (0: all), for a quick run")
    args = parser.parse_args()
    root = grocery_root()
    catalog = catalog_items(("iconic", "train"), root)
    if args.limit:
        catalog = catalog[:: args.limit]
    queries = [photo for photo in split_photos("val", root) if brand_of(photo.category)]
    catalog_images = [load_rgb(item.image) for item in tqdm(catalog, desc="decoding catalog", leave=False)]
    query_images = [load_rgb(photo.path) for photo in queries]
    catalog_categories = np.array([item.category for item in catalog])
    catalog_brands = np.array([brand_of(item.category) or "" for item in catalog])

    descriptors: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for name, feature in [("deep", DeepFeature()), ("colour", ColourHistogram())] + [
        (f"style {stages}", StyleFeature(stages=tuple(int(s) for s in stages.split(",")))) for stages in args.stages
    ]:
        catalog_rows, ms = rows_of(feature, catalog_images, name)
        query_rows, _ = rows_of(feature, query_images, name)
        descriptors[name] = (catalog_rows, query_rows, ms)
    def brand_map(catalog_rows: np.ndarray, query_rows: np.ndarray) -> tuple[float, dict[str, list[float]]]:
        per_brand: dict[str, list[float]] = defaultdict(list)
        for photo, row in zip(queries, query_rows, strict=True):
            keep = catalog_categories != photo.category
            ap = average_precision(catalog_rows[keep] @ row, catalog_brands[keep] == brand_of(photo.category))
            if not np.isnan(ap):
                per_brand[brand_of(photo.category)].append(ap)
        return float(np.mean([ap for aps in per_brand.values() for ap in aps])), per_brand

    best_style = max((n for n in descriptors if n.startswith("style")), key=lambda n: brand_map(*descriptors[n][:2])[0])
    deep_c, deep_q, deep_ms = descriptors["deep"]
    style_c, style_q, style_ms = descriptors[best_style]
    for weight in (0.5, 1.0):
        descriptors[f"deep + {weight} x {best_style}"] = (
            l2_normalise(np.hstack([deep_c, weight * style_c])), l2_normalise(np.hstack([deep_q, weight * style_q])),
            deep_ms + style_ms)

    table = []
    brands_seen = sorted({brand_of(photo.category) for photo in queries})
    for name, (catalog_rows, query_rows, ms) in descriptors.items():
        mean_ap, per_brand = brand_map(catalog_rows, query_rows)
        table.append((name, f"{mean_ap:.3f}", sum(map(len, per_brand.values())), f"{ms:.1f}", catalog_rows.shape[1],
                      *(f"{np.mean(per_brand[b]):.2f}" if per_brand[b] else "-" for b in brands_seen)))
    print(f"\n\"more from this brand's line\": {len(queries)} val Packages queries, catalog {len(catalog)} items "
          "(the query's own product left out); mAP")
    print(format_table(["descriptor", "mAP", "queries", "ms/img", "dims", *brands_seen], table))


if __name__ == "__main__":
    main()
