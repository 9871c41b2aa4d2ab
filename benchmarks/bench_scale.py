"""Embedded vector store at catalog scale: exact vs IVF-PQ vs HNSW on synthetic 1280-d vectors.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 100000,1000000] [--skip exact,HNSW] [--gpu]

For each catalog size it builds each faiss index type, then prints a table of build time,
resident memory the index added, p50 latency of one-query searches (``--latency-queries``) and
recall@k against exact search (``--queries``; a quarter of them from 500k items up), and the rule
the configuration follows (``catalens.indexer.stores.faiss_vectors.recommended_factory``). IVF and
PQ train on a subsample of 16 rows a cell (at most 65,536) with 10 k-means rounds; HNSW is built
with ``--ef-construction``. ``--ivf-params`` and ``--ef-search`` add rows for other search
settings on the same builds; ``--gpu`` instead compares exact search on the GPU with the CPU.
The run takes minutes at 100k items and most of an hour at 1M on two cores.

Synthetic data: uniformly random vectors have no neighbourhood structure (every point is about
equally far from every other), which makes any approximate index look useless and is nothing
like image embeddings. The default ``--data clustered`` draws points from a mixture of 1,000
clusters on a 128-d latent subspace embedded in 1280-d, plus isotropic noise, L2-normalised;
queries are fresh draws from the same mixture. ``--data uniform`` gives the worst case.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

# Idle OpenMP threads sleep instead of spinning: on cores shared with other jobs, spinning
# threads made faiss training 3x slower with 2 threads than with 1. Must precede faiss' import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from catalens.api.tables import format_table  # noqa: E402
from catalens.indexer.stores.faiss_vectors import (  # noqa: E402
    recommended_factory,
    recommended_search_parameters,
)
from catalens.indexer.stores.folder import _nlist  # noqa: E402


def rss_bytes() -> int:
    """Resident memory of this process (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Synthetic:
    """Deterministic clustered (or uniform) L2-normalised vectors, generated in chunks."""

    def __init__(self, dim: int, kind: str = "clustered", seed: int = 0, clusters: int = 1000, latent: int = 128):
        self.dim, self.kind, self.seed = dim, kind, seed
        rng = np.random.default_rng(seed)
        self.basis = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)

    def draw(self, n: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, stream))
        if self.kind == "uniform":
            x = rng.standard_normal((n, self.dim), dtype=np.float32)
        else:
            latent = self.centres[rng.integers(0, len(self.centres), n)]
            latent += 0.6 * rng.standard_normal(latent.shape, dtype=np.float32)
            x = latent @ self.basis
            # Isotropic noise with a quarter of the latent signal's per-vector norm.
            x += rng.standard_normal(x.shape, dtype=np.float32) * float(0.25 * np.sqrt(latent.shape[1] / self.dim))
        faiss.normalize_L2(x)
        return x

    def base(self, n: int, chunk: int = 100_000) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            out[start:stop] = self.draw(stop - start, stream=1 + start // chunk)
        return out


@dataclass
class Row:
    n: int
    name: str
    factory: str
    params: str
    build_s: float
    memory_mb: float
    p50_ms: float
    recall: float


def p50_latency(search, queries: np.ndarray, k: int) -> float:
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query[None], k)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))


def build(factory: str, data: np.ndarray, train_rows: int, ef_construction: int = 40) -> faiss.Index:
    index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # 10 k-means rounds instead of 25: recall barely moves, training time drops 2.5x.
        ivf.cp.niter = 10
        ivf = faiss.downcast_index(ivf)
        if isinstance(ivf, faiss.IndexIVFPQ):
            ivf.pq.cp.niter = 10
            # The factory turns on polysemous training, which is slow and unused by search here.
            ivf.do_polysemous_training = False
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        hnsw.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        # A subsample trains the coarse cells and codebooks: 1M rows would cost minutes more
        # and move recall by nothing measurable.
        sample = np.random.default_rng(1).choice(len(data), min(train_rows, len(data)), replace=False)
        index.train(data[np.sort(sample)])
    for start in range(0, len(data), 100_000):
        index.add(data[start : start + 100_000])
    return index


