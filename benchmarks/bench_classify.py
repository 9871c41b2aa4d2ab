"""Few-shot category classification on grocery val, and query latency on a 10,000-leaf tree.

    .venv/bin/python benchmarks/bench_classify.py [--draws 3] [--cache benchmarks/out/classify_features.pkl]

Catalog = k train photos per fine class (k = 1, 5) or all train photos, drawn ``--draws``
times; queries = val photos. Features come from the same code an index uses (deep descriptor,
colour histogram, RootSIFT), extracted once and cached. The first rows force the classifier's
per-support choice one way on deep features, so they show what choosing by support size buys;
"+ colour" puts the
colour histogram beside the deep descriptor; "+ local evidence" verifies the nearest support
items geometrically (``catalens.search.classify.verified_evidence``). The synthetic part times one
query at a time against brute-force 1-NN over the same support (the ratio is what carries across
machines).
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import numpy as np

from catalens.api.tables import format_table
from catalens.indexer.features import feature_spec
from catalens.search.classify import (
    EvidenceConfig,
    HierarchicalFewShotClassifier,
    verified_evidence,
    weighted_features,
)

NEVER = 10**9
# The colour histogram's default weight beside the deep descriptor in classification.
COLOUR_WEIGHT = feature_spec("colour").classify_weight
METHODS = {
    "prototypes": {"knn_min_support": NEVER, "linear_min_support": NEVER},
    "prototypes + kNN": {"knn_min_support": 1, "linear_min_support": NEVER},
    "linear everywhere": {"knn_min_support": NEVER, "linear_min_support": 1},
    "by support (default)": {},
}


class Features:
    """Deep rows, colour rows, RootSIFT sets and fine paths of the train and val photos."""

    def __init__(self, cache: Path):
        if cache.is_file():
            try:
                with open(cache, "rb") as handle:
                    self.__dict__.update(pickle.load(handle))
                return
            except (ModuleNotFoundError, AttributeError) as error:  # pickled by an older catalens
                print(f"{cache}: stale cache ({error}); extracting again", flush=True)
        from catalens.datasets.grocery import split_photos

        train, val = split_photos("train"), split_photos("val")
        photos = list(train) + list(val)
        deep, colour, sift = _extract([p.path for p in photos])
        split = len(train)
        self.train_deep, self.val_deep = deep[:split], deep[split:]
        self.train_colour, self.val_colour = colour[:split], colour[split:]
        self.train_sift, self.val_sift = sift[:split], sift[split:]
        self.train_paths = np.array([p.category for p in train])
        self.val_paths = np.array([p.category for p in val])
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache, "wb") as handle:
            pickle.dump(self.__dict__, handle)


def _extract(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list]:
    from tqdm import tqdm

    from catalens.indexer.features.colour import ColourHistogram
    from catalens.indexer.features.decode import iter_prepared
    from catalens.indexer.features.deep import DeepFeature
    from catalens.indexer.features.sift import SiftOptions, SiftPreparer

    deep, colour = DeepFeature(), ColourHistogram()
    local = SiftOptions()
    preparers = {"deep": deep.preparer, "colour": colour.preparer, "sift": SiftPreparer(local.max_keypoints, local.image_size)}
    rows: dict[str, list] = {"deep": [], "colour": [], "sift": []}
    with tqdm(total=len(paths), unit="img", desc="features") as bar:
        for batch in iter_prepared(paths, preparers, batch_size=16, num_workers=1, draft_size=deep.draft_size):
            if batch.errors:
                raise SystemExit(f"unreadable photos: {batch.errors}")
            rows["deep"].append(deep.finish(batch.prepared["deep"]))
            rows["colour"].append(colour.finish(batch.prepared["colour"]))
            rows["sift"].extend(batch.prepared["sift"])
            bar.update(len(batch.positions))
    return np.concatenate(rows["deep"]), np.concatenate(rows["colour"]), rows["sift"]


def classification_features(deep: np.ndarray, colour: np.ndarray, colour_weight: float = COLOUR_WEIGHT) -> np.ndarray:
    """What ``catalens classify`` fits on for an index of deep and colour features."""
    return weighted_features({"deep": deep, "colour": colour}, {"deep": 1.0, "colour": colour_weight})


def level_accuracy(predicted: np.ndarray, truth: np.ndarray, depth: int) -> float:
    cut = np.vectorize(lambda path: "/".join(path.split("/")[:depth]))
    return float((cut(predicted) == cut(truth)).mean())


def draw(paths: np.ndarray, k: int | None, rng: np.random.Generator) -> np.ndarray:
    if k is None:
        return np.arange(len(paths))
    return np.concatenate([rng.choice(np.flatnonzero(paths == leaf), min(k, int((paths == leaf).sum())), replace=False)
                           for leaf in np.unique(paths)])


def accuracy_table(data: Features, draws: int) -> str:
    from catalens.search.verification import verify

    paths, val_paths = data.train_paths, data.val_paths
    inliers: dict[tuple[int, int], int] = {}  # (val photo, train photo): the same pair recurs across draws

    def evidence_for(classifier, features, support) -> np.ndarray:
        def verify_pair(row: int, support_row: int) -> int:
            pair = (row, int(support[support_row]))
            if pair not in inliers:
                inliers[pair] = verify(data.val_sift[row], data.train_sift[pair[1]]).inliers
            return inliers[pair]

        return verified_evidence(classifier, features, verify_pair, EvidenceConfig())

    rows = []
    for k in (1, 5, None):
        n_draws = draws if k is not None else 1
        results: dict[str, list[tuple[float, float, float]]] = {}

        def record(name: str, predicted: np.ndarray, results: dict = results) -> None:
            results.setdefault(name, []).append(tuple(level_accuracy(predicted, val_paths, depth) for depth in (3, 2, 1)))

        for seed in range(n_draws):
            support = draw(paths, k, np.random.default_rng(seed))
            x, q = data.train_deep[support], data.val_deep
            for method, params in METHODS.items():
                record(method, HierarchicalFewShotClassifier(**params).fit(x, paths[support]).predict(q))
            for weight in sorted({0.5, COLOUR_WEIGHT, 0.7}):
                xc = classification_features(x, data.train_colour[support], weight)
                qc = classification_features(q, data.val_colour, weight)
                classifier = HierarchicalFewShotClassifier().fit(xc, paths[support])
                record(f"+ colour {weight}", classifier.predict(qc))
                record(f"+ colour {weight} + local evidence", classifier.predict(qc, evidence_for(classifier, qc, support)))
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
    parser.add_argument("--cache", default="benchmarks/out/classify_features.pkl", help="extracted features (made on first run)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if not args.skip_accuracy:
        data = Features(Path(args.cache))
        print(f"grocery: {len(data.train_paths)} train photos in {len(np.unique(data.train_paths))} fine classes; "
              f"{len(data.val_paths)} val queries")
        print(accuracy_table(data, args.draws))
        print()
    print(latency_table(1280, args.latency_queries))


if __name__ == "__main__":
    main()
