"""Indexing throughput and query latency on the grocery photos, against a plain torch loop.

    .venv/bin/python -m benchmarks.bench_indexing [--images 400] [--queries 50]

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

from api.tables import format_table
from datasets.grocery import catalog_items, split_photos
from indexer.backbones import get_backbone
from indexer.config import IndexConfig
from indexer.index import CatalogIndex
from indexer.pipeline import index_catalog
from search.engine import SearchEngine, available_modes


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
        for label, local in (("catalens index, deep only", False), ("catalens index, deep + local", True)):
            report = index_catalog(
                items, Path(folder) / f"index-{local}", IndexConfig(backbone=args.backbone, local_features=local), progress=False
            )
            rate = report.extracted / report.seconds
            rows.append((label, f"{rate:.1f}", f"{rate / baseline:.2f}x"))
        print(format_table(["indexing", "images/s", "vs baseline"], rows))

        queries = [photo.path for photo in split_photos("val")][:: max(1, 296 // args.queries)][: args.queries]
        engine = SearchEngine(CatalogIndex.open(Path(folder) / "index-True"))
        latency_rows = []
        for mode in available_modes():
            try:
                latencies = query_latencies(engine, queries, mode)
            except Exception as error:  # noqa: BLE001 - a mode whose model is not trained here
                latency_rows.append((mode, "-", "-", f"unavailable: {error}"))
                continue
            p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))]
            latency_rows.append((mode, f"{statistics.median(latencies):.1f}", f"{p95:.1f}", f"{len(items)} items"))
        print()
        print(format_table(["search mode", "p50 ms/query", "p95 ms/query", "catalog"], latency_rows))


if __name__ == "__main__":
    main()