def variants(n: int, dim: int, ivf_params: Sequence[str] = (), ef_searches: Sequence[int] = ()) -> list[tuple[str, str, str]]:
    """(label, factory, ``faiss.ParameterSpace`` string) benchmarked at catalog size ``n``."""
    # At scale, the IVF-PQ string the configuration picks (``recommended_factory``: ~4*sqrt(n)
    # cells, e.g. 4096 at 1M). An HNSW coarse quantizer assigns a
    # vector to its cell without a scan of all centroids. PQ64 codes alone lose most of the
    # top-10 on 1280-d vectors; re-ranking 10x k candidates with 8-bit scalar codes (1280 B an
    # item, a quarter of exact) buys it back. All IVF rows share one build.
    ivfpq = recommended_factory(n, dim) if n >= 300_000 else "IVF256_HNSW32,PQ64,Refine(SQ8)"
    reranked = recommended_search_parameters(ivfpq)
    # Other search parameters on the same build: what recall each reaches at what latency.
    sweep = [("IVF-PQ + re-rank", ivfpq, params) for params in ivf_params if params != reranked]
    graph = recommended_search_parameters("HNSW32")
    graph_sweep = [("HNSW32", "HNSW32", f"efSearch={e}") for e in ef_searches if f"efSearch={e}" != graph]
    return [
        ("exact", "Flat", ""),
        ("IVF-PQ", ivfpq, reranked.replace("k_factor_rf=30", "k_factor_rf=1")),
        ("IVF-PQ + re-rank", ivfpq, reranked),
        *sweep,
        ("HNSW32", "HNSW32", graph),
        *graph_sweep,
    ]


# faiss asks for 39 training points per k-means cell; 16 loses little recall and trains 2.5x
# faster. Capped so that 4096 cells at 1M train on 64k rows.
train_rows_per_cell = 16
max_train_rows = 65_536


def run_size(
    n: int, synthetic: Synthetic, n_queries: int, latency_queries: int, k: int, skip: set[str], hnsw_max: int,
    ef_construction: int = 40, ivf_params: Sequence[str] = (), ef_searches: Sequence[int] = (),
) -> list[Row]:
    print(f"\n== {n:,} items x {synthetic.dim}-d: generating", flush=True)
    data = synthetic.base(n)
    queries = synthetic.draw(n_queries, stream=0)
    start = time.perf_counter()
    _, truth = faiss.knn(queries, data, k, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"   exact ground truth for {n_queries} queries in {time.perf_counter() - start:.1f}s", flush=True)
    rows = []
    built: dict[str, tuple[faiss.Index, float, float]] = {}
    for label, factory, params in variants(n, synthetic.dim, ivf_params, ef_searches):
        if any(label.startswith(s) for s in skip) or (factory.startswith("HNSW") and n > hnsw_max):
            continue
        if factory not in built:
            index = None  # the previous index must be freed before this one is measured
            built.clear()
            gc.collect()
            before = rss_bytes()
            start = time.perf_counter()
            train_rows = min(max_train_rows, train_rows_per_cell * max(1, _nlist(factory)))
            index = build(factory, data, train_rows, ef_construction)
            built[factory] = (index, time.perf_counter() - start, (rss_bytes() - before) / 2**20)
        index, build_s, memory_mb = built[factory]
        faiss.ParameterSpace().set_index_parameters(index, params)
        _, found = index.search(queries, k)
        p50 = p50_latency(index.search, queries[:latency_queries], k)
        row = Row(n, label, factory, params, build_s, memory_mb, p50, recall_at(found, truth, k))
        print(f"   {label:18s} build {build_s:7.1f}s  mem {memory_mb:8.0f} MB  p50 {p50:8.2f} ms  recall@{k} {row.recall:.3f}", flush=True)
        rows.append(row)
    built.clear()
    del data
    gc.collect()
    return rows


