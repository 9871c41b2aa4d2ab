"""Few-shot category classification on grocery val, and query latency on a 10,000-leaf tree.

    .venv/bin/python benchmarks/bench_classify.py --index DIR [--features NPZ] [--draws 5]

Catalog = k train photos per fine class (k = 1, 5) or all train photos, drawn ``--draws``
times; queries = val photos. Each method is the same classifier with its per-support choice
forced one way, so the table shows what choosing by support size buys; "+ head" adds the
triplet projection head trained on that same catalog. The synthetic part times one query at a
time against brute-force 1-NN over the same support (the ratio is what carries across machines).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.tables import format_table  # noqa: E402
from indexer.finetune import TripletProjection  # noqa: E402
from search.classify import HierarchicalFewShotClassifier  # noqa: E402

NEVER = 10**9
METHODS = {
    "prototypes": {"knn_min_support": NEVER, "linear_min_support": NEVER},
    "prototypes + kNN": {"knn_min_support": 1, "linear_min_support": NEVER},
    "linear everywhere": {"knn_min_support": NEVER, "linear_min_support": 1},
    "by support (default)": {},
}


def load_features(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train features, train fine paths, val features, val fine paths)."""
    if args.features:
        data = np.load(args.features, allow_pickle=True)
        train = np.array([str(i).startswith("train/") for i in data["catalog_ids"]])
        return (data["catalog"][train], data["catalog_categories"][train].astype(str),
                data["val"], data["val_categories"].astype(str))
    from datasets.grocery import split_photos
    from indexer.imageio import load_rgb
    from indexer.index import CatalogIndex

    index = CatalogIndex.open(args.index)
    keys, rows = index.store.vectors("deep", index.meta["dims"]["deep"])
    records = index.store.items(keys.tolist())
    train = np.array([records[int(k)].id.startswith("train/") for k in keys])
    paths = np.array([records[int(k)].category for k in keys])[train]
    val = split_photos("val")
    extractor = index.deep_extractor()
    val_rows = np.concatenate([extractor.transform_images([load_rgb(p.path) for p in val[i : i + 32]])
                               for i in range(0, len(val), 32)])
    return rows[train], paths, val_rows, np.array([p.category for p in val])


def level_accuracy(predicted: np.ndarray, truth: np.ndarray, depth: int) -> float:
    cut = np.vectorize(lambda path: "/".join(path.split("/")[:depth]))
    return float((cut(predicted) == cut(truth)).mean())


def draw(paths: np.ndarray, k: int | None, rng: np.random.Generator) -> np.ndarray:
    if k is None:
        return np.arange(len(paths))
    return np.concatenate([rng.choice(np.flatnonzero(paths == leaf), min(k, int((paths == leaf).sum())), replace=False)
                           for leaf in np.unique(paths)])


def accuracy_table(train, paths, val, val_paths, draws: int, head_steps: int) -> str:
    rows = []
    for k in (1, 5, None):
        n_draws = draws if k is not None else 1
        results: dict[str, list[tuple[float, float, float]]] = {}
        for seed in range(n_draws):
            support = draw(paths, k, np.random.default_rng(seed))
            spaces = {"": (train[support], val)}
            if k != 1 and head_steps:  # one item per class gives a triplet no positive
                head = TripletProjection(steps=head_steps, seed=seed).fit(train[support], paths[support])
                spaces[" + head"] = (head.transform(train[support]), head.transform(val))
            for suffix, (x, q) in spaces.items():
                for method, params in METHODS.items():
                    if suffix and method != "by support (default)":
                        continue
                    predicted = HierarchicalFewShotClassifier(**params).fit(x, paths[support]).predict(q)
                    results.setdefault(method + suffix, []).append(
                        tuple(level_accuracy(predicted, val_paths, depth) for depth in (3, 2, 1))
                    )
        for method, values in results.items():
            fine, coarse, top = np.mean(values, axis=0)
            spread = np.std([v[0] for v in values])
            rows.append((k or "all", method, n_draws, f"{fine:.3f} ± {spread:.3f}", f"{coarse:.3f}", f"{top:.3f}"))
    return format_table(["k", "method", "draws", "fine", "coarse", "top"], rows)


def synthetic_tree(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10 x 10 x 10 x 10 leaves, 1-5 items each; features drift from parent to child like real trees."""
    rng = np.random.default_rng(seed)
    level1 = rng.normal(size=(10, dim))
    level2 = (level1[:, None] + 0.7 * rng.normal(size=(10, 10, dim))).reshape(100, dim)
    level3 = (level2[:, None] + 0.5 * rng.normal(size=(100, 10, dim))).reshape(1000, dim)
    leaves = (level3[:, None] + 0.4 * rng.normal(size=(1000, 10, dim))).reshape(10000, dim).astype(np.float32)
    counts = rng.integers(1, 6, size=10000)
    leaf_of = np.repeat(np.arange(10000), counts)
    rows = np.abs(leaves[leaf_of] + 0.3 * rng.normal(size=(len(leaf_of), dim)).astype(np.float32))
    names = np.array([f"A{i // 1000}/B{i // 100 % 10}/C{i // 10 % 10}/D{i % 10}" for i in range(10000)])
    queries = np.abs(leaves[:200] + 0.3 * rng.normal(size=(200, dim)).astype(np.float32))
    return rows, names[leaf_of], queries


def latency_table(dim: int, n_queries: int) -> str:
    rows, paths, queries = synthetic_tree(dim)
    started = time.perf_counter()
    classifier = HierarchicalFewShotClassifier().fit(rows, paths)
    fit_s = time.perf_counter() - started
    normed = rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def time_per_query(fn) -> float:
        fn(queries[:1])  # warm-up
        started = time.perf_counter()
        for i in range(n_queries):
            fn(queries[i : i + 1])
        return (time.perf_counter() - started) / n_queries

    baseline = time_per_query(lambda q: (q @ normed.T).argmax(axis=1))
    ours = time_per_query(classifier.predict_paths)
    predictions = classifier.predict_paths(queries[:n_queries])
    fine = np.mean([p.leaf == f"A{i // 1000}/B{i // 100 % 10}/C{i // 10 % 10}/D{i % 10}" for i, p in enumerate(predictions)])
    table = [
        ("brute-force 1-NN (baseline)", f"{baseline * 1e3:.1f}", "1.0"),
        ("hierarchical classify_paths", f"{ours * 1e3:.1f}", f"{ours / baseline:.1f}"),
    ]
    return (f"synthetic tree: 10,000 leaves, {len(rows)} items, dim {dim}; fit {fit_s:.1f}s; "
            f"top-leaf accuracy on its {n_queries} queries {fine:.2f}\n"
            + format_table(["per query", "ms", "x baseline"], table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="/tmp/gro/idx", help="an index of the grocery iconic+train catalog")
    parser.add_argument("--features", help="npz of cached features (catalog, catalog_ids, catalog_categories, val, val_categories)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--head-steps", type=int, default=300, help="0 skips the finetuned-head rows")
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if not args.skip_accuracy:
        train, paths, val, val_paths = load_features(args)
        print(f"grocery: {len(train)} train photos in {len(np.unique(paths))} fine classes; {len(val)} val queries")
        print(accuracy_table(train, paths, val, val_paths, args.draws, args.head_steps))
        print()
    print(latency_table(1280, args.latency_queries))


if __name__ == "__main__":
    main()
