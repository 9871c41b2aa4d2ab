"""The fast paths give the answers of the plain ones: batched descriptor matching against a
brute-force matcher, a query's visual words against bulk assignment, per-thread infer requests
against one caller (and a process's first inferences, made at once, without deadlock), queries
side by side against one at a time, and verification that stops early against verifying every
candidate."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from catalens.indexer.features.sift import SiftPreparer
from catalens.indexer.runtime import OpenVinoRunner
from catalens.indexer.stores.backends import open_catalog
from catalens.search import fusion
from catalens.search.engine import SearchEngine
from catalens.search.verification import match_many, verify, verify_many
from tests.conftest import textured_label


def brute_force_pairs(query: np.ndarray, item: np.ndarray, ratio: float) -> set[tuple[int, int]]:
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(query, item, k=2)
    return {(m.queryIdx, m.trainIdx) for m, n in (p for p in knn if len(p) == 2) if m.distance < ratio * n.distance}


def test_batched_matching_finds_the_brute_force_matchers_pairs():
    preparer = SiftPreparer(300, 320)
    query = preparer(textured_label(3).rotate(15).resize((280, 280))).descriptors
    items = [preparer(textured_label(seed)).descriptors for seed in (3, 4, 5)]
    items.append(items[0][:1])  # one descriptor: no second neighbour, no ratio test, no pairs
    items.append(np.zeros((0, 128), np.float32))
    batched = match_many(query, items, 0.8)
    assert len(batched) == len(items)
    for item, pairs in zip(items[:3], batched[:3], strict=True):
        assert set(map(tuple, pairs.tolist())) == brute_force_pairs(query, item, 0.8)
    assert len(batched[0]) > 20 and len(batched[3]) == len(batched[4]) == 0


def test_verify_many_gives_each_pairs_verification():
    preparer = SiftPreparer(400, 320)
    query = preparer(textured_label(4).rotate(20, expand=True, fillcolor=(235, 235, 235)).resize((260, 260)))
    items = [preparer(textured_label(seed)) for seed in (5, 4, 6)]
    together = verify_many(query, items)
    alone = [verify(query, item) for item in items]
    assert [check.inliers for check in together] == [check.inliers for check in alone]
    assert together[1].inliers >= 30 and together[0].inliers < 8


def test_a_querys_words_by_matrix_product_are_the_bulk_assignments_words():
    from catalens.indexer.features.visual_vocabulary import VisualVocabulary

    preparer = SiftPreparer(400, 320)
    described = [preparer(textured_label(seed)).descriptors for seed in range(6)]
    vocabulary = VisualVocabulary(64, iterations=4).fit(np.concatenate(described[:4]), fitted_on=4)
    bulk = np.concatenate(described[4:] * 8)  # over the query-size limit: faiss's flat search
    assert len(bulk) > 2048
    words = vocabulary.transform(bulk)
    query_words = np.concatenate([vocabulary.transform(rows) for rows in described[4:]])
    np.testing.assert_array_equal(query_words, words[: len(query_words)])


def test_openvino_runner_serves_threads_side_by_side_with_the_same_outputs():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    runner = OpenVinoRunner(lambda: module, 32, threads=1)
    batches = [np.random.default_rng(seed).random((3, 3, 32, 32), dtype=np.float32) for seed in range(8)]
    # A batch goes through the infer-request pool; one image through the thread's own request.
    expected = [np.concatenate([runner(batch[i : i + 1]) for i in range(len(batch))]) for batch in batches]
    np.testing.assert_allclose(runner(batches[0]), expected[0], rtol=1e-5, atol=1e-6)
    got: dict[int, np.ndarray] = {}

    def work(position: int) -> None:
        for _ in range(5):
            got[position] = runner(batches[position])

    threads = [threading.Thread(target=work, args=(position,)) for position in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for position, output in enumerate(expected):
        np.testing.assert_allclose(got[position], output, rtol=1e-5, atol=1e-6)


FIRST_INFERENCES_AT_ONCE = """
import sys, threading
import numpy as np
from catalens.indexer.runtime import OpenVinoRunner

def build():
    import torch
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))

runner = OpenVinoRunner(build, (3, 32, 32), cache_key="first-inference-probe")
sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible, to open the race wide
start = threading.Barrier(4)

def first_inference():
    start.wait()
    runner(np.zeros((1, 3, 32, 32), np.float32))

