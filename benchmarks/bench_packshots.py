"""A catalog of one packshot per product, and the shop's own photos without labels: top-1 product
accuracy of default (fused) search after ``catalens finetune``, with and without ``--unlabeled``.

    .venv/bin/python -m benchmarks.bench_packshots [--work DIR] [--folds 0,1] [--skip-full]

The catalog is the 81 grocery iconic images. Runs, each on its own copy of one index:

    packshots alone        ``finetune`` without unlabeled photos
    + unlabeled train      ``finetune --unlabeled`` with every train photo, labels dropped
    + unlabeled, fold K    ``finetune --unlabeled`` with the train photos outside shooting-session fold K

Queries: the 296 val photos (never in the unlabeled set), and for fold runs also fold K's own
photos (held out of everything that run saw: a second held-out set, larger than val). Val alone
over-fits; the folds give the spread. A hit is right when its product (the fine category) is
the photo's. Each run prints its ``finetune`` time; the machine's load makes those vary.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_retrieval import GROUPS, accuracy, build
from catalens.api.tables import format_table
from catalens.datasets.grocery import split_photos, train_folds
from catalens.indexer.config import IndexConfig
from catalens.indexer.imageio import load_query
from catalens.indexer.stores.backends import open_catalog
from catalens.search.engine import Query, SearchEngine
from catalens.search.settings import SearchSettings


def finetuned(base: Path, folder: Path, unlabeled: list[Path]) -> tuple[Path, dict]:
    """A copy of ``base`` fine-tuned with ``unlabeled`` photos (reused when ``folder`` has one)."""
    from catalens.indexer.training.adaptation import adapt_catalog
    from catalens.search.refit import refit_catalog

    index = folder / "index"
    if not _adapted(index):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, index)
        catalog = open_catalog(index)
        try:
            adapt_catalog(catalog, progress=True, unlabeled=unlabeled)
            refit_catalog(catalog, progress=True)  # as `catalens finetune` does at its end
        finally:
            catalog.close()
    catalog = open_catalog(index)
    try:
        return index, dict(catalog.meta["adaptation"])
    finally:
        catalog.close()


def _adapted(index: Path) -> bool:
    if not (index / "catalens.json").is_file():
        return False
    catalog = open_catalog(index)
    try:
        return "adaptation" in catalog.meta
    finally:
        catalog.close()


def top1(index: Path, photos, queries) -> tuple[str, ...]:
    catalog = open_catalog(index)
    try:
        return accuracy(SearchEngine(catalog), photos, queries, "fused", SearchSettings())
    finally:
        catalog.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "packshots",
                        help="where the index and its fine-tuned copies are built once and reused")
    parser.add_argument("--folds", default="0,1", help="shooting-session folds of train to hold out in turn")
    parser.add_argument("--skip-full", action="store_true", help="no run with every train photo unlabeled")
    args = parser.parse_args()
    folds_asked = [int(f) for f in args.folds.split(",") if f.strip()]
    base = build(args.work / "iconic", ("iconic",), IndexConfig())
    val = split_photos("val")
    val_queries = [Query(load_query(p.path), str(p.path)) for p in val]
    train = split_photos("train")
    fold_of = np.asarray(train_folds(train))
    fold_photos = {k: [p for p, f in zip(train, fold_of, strict=True) if f == k] for k in folds_asked}
    fold_queries = {k: [Query(load_query(p.path), str(p.path)) for p in photos] for k, photos in fold_photos.items()}

    runs: list[tuple[str, list[Path], list[int]]] = [("packshots alone", [], folds_asked)]
    if not args.skip_full:
        runs.append(("+ unlabeled train", [p.path for p in train], []))
    runs += [(f"+ unlabeled, fold {k} out", [p.path for p, f in zip(train, fold_of, strict=True) if f != k], [k])
             for k in folds_asked]
    rows = []
    for label, unlabeled, query_folds in runs:
        started = time.perf_counter()
        index, report = finetuned(base, args.work / label.replace(" ", "-").replace(",", "").replace("+", "with"),
                                  unlabeled)
        fresh = time.perf_counter() - started > 5
        seconds = f"{report['seconds']:.0f}" + ("" if fresh else " (earlier run)")
        used = f"{report.get('pseudo_labelled', 0)} of {len(unlabeled)}" if unlabeled else "-"
        rows.append((label, "val", *top1(index, val, val_queries), used, seconds))
        for k in query_folds:
            rows.append((label, f"fold {k}", *top1(index, fold_photos[k], fold_queries[k]), used, seconds))
    print(f"\niconic catalog (81 packshots), fused top-1 product accuracy (%); val: {len(val)} photos; "
          + ", ".join(f"fold {k}: {len(p)} photos" for k, p in fold_photos.items()))
    print(format_table(["finetune", "queries", "all", *GROUPS, "unlabeled trained on", "finetune s"], rows))


if __name__ == "__main__":
    main()
