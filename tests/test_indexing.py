import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from catalens.indexer.config import IndexConfig
from catalens.indexer.pipeline import index_catalog
from catalens.indexer.stores.backends import open_catalog
from catalens.search.engine import SearchEngine
from tests.conftest import draw_product


def _config(**overrides) -> IndexConfig:
    return IndexConfig(num_workers=0, **overrides)


def _write_bad_files(root):
    bad = root / "Bad" / "Files"
    bad.mkdir(parents=True)
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300, 3), np.uint8)).save(buffer, "JPEG")
    (bad / "truncated.jpg").write_bytes(buffer.getvalue()[:2000])
    Image.new("1", (12000, 12000)).save(bad / "bomb.png")
    return {"zero.jpg": "empty file", "text.jpg": "not an image", "corrupt.png": "",
            "truncated.jpg": "truncated or corrupt", "bomb.png": "image too large"}


def test_bad_files_are_skipped_and_reported_and_nothing_is_lost(tiny_catalog, tmp_path):
    expected = _write_bad_files(tiny_catalog)
    report = index_catalog(tiny_catalog, tmp_path / "idx", _config(max_pixels=50_000_000), progress=False)
    assert report.added == 12
    reasons = {failure.source.rsplit("/", 1)[-1]: failure.reason for failure in report.failures}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert name in reasons[name] and reason in reasons[name]
    log_text = open(report.log_path).read()
    assert "bomb.png" in log_text and "text.jpg: not an image" in log_text
    index = open_catalog(tmp_path / "idx")
    assert index.items.count() == 12 and len(index.items.failures()) == 5
    assert index.vectors("deep").ntotal == 12


def test_incremental_run_extracts_only_new_and_changed_items(tiny_catalog, tmp_path):
    first = index_catalog(tiny_catalog, tmp_path / "idx", _config(), progress=False)
    assert first.added == 12
    again = index_catalog(tiny_catalog, tmp_path / "idx", _config(), progress=False)
    assert (again.added, again.updated, again.unchanged, again.extracted) == (0, 0, 12, 0)

    draw_product(tiny_catalog / "Dairy/Milk/new.jpg", seed=99)
    changed = tiny_catalog / "Dairy/Milk/item00.jpg"
    draw_product(changed, seed=1234)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (tiny_catalog / "Fruit/Apple/item02.jpg").unlink()
    third = index_catalog(tiny_catalog, tmp_path / "idx", _config(), progress=False)
    assert (third.added, third.updated, third.removed, third.unchanged) == (1, 1, 1, 10)

    index = open_catalog(tmp_path / "idx")
    assert index.items.count() == 12 and index.vectors("deep").ntotal == 12
    hits = SearchEngine(index).search([changed], k=1, mode="deep")[0].results
    assert hits[0].id == "Dairy/Milk/item00.jpg" and hits[0].score > 0.99
    ids = {hit.id for hit in SearchEngine(index).search([changed], k=20, mode="deep")[0].results}
    assert "Fruit/Apple/item02.jpg" not in ids


def test_items_indexed_before_a_feature_existed_get_it_on_the_next_run(tiny_catalog, tmp_path):
    index_catalog(tiny_catalog, tmp_path / "idx", _config(), progress=False)
    index = open_catalog(tmp_path / "idx")
    index.items.delete_feature("colour")  # what an index from before the colour feature looks like
    index.close()
    upgrade = index_catalog(tiny_catalog, tmp_path / "idx", _config(), progress=False)
    assert (upgrade.added, upgrade.updated, upgrade.extracted) == (0, 12, 12)
    index = open_catalog(tmp_path / "idx")
    assert len(index.items.row_keys("colour")) == 12 and index.vectors("colour").ntotal == 12
    index.close()
    settled = index_catalog(tiny_catalog, tmp_path / "idx", _config(), progress=False)
    assert (settled.updated, settled.unchanged, settled.extracted) == (0, 12, 0)


def test_metadata_only_change_updates_without_re_extracting(tmp_path):
    image = draw_product(tmp_path / "a.jpg", seed=3)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": str(image), "category": "X/Y", "title": "old"}) + "\n")
    index_catalog(manifest, tmp_path / "idx", _config(), progress=False)
    manifest.write_text(json.dumps({"id": "a", "image": str(image), "category": "X/Z", "title": "new"}) + "\n")
    report = index_catalog(manifest, tmp_path / "idx", _config(), progress=False)
    assert (report.metadata_updated, report.extracted) == (1, 0)
    record = open_catalog(tmp_path / "idx").items.item_by_id("a")
    assert (record.category, record.title) == ("X/Z", "new")


def test_remove_command_deletes_from_every_store(tiny_catalog, tmp_path):
    index_catalog(tiny_catalog, tmp_path / "idx", _config(), progress=False)
    from catalens.api.cli import main

    assert main(["remove", "Dairy/Milk/item00.jpg", "--index", str(tmp_path / "idx")]) == 0
    assert main(["remove", "nope", "--index", str(tmp_path / "idx")]) == 1
    index = open_catalog(tmp_path / "idx")
    assert index.items.count() == 11 and index.vectors("deep").ntotal == 11


def _count(db_path) -> int:
    try:
        with sqlite3.connect(db_path, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_run_resumes_to_the_same_index_as_a_clean_run(tmp_path):
    root = tmp_path / "catalog"
    for number in range(160):
        draw_product(root / f"C{number % 4}" / f"p{number:03d}.jpg", seed=number, size=320)
    env = dict(os.environ, CATALENS_COMMIT_EVERY="16", CATALENS_NUM_WORKERS="0")
    command = [sys.executable, "-m", "catalens.api.cli", "index", str(root), "--index", str(tmp_path / "idx"), "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count(tmp_path / "idx" / "items.sqlite") < 32 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = _count(tmp_path / "idx" / "items.sqlite")
    assert 0 < partial < 160, f"the kill landed at {partial} items; the test needs it mid-run"

    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    clean = index_catalog(root, tmp_path / "clean", _config(), progress=False)
    resumed = open_catalog(tmp_path / "idx")
    assert resumed.items.count() == clean.added == 160
    assert resumed.vectors("deep").ntotal == 160
    keys = resumed.vectors("deep").keys()
    assert len(set(keys.tolist())) == 160
    query = root / "C1" / "p001.jpg"
    assert SearchEngine(resumed).search([query], k=1, mode="deep")[0].results[0].id == "C1/p001.jpg"
