"""Speed on this machine: indexing against the hand-written loop, where each image's and each query's
milliseconds go, query latency, and what an indexed item costs on disk.

    .venv/bin/python -m benchmarks.bench_speed [--images 400] [--rounds 2] [--queries 100] [--index DIR]
        [--grow 100000] [--skip indexing,profile,queries]

1. Indexing, whole commands side by side on the same ``--images`` grocery photos, ``--rounds``
   times in turn: ``benchmarks/plain_loop.py`` (EfficientNet-Lite0 in eager PyTorch, batches of
   32, PIL decoding) and ``catalens index`` with deep features only and with the default features
   (deep + colour + SIFT). Process start and model load count, as a user sees them; each ratio
   is against the plain loop of the same round.
2. Profile: one image or query at a time, on one thread, each stage timed on its own (mean ms).
   The indexing stages are what the decode workers and the network do per image; the query
   stages follow a fused search through a catalog of iconic + train photos (2.7k items; built
   in a temporary folder unless ``--index`` names one).
3. Queries: p50/p95 of one ``search`` call per photo (decoding and extraction included), and the
   rate of one batch call (``search --from-file``) on one thread and on ``query_threads``.
4. Disk per indexed item, by store.
5. The candidate stages on the catalog grown to ``--grow`` items (default 100,000) from its own
   rows: the kNN of each global feature and the inverted file, which grow with the catalog while
   decoding, extraction and verification (a fixed number of candidates) do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from catalens.api.tables import format_table
from catalens.datasets.catalog import write_manifest
from catalens.datasets.grocery import catalog_items, split_photos

ROOT = Path(__file__).resolve().parents[1]
CATALENS = [sys.executable, "-m", "catalens.api.cli"]
DEEP_ONLY = {"CATALENS_FEATURES": "deep"}


def timed_command(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, **(env or {})},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def indexing_table(photos: list, rounds: int, work: Path) -> str:
    manifest = write_manifest(photos, work / "photos.jsonl")
    runs = {
        "plain loop (eager torch, batch 32)": lambda i: [sys.executable, "-m", "benchmarks.plain_loop",
                                                         str(manifest), str(work / f"plain{i}.npy")],
        "catalens index, deep only": lambda i: [*CATALENS, "index", str(manifest), "--index", str(work / f"deep{i}"), "--quiet"],
        "catalens index, default (deep + colour + sift)": lambda i: [*CATALENS, "index", str(manifest), "--index",
                                                                      str(work / f"default{i}"), "--quiet"],
    }
    seconds: dict[str, list[float]] = defaultdict(list)
    for round_ in range(rounds):
        for name, command in runs.items():
            seconds[name].append(timed_command(command(round_), DEEP_ONLY if "deep only" in name else None))
    baseline = seconds["plain loop (eager torch, batch 32)"]
    rows = []
    for name, taken in seconds.items():
        rates = [len(photos) / value for value in taken]
        ratios = [base / value for base, value in zip(baseline, taken, strict=True)]
        rows.append((name, " / ".join(f"{value:.1f}" for value in taken), " / ".join(f"{rate:.1f}" for rate in rates),
                     " / ".join(f"{ratio:.2f}x" for ratio in ratios)))
    return format_table([f"index {len(photos)} photos (each round)", "seconds", "images/s", "vs plain loop"], rows)


def clock(totals: dict[str, float], stage: str, function, *args):
    started = time.perf_counter()
    value = function(*args)
    totals[stage] += time.perf_counter() - started
    return value


def indexing_profile(photos: list, catalog) -> list[tuple[str, str]]:
    from catalens.indexer.imageio import load_rgb

    features = {feature.name: feature for feature in catalog.features()}
    draft = max(feature.draft_size or 0 for feature in features.values())
    totals: dict[str, float] = defaultdict(float)
    for photo in photos:
        image = clock(totals, "decode (JPEG, reduced)", load_rgb, photo.image, catalog.config.max_pixels, None, draft)
        prepared = clock(totals, "deep: resize, crop, scale", features["deep"].preparer, image)
        clock(totals, "deep: network", features["deep"].finish, [prepared])
        for name, stage in (("colour", "colour histogram"), ("sift", "sift: keypoints")):
            clock(totals, stage, lambda feature, image: feature.finish([feature.preparer(image)]), features[name], image)
    return [(stage, f"{1000 * value / len(photos):.1f}") for stage, value in totals.items()]


def query_profile(engine, queries: list[Path]) -> list[tuple[str, str]]:
    from catalens.indexer.imageio import load_query
    from catalens.search import retrieval
    from catalens.search.engine import Query
    from catalens.search.fusion import fused_search
    from catalens.search.products import rank_products
    from catalens.search.verification import Verifier

    settings = engine.settings
    weights = engine.weights(settings)
    totals: dict[str, float] = defaultdict(float)
    for path in queries:
        query = Query(clock(totals, "decode", load_query, path), str(path))
        for name in weights:
            if name == "sift":
                clock(totals, "sift: keypoints", query.descriptors, engine.catalog, name)
                clock(totals, "sift: words", query.words, engine.catalog, name)
            else:
                clock(totals, f"{name}: network" if name.startswith("deep") else f"{name}: vector",
                      query.vector, engine.catalog, name)
        candidates = 0.0
        started = time.perf_counter()
        for name in weights:
            if name == "sift":
                retrieval.word_candidates(engine.catalog, query, name, settings.word_candidates, None)
            else:
                retrieval.global_search(engine.catalog, query, name, settings.candidates, None)
        candidates = time.perf_counter() - started
        totals["candidates (kNN, inverted file)"] += candidates
        started = time.perf_counter()
        keys, scores = fused_search(engine.catalog, query, weights, settings.candidates, None, settings,
                                    Verifier.from_settings(settings))
        # fused_search asks for the candidates again (same cost), then verifies and scores them.
        totals["verification and scoring"] += time.perf_counter() - started - candidates
        clock(totals, "products", lambda keys, scores: rank_products(
            keys, scores, engine.catalog.items.items(keys.tolist()), settings.product_weight, settings.product_votes,
            False), keys, scores)
        clock(totals, "results", engine.hits, keys[: settings.k], scores[: settings.k])
    rows = [(stage, f"{1000 * value / len(queries):.1f}") for stage, value in totals.items()]
    return rows + [("sum", f"{1000 * sum(totals.values()) / len(queries):.1f}")]


def latency_rows(engine, queries: list[Path], items: int) -> list[tuple[str, str, str]]:
    engine.search(queries[:3])
    latencies = []
    for path in queries:
        started = time.perf_counter()
        engine.search([path])
        latencies.append(1000 * (time.perf_counter() - started))
    p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))]
    rows = [(f"one query a call, fused, {items} items", f"p50 {statistics.median(latencies):.1f} ms", f"p95 {p95:.1f} ms")]
    for threads in (1, engine.settings.query_threads):
        started = time.perf_counter()
        engine.search(queries, settings=engine.settings.merged(query_threads=threads))
        seconds = time.perf_counter() - started
        rows.append((f"one batch call, {threads} query thread{'s' if threads > 1 else ''}",
                     f"{1000 * seconds / len(queries):.1f} ms a query", f"{len(queries) / seconds:.1f} queries/s"))
    return rows


def grown_rows(engine, queries: list[Path], sizes: list[int]) -> list[tuple[str, ...]]:
    """The candidate stages (deep and colour kNN, inverted file) on the catalog grown to ``sizes``.

    Each grown item copies a real item's words (so posting lists grow with the catalog, under the
    same vocabulary: pessimistic, a refitted vocabulary would have more words) and its vectors
    plus noise (cosine ~0.9 to the original), searched with the FAISS type the configuration
    recommends at that size. Verification reads a fixed number of candidates whatever the size.
    """
    import faiss

    from catalens.indexer.features import l2_normalise
    from catalens.indexer.imageio import load_query
    from catalens.indexer.stores import stack_rows
    from catalens.indexer.stores.faiss_vectors import (
        one_openmp_thread,
        recommended_factory,
        recommended_search_parameters,
    )
    from catalens.indexer.stores.inverted_file import BagOfWords, decode_words, words_feature
    from catalens.search.engine import Query

    catalog, settings = engine.catalog, engine.settings
    rng = np.random.default_rng(0)
    words = [decode_words(blob) for blob in catalog.items.rows(words_feature("sift")).values()]
    n_words = int(max(w.max() for w in words if len(w))) + 1
    real = {name: stack_rows(catalog.items.rows(name), catalog.dims()[name])[1] for name in ("deep", "colour")}
    prepared = []
    for path in queries:
        query = Query(load_query(path), str(path))
        prepared.append(({name: query.vector(catalog, name) for name in real}, query.words(catalog, "sift")))
    rows = []
    for size in sizes:
        source = rng.integers(0, len(words), size) if size > len(words) else np.arange(len(words))
        started = time.perf_counter()
        bag = BagOfWords.build(np.arange(len(source)), [words[i] for i in source], n_words)
        indexes = {}
        for name, vectors in real.items():
            grown = vectors[source % len(vectors)]
            if size > len(words):
                grown = l2_normalise(grown + 0.45 / np.sqrt(grown.shape[1]) * rng.standard_normal(grown.shape, np.float32))
            factory = recommended_factory(len(grown), grown.shape[1])
            index = faiss.index_factory(grown.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index.train(grown[rng.permutation(len(grown))[: 64 * 1024]])
            index.add(grown)
            if recommended_search_parameters(factory):
                faiss.ParameterSpace().set_index_parameters(index, recommended_search_parameters(factory))
            indexes[name] = (index, factory)
        built = time.perf_counter() - started
        timings = {"kNN": [], "words": []}
        for vectors, query_words in prepared:
            started = time.perf_counter()
            with one_openmp_thread():  # as FaissVectorStore searches a query
                for name, (index, _) in indexes.items():
                    index.search(vectors[name][None], settings.candidates)
            timings["kNN"].append(time.perf_counter() - started)
            started = time.perf_counter()
            bag.search(query_words, settings.word_candidates)
            timings["words"].append(time.perf_counter() - started)
        rows.append((f"{len(source):,}", ", ".join(f"{name} {factory}" for name, (_, factory) in indexes.items()),
                     f"{1000 * statistics.median(timings['kNN']):.1f}", f"{1000 * statistics.median(timings['words']):.1f}",
                     f"{built:.0f} s"))
    return rows


def disk_rows(catalog, folder: Path) -> list[tuple[str, str]]:
    items = len(catalog.items.records())
    rows = []
    for feature in catalog.local_features():
        blobs = catalog.items.rows(feature)
        rows.append((f"{feature} keypoints and descriptors (in items.sqlite)", f"{sum(map(len, blobs.values())) / items / 1024:.1f}"))
    for path in sorted(folder.iterdir()):
        if path.is_file():
            rows.append((path.name, f"{path.stat().st_size / items / 1024:.1f}"))
    rows.append(("models/ (vocabulary, fitted models)",
                 f"{sum(p.stat().st_size for p in (folder / 'models').rglob('*') if p.is_file()) / items / 1024:.1f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--index", type=Path, help="an index of the grocery iconic + train photos (default: built here)")
    parser.add_argument("--grow", type=lambda text: [int(part) for part in text.split(",") if part], default=[100_000],
                        help="catalog sizes the candidate stages are grown to (comma-separated; empty: none)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: indexing, profile, queries")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    # `catalens index` as the CLI runs it: then fits what search uses (the classifier, the confidence)
    from catalens.api.service import index as index_catalog
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.engine import SearchEngine

    val = split_photos("val")
    catalog_photos = catalog_items(("iconic", "train"))
    photos = catalog_items(("train",))
    photos = photos[:: max(1, len(photos) // args.images)][: args.images]
    queries = [photo.path for photo in val][:: max(1, len(val) // args.queries)][: args.queries]
    with tempfile.TemporaryDirectory(prefix="catalens-speed-") as work:
        work = Path(work)
        if "indexing" not in skip:
            print(indexing_table(photos, args.rounds, work), flush=True)
        index = args.index
        if index is None and not skip >= {"profile", "queries"}:
            index = work / "grocery"
            print(f"\nindexing {len(catalog_photos)} iconic + train photos into {index} ...", flush=True)
            index_catalog(catalog_photos, index, IndexConfig(), progress=False)
        if index is None:
            return
        catalog = open_catalog(index)
        engine = SearchEngine(catalog)
        items = len(catalog.items.records())
        if "profile" not in skip:
            engine.search(queries[:3])  # models loaded once per process
            print()
            print(format_table(["indexing, per image (one thread)", "ms"], indexing_profile(photos[:100], catalog)))
            print()
            print(format_table([f"fused query, {items} items (one thread)", "ms"], query_profile(engine, queries)))
        if "queries" not in skip:
            print()
            print(format_table(["queries (val photos)", "latency / time", "spread / rate"], latency_rows(engine, queries, items)))
        if args.grow:
            print()
            print(format_table(["items", "FAISS", "kNN p50 ms", "inverted file p50 ms", "built in"],
                               grown_rows(engine, queries, [items, *args.grow])))
        print()
        print(format_table(["disk per indexed item", "KiB"], disk_rows(catalog, Path(index))))
        catalog.close()


if __name__ == "__main__":
    main()
