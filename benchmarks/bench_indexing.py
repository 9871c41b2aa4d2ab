"""Indexing throughput and query latency on the grocery photos, against a plain torch loop.

    .venv/bin/python -m benchmarks.bench_indexing [--images 1000] [--queries 50] [--backbone efficientnet_lite0]

The baseline is what a hand-written script does: one image at a time, PIL + torchvision
transforms, the same backbone in eager PyTorch. Both run in this process on the same images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from catalens.api.tables import format_table
from catalens.datasets.grocery import catalog_items, split_photos
from catalens.indexer.backbones import get_backbone
from catalens.indexer.backends import open_catalog
from catalens.indexer.config import IndexConfig
from catalens.indexer.pipeline import index_catalog
from catalens.search.engine import SearchEngine, available_modes

# The index's default features without and with the local one (RootSIFT).
FEATURES = ("deep", "colour")
FEATURES_WITH_LOCAL = ("deep", "colour", "sift")


def plain_torch_loop(paths: list[Path], backbone: str) -> float:
    spec = get_backbone(backbone)
    model = spec.create()
    transform = transforms.Compose([
        transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.input_size),
        transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
    ])
    started = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            feature = model(x)
            torch.nn.functional.normalize(feature, dim=1)
    return len(paths) / (time.perf_counter() - started)


def query_latencies(engine: SearchEngine, queries: list[Path], mode: str) -> list[float]:
    engine.search(queries[:2], k=10, mode=mode)  # warm-up: models load once per process
    latencies = []
    for query in queries:
        started = time.perf_counter()
        engine.search([query], k=10, mode=mode)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()

    items = catalog_items(("train",))[:: max(1, 2640 // args.images)][: args.images]
    paths = [item.image for item in items]
    rows = []
    baseline = plain_torch_loop(paths[: min(len(paths), 200)], args.backbone)
    rows.append(("plain torch loop (1 image at a time)", f"{baseline:.1f}", "1.00x"))
    with tempfile.TemporaryDirectory() as folder:
        for features in (FEATURES, FEATURES_WITH_LOCAL):
            name = "+".join(features)
            report = index_catalog(
                items, Path(folder) / name, IndexConfig(backbone=args.backbone, features=list(features)), progress=False
            )
            rate = report.extracted / report.seconds
            rows.append((f"catalens index, {' + '.join(features)}", f"{rate:.1f}", f"{rate / baseline:.2f}x"))
        print(format_table(["indexing", "images/s", "vs baseline"], rows))

        queries = [photo.path for photo in split_photos("val")][:: max(1, 296 // args.queries)][: args.queries]
        catalog = open_catalog(Path(folder) / "+".join(FEATURES_WITH_LOCAL))
        engine = SearchEngine(catalog)
        latency_rows = []
        for mode in available_modes(catalog):
            try:
                latencies = query_latencies(engine, queries, mode)
            except Exception as error:  # noqa: BLE001 - one failing mode must not hide the others
                latency_rows.append((mode, "-", "-", f"unavailable: {error}"))
                continue
            p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))]
            latency_rows.append((mode, f"{statistics.median(latencies):.1f}", f"{p95:.1f}", f"{len(items)} items"))
        catalog.close()
        print()
        print(format_table(["search mode", "p50 ms/query", "p95 ms/query", "catalog"], latency_rows))


if __name__ == "__main__":
    main()