threads = [threading.Thread(target=first_inference) for _ in range(start.parties)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("answered")
"""


def test_first_inferences_of_a_process_made_at_once_do_not_deadlock(tmp_path):
    # A server's search, classify and anomaly requests arrive together, each with the process's
    # first inference. Without the first one running alone, about half these processes hung
    # (from the cached conversion, as a server starts).
    import os
    import subprocess
    import sys

    env = {**os.environ, "CATALENS_CACHE": str(tmp_path / "cache")}
    for attempt in range(8):  # the first converts and caches; the rest start as a server does
        try:
            done = subprocess.run([sys.executable, "-c", FIRST_INFERENCES_AT_ONCE], env=env, capture_output=True,
                                  text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"attempt {attempt}: four threads' first inferences deadlocked") from None
        assert done.returncode == 0 and done.stdout.strip() == "answered", done.stderr[-2000:]


def shop_photos(catalog: Path, folder: Path) -> list[Path]:
    """Each catalog image turned and shrunk, as a shop photo of it would be."""
    photos = []
    for position, image in enumerate(sorted(catalog.rglob("*.jpg"))):
        photo = folder / f"photo{position}.jpg"
        Image.open(image).rotate(12, expand=True, fillcolor=(240, 240, 240)).resize((230, 230)).save(photo)
        photos.append(photo)
    return photos


def test_a_batch_answered_side_by_side_equals_one_query_at_a_time(synthetic_index, tmp_path):
    index, catalog_folder = synthetic_index
    catalog = open_catalog(index)
    try:
        engine = SearchEngine(catalog)
        sources = [*shop_photos(catalog_folder, tmp_path), tmp_path / "missing.jpg"]
        serial = engine.search(sources, k=5, settings=engine.settings.merged(query_threads=1))
        side = engine.search(sources, k=5, settings=engine.settings.merged(query_threads=3))
        assert [result.to_json() for result in side] == [result.to_json() for result in serial]
        assert side[-1].error and "missing.jpg" in side[-1].error
    finally:
        catalog.close()


def test_verification_stopping_early_keeps_the_top_result(synthetic_index, tmp_path, monkeypatch):
    index, catalog_folder = synthetic_index
    catalog = open_catalog(index)
    try:
        engine = SearchEngine(catalog)
        photos = shop_photos(catalog_folder, tmp_path)
        early = [result.results[0].id for result in engine.search(photos, k=3)]
        monkeypatch.setattr(fusion, "_VERIFY_CHUNK", 10_000)  # every candidate in one round: no early stop
        full = [result.results[0].id for result in engine.search(photos, k=3)]
        assert early == full
        stems = [image.stem for image in sorted(catalog_folder.rglob("*.jpg"))]
        assert sum(photo_id.endswith(f"{stem}.jpg") for photo_id, stem in zip(full, stems, strict=True)) >= 6, (full, stems)
    finally:
        catalog.close()


def test_blas_threads_are_told_to_sleep_before_numpy_loads():
    # Spinning OpenBLAS threads cost a search ~30 ms of CPU; the setting only counts before load.
    import os
    import subprocess
    import sys

    probe = "import sys, os, catalens.api; print('numpy' in sys.modules, os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_THREAD_TIMEOUT"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "4"]
    done = subprocess.run([sys.executable, "-c", probe], env={**env, "OPENBLAS_THREAD_TIMEOUT": "20"},
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "20"]  # a user's own setting stands


def test_index_and_search_run_without_importing_torch_once_the_network_is_converted(tiny_catalog, tmp_path):
    # Importing torch is over a second of every command's start; with the network's conversion
    # cached, neither indexing nor searching builds a PyTorch module.
    import os
    import subprocess
    import sys

    env = {**os.environ, "CATALENS_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-m", "catalens.api.cli", "index", str(tiny_catalog), "--index",
                            str(tmp_path / "first"), "--quiet"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert list((tmp_path / "cache").glob("*.xml")), "the first run caches the converted network"
    photo = next(tiny_catalog.rglob("*.jpg"))
    probe = (
        "import sys\n"
        "from catalens.api.cli import main\n"
        f"assert main(['index', {str(tiny_catalog)!r}, '--index', {str(tmp_path / 'second')!r}, '--quiet']) == 0\n"
        "print('index', 'torch' in sys.modules)\n"
        f"assert main(['search', {str(photo)!r}, '--index', {str(tmp_path / 'second')!r}, '--json']) == 0\n"
        "print('search', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if line.split()[0] in ("index", "search")] == [
        "index False", "search False"]
