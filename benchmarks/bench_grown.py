"""Fused search, end to end, on a catalog grown to ``--size`` items from a grocery index.

    .venv/bin/python -m benchmarks.bench_grown --index DIR [--size 100000] [--queries 60] [--work DIR]

``bench_speed --grow`` times only the stages that grow with the catalog. This one searches a
real index of that size: the SQLite store, the FAISS files, the inverted file, the keypoint
blobs read for verification and the match calibration all at ``--size`` items.

The grown index (in ``--work``, default a temporary folder; about 3.5 GB at 100k items) copies
``--index``: every item again under new ids until the size is reached, each copy with its
keypoint blobs and words (posting lists grow as they would, under the same vocabulary) and its
global vectors plus noise (cosine ~0.9 to the original), so that the nearest neighbours are not
ties. Its FAISS index is the one the configuration rule recommends at that size
(``recommended_factory``: HNSW32 at 100k), built from SQLite when the index opens. The table gives the time to grow, the first search (FAISS load, inverted
file, classifier and match calibration fitted at that size) and p50/p95 of one search a call over
val photos, beside the same searches on ``--index`` in this process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from catalens.api.tables import format_table
from catalens.datasets.grocery import split_photos
from catalens.indexer.features import l2_normalise
from catalens.indexer.stores import item_key
from catalens.indexer.stores.faiss_vectors import recommended_factory


def grow(source: Path, target: Path, size: int, seed: int = 0) -> int:
    """``source`` copied to ``target`` with its items repeated under new ids up to ``size``."""
    target.mkdir(parents=True)
    meta = json.loads((source / "catalens.json").read_text())
    # The vector index the configuration rule gives a catalog of this size (exact search up to 30k).
    meta["config"]["faiss_factory"] = recommended_factory(size, max(meta["dims"].values()))
    meta.pop("faiss_built", None)
    (target / "catalens.json").write_text(json.dumps(meta, indent=2))
    shutil.copytree(source / "models", target / "models")
    db = sqlite3.connect(target / "items.sqlite")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    db.create_function("item_key", 1, item_key, deterministic=True)
    db.execute("ATTACH DATABASE ? AS src", (f"file:{source / 'items.sqlite'}?mode=ro",))
    for (sql,) in db.execute("SELECT sql FROM src.sqlite_master WHERE sql IS NOT NULL").fetchall():
        db.execute(sql)
    db.execute("INSERT INTO state SELECT * FROM src.state")
    dims = {feature: len(blob) // 4 for feature, blob in db.execute(
        "SELECT feature, data FROM src.features WHERE feature IN ('deep', 'colour', 'deep_ft') GROUP BY feature")}
    count = db.execute("SELECT COUNT(*) FROM src.items").fetchone()[0]
    rng = np.random.default_rng(seed)
    copies = -(-size // count)
    for copy in range(copies):
        limit = min(count, size - copy * count)
        suffix = "" if copy == 0 else f"#copy{copy}"
        db.execute("CREATE TEMP TABLE chosen AS SELECT key, id FROM src.items ORDER BY key LIMIT ?", (limit,))
        db.execute("""INSERT INTO items SELECT item_key(i.id || ?), i.id || ?, image, category, title, attributes,
                      fingerprint, updated_at FROM src.items i JOIN chosen USING (key)""", (suffix, suffix))
        db.execute("""INSERT INTO features SELECT f.feature, item_key(chosen.id || ?), f.data FROM src.features f
                      JOIN chosen USING (key) WHERE f.feature NOT IN ('deep', 'colour', 'deep_ft')""", (suffix,))
        for feature, dim in dims.items():
            rows = db.execute("SELECT chosen.id, f.data FROM src.features f JOIN chosen USING (key) WHERE f.feature = ?",
                              (feature,)).fetchall()
            vectors = np.frombuffer(b"".join(data for _, data in rows), np.float32).reshape(-1, dim)
            if copy:
                vectors = l2_normalise(vectors + 0.45 / np.sqrt(dim) * rng.standard_normal(vectors.shape, np.float32))
            db.executemany("INSERT INTO features VALUES (?, ?, ?)",
                           [(feature, item_key(item_id + suffix), vector.astype(np.float32).tobytes())
                            for (item_id, _), vector in zip(rows, vectors, strict=True)])
        db.execute("DROP TABLE chosen")
        db.commit()
    db.execute("UPDATE state SET value = CAST(value AS INTEGER) + 1 WHERE name = 'generation'")
    db.commit()
    db.execute("DETACH DATABASE src")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return min(size, copies * count)


def latencies(engine, photos: list[bytes]) -> list[float]:
    times = []
    for photo in photos:
        started = time.perf_counter()
        engine.search([photo])
        times.append(1000 * (time.perf_counter() - started))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="a grocery index (iconic + train photos)")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--work", type=Path, help="where the grown index is kept (default: a temporary folder)")
    args = parser.parse_args()

    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.engine import SearchEngine

    val = split_photos("val")
    photos = [photo.path.read_bytes() for photo in val[:: max(1, len(val) // args.queries)][: args.queries]]
    work = args.work or Path(tempfile.mkdtemp(prefix="catalens-grown-"))
    target = work / f"grown-{args.size}"
    rows = []
    for location, label in ((args.index, "the index as built"), (target, "grown")):
        grow_seconds = None
        if location == target and not (target / "catalens.json").is_file():
            started = time.perf_counter()
            grow(args.index, target, args.size)
            grow_seconds = time.perf_counter() - started
        started = time.perf_counter()
        catalog = open_catalog(location)
        engine = SearchEngine(catalog)
        engine.search(photos[:1])
        first = time.perf_counter() - started
        items = catalog.items.count()
        times = latencies(engine, photos)
        rows.append((label, f"{items:,}", "" if grow_seconds is None else f"{grow_seconds:.0f} s", f"{first:.1f} s",
                     f"{statistics.median(times):.1f}", f"{np.percentile(times, 95):.1f}"))
        catalog.close()
    print(format_table(["catalog", "items", "grown in", "open + first search", "fused p50 ms", "p95 ms"], rows))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
