"""Bounded loopback load on ``catalens serve``: latency percentiles and errors under concurrency.

Starts the server (read-only, 127.0.0.1 only) in a subprocess over an index, then sends
``--requests`` photo searches, ``--concurrency`` at a time, and prints p50/p95/p99 latency,
throughput and the error count. Two baselines run in the same script, so the table reads as
ratios on a noisy shared machine: the same search in-process (no HTTP), and HTTP one at a time.

    .venv/bin/python benchmarks/bench_load.py [--index DIR | --items 200] [--mode deep] [--requests 500] [--concurrency 8]

Without ``--index`` it builds a grocery index of ``--items`` photos in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from catalens.api.tables import format_table

ROOT = Path(__file__).resolve().parents[1]


def build_index(folder: Path, items: int) -> Path:
    """A grocery index of ``items`` catalog photos spread over every class."""
    # `catalens index` as the CLI runs it: then fits what search uses (the classifier, the confidence)
    from catalens.api.service import index as index_catalog
    from catalens.datasets.grocery import catalog_items
    from catalens.indexer.config import IndexConfig

    catalog = catalog_items(("iconic", "train"))
    step = max(1, len(catalog) // items)
    chosen = catalog[::step][:items]
    print(f"building a {len(chosen)}-item index in {folder} ...", flush=True)
    index_catalog(chosen, folder, IndexConfig(), progress=False)
    return folder


def query_photos(limit: int) -> list[bytes]:
    from catalens.datasets.grocery import split_photos

    photos = split_photos("val")
    step = max(1, len(photos) // limit)
    return [photo.path.read_bytes() for photo in photos[::step][:limit]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "catalens.api.cli", "serve", "--index", str(index), "--port", str(port), "--read-only"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("server did not start within 180 s")


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def in_process(index: Path, photos: list[bytes], count: int, mode: str | None, k: int) -> list[float]:
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.engine import SearchEngine

    opened = open_catalog(index)
    engine = SearchEngine(opened)
    engine.search([photos[0]], k=k, mode=mode)  # load the network
    latencies = []
    for position in range(count):
        started = time.perf_counter()
        engine.search([photos[position % len(photos)]], k=k, mode=mode)
        latencies.append(time.perf_counter() - started)
    opened.close()
    return latencies


def over_http(url: str, photos: list[bytes], count: int, concurrency: int, mode: str | None, k: int):
    data = {"k": str(k)} | ({"mode": mode} if mode else {})
    errors: list[str] = []

    def one(position: int, client: httpx.Client) -> float | None:
        started = time.perf_counter()
        try:
            response = client.post(
                f"{url}/search", data=data, files={"image": ("q.jpg", photos[position % len(photos)], "image/jpeg")}
            )
        except httpx.HTTPError as error:
            errors.append(repr(error))
            return None
        elapsed = time.perf_counter() - started
        if response.status_code != 200 or len(response.json().get("results", [])) != k:
            errors.append(f"{response.status_code}: {response.text[:200]}")
            return None
        return elapsed

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        one(0, client)  # warm the connection pool and the server's first-request work
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda position: one(position, client), range(count)))
        wall = time.perf_counter() - started
    return [r for r in results if r is not None], errors, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", help="an existing index (default: build a small grocery index)")
    parser.add_argument("--items", type=int, default=200, help="items of the built index")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--baseline", type=int, default=40, help="requests of each baseline")
    parser.add_argument("--mode", default="deep",
                        help="search mode: fused, local, or a feature of the index (deep, colour, sift, ae, ...)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="catalens-load-") as scratch:
        index = Path(args.index) if args.index else build_index(Path(scratch) / "index", args.items)
        photos = query_photos(50)
        print(f"mode {args.mode}, k {args.k}, {len(photos)} distinct val photos "
              f"(mean {statistics.mean(map(len, photos)) / 1e3:.0f} KB), cpus {os.cpu_count()}", flush=True)
        # In a worker thread, as the server runs it: measured here, OpenVINO inference called
        # from the main thread is ~30% slower than from a worker thread.
        with ThreadPoolExecutor(max_workers=1) as pool:
            base = pool.submit(in_process, index, photos, args.baseline, args.mode, args.k).result()
        port = free_port()
        server = start_server(index, port)
        try:
            url = f"http://127.0.0.1:{port}"
            serial, serial_errors, serial_wall = over_http(url, photos, args.baseline, 1, args.mode, args.k)
            loaded, errors, wall = over_http(url, photos, args.requests, args.concurrency, args.mode, args.k)
        finally:
            server.terminate()
            server.wait(timeout=30)

    reference = percentiles(base)[0]
    serial_rate = len(serial) / serial_wall if serial_wall else float("nan")
    rows = []
    for name, latencies, count, concurrency, wall_s, errs in (
        ("in-process engine.search (1 thread)", base, args.baseline, 1, sum(base), []),
        ("HTTP, one at a time", serial, args.baseline, 1, serial_wall, serial_errors),
        (f"HTTP, {args.concurrency} at a time", loaded, args.requests, args.concurrency, wall, errors),
    ):
        p50, p95, p99 = percentiles(latencies) if latencies else (float("nan"),) * 3
        rows.append((name, count, concurrency, f"{p50:.0f}", f"{p95:.0f}", f"{p99:.0f}",
                     f"{len(latencies) / wall_s:.1f}", f"{len(latencies) / wall_s / serial_rate:.2f}x", len(errs),
                     f"{p50 / reference:.2f}"))
    print()
    print(format_table(["scenario", "requests", "concurrent", "p50 ms", "p95 ms", "p99 ms", "req/s",
                        "req/s vs HTTP one at a time", "errors",
                        "p50 / in-process"], rows))
    for error in (serial_errors + errors)[:5]:
        print(f"error: {error}")
    return 1 if errors or serial_errors else 0


if __name__ == "__main__":
    sys.exit(main())