def gpu_speedup(n: int, dim: int, n_queries: int, k: int) -> None:
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        print("--gpu: skipped (this faiss has no GPU support or no CUDA device is visible)")
        return
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, dim), dtype=np.float32)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(data)
    resources = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(resources, 0, cpu)
    gpu.search(queries[:8], k)  # warm-up: CUDA context and kernels
    timings = {}
    for name, index in (("cpu", cpu), ("gpu", gpu)):
        start = time.perf_counter()
        _, found = index.search(queries, k)
        timings[name] = (time.perf_counter() - start, found)
    agree = recall_at(timings["gpu"][1], timings["cpu"][1], k)
    rows = [
        [name, f"{seconds:.3f}", f"{seconds / n_queries * 1000:.2f}"] for name, (seconds, _) in timings.items()
    ]
    print(f"\nExact search, {n:,} random {dim}-d vectors, {n_queries} queries, k={k}")
    print(format_table(["device", "total s", "ms/query"], rows))
    print(f"GPU speed-up {timings['cpu'][0] / timings['gpu'][0]:.1f}x; top-{k} agreement {agree:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--queries", type=int, default=200, help="queries for recall (1M uses a quarter)")
    parser.add_argument("--latency-queries", type=int, default=30)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma-separated labels to leave out, e.g. HNSW")
    parser.add_argument(
        "--hnsw-max", type=int, default=1_000_000,
        help="largest size to build HNSW at (1M x 1280-d takes ~20 min on 2 cores)",
    )
    parser.add_argument("--ef-construction", type=int, default=40, help="HNSW build effort (faiss default 40)")
    parser.add_argument(
        "--ivf-params", default="",
        help="extra ParameterSpace strings for the IVF-PQ index, ';'-separated, e.g. 'nprobe=64,k_factor_rf=10'",
    )
    parser.add_argument("--ef-search", default="", help="extra efSearch values for HNSW, e.g. 128,256")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: all cores)")
    parser.add_argument("--gpu", action="store_true", help="only the GPU vs CPU exact-search comparison")
    parser.add_argument("--gpu-size", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.gpu:
        gpu_speedup(args.gpu_size, args.dim, 1000, args.k)
        return 0
    synthetic = Synthetic(args.dim, args.data)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    rows: list[Row] = []
    for n in (int(size) for size in args.sizes.split(",")):
        n_queries = args.queries if n < 500_000 else max(20, args.queries // 4)
        rows += run_size(
            n, synthetic, n_queries, args.latency_queries, args.k, skip, args.hnsw_max, args.ef_construction,
            [params.strip() for params in args.ivf_params.split(";") if params.strip()],
            [int(e) for e in args.ef_search.split(",") if e.strip()],
        )
    exact = {row.n: row for row in rows if row.factory == "Flat"}
    table = []
    for row in rows:
        base = exact.get(row.n)
        speed = f"{base.p50_ms / row.p50_ms:.1f}x" if base else "-"
        table.append([
            f"{row.n:,}", row.name, row.factory, row.params or "-", f"{row.build_s:.1f}", f"{row.memory_mb:.0f}",
            f"{row.p50_ms:.2f}", speed, f"{row.recall:.3f}",
        ])
    print(f"\n{args.data} synthetic vectors, d={args.dim}, k={args.k}, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads, {time.perf_counter() - started:.0f}s in all")
    print(format_table(
        ["items", "index", "factory", "search params", "build s", "RSS MB", "p50 ms", "vs exact", f"recall@{args.k}"], table
    ))
    print("\nRule (catalens.indexer.stores.faiss_vectors.recommended_factory):")
    for n in (10_000, 100_000, 1_000_000, 10_000_000):
        print(f"  {n:>12,} items -> {recommended_factory(n, args.dim)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
