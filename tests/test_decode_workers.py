"""The decode loop's worker processes: order, per-image errors, bounded prefetch, clean shutdown."""

from __future__ import annotations

import ast
import faulthandler
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from catalens.indexer.features import decode
from catalens.indexer.features.decode import in_decode_worker, iter_prepared
from catalens.indexer.features.sift import SiftPreparer
from tests.conftest import textured_label

BATCH = 4


def mean_colour(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float32).mean(axis=(0, 1))


def where_prepared(image: Image.Image) -> tuple[bool, int]:
    return in_decode_worker(), os.getpid()


def refuse_wide(image: Image.Image) -> int:
    if image.width > 40:
        raise ValueError("too wide for this test")
    return image.width


def crash_on_red(image: Image.Image) -> int:
    if in_decode_worker() and image.getpixel((0, 0)) == (255, 0, 0):
        faulthandler.disable()  # pytest's, inherited by the fork: no stack dump for a planned crash
        os.kill(os.getpid(), signal.SIGSEGV)
    return 0


def opencv_threads(image: Image.Image) -> int:
    return cv2.getNumThreads()


def write_photos(folder: Path, count: int) -> list[Path | bytes]:
    """``count`` small PNGs, a corrupt one at 5 and a missing path at 13."""
    rng = np.random.default_rng(7)
    sources: list[Path | bytes] = []
    for index in range(count):
        path = folder / f"photo{index:02d}.png"
        if index == 5:
            path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        elif index != 13:
            Image.fromarray(rng.integers(0, 255, (24 + index, 32, 3), dtype=np.uint8)).save(path)
        sources.append(path)
    return sources


def collect(sources, preparers, num_workers: int, batch_size: int = BATCH):
    return list(iter_prepared(sources, preparers, batch_size=batch_size, num_workers=num_workers))


def test_workers_answer_in_order_every_position_once_with_the_in_process_payloads(tmp_path):
    sources = write_photos(tmp_path, 20)
    buffer = tmp_path / "photo00.png"
    sources.append(buffer.read_bytes())  # raw bytes travel to the workers as they are
    preparers = {"colour": mean_colour, "where": where_prepared}

    batches = collect(sources, preparers, num_workers=2)
    local = collect(sources, preparers, num_workers=0)

    assert len(batches) == len(local) == 6
    seen = []
    for number, batch in enumerate(batches):
        answered = sorted(batch.positions + list(batch.errors))
        assert answered == list(range(number * BATCH, min((number + 1) * BATCH, len(sources))))
        seen.extend(answered)
    assert seen == list(range(len(sources)))
    errors = {position: error for batch in batches for position, error in batch.errors.items()}
    assert set(errors) == {5, 13}
    assert "photo05.png" in errors[5] and "photo13.png" in errors[13] and "file not found" in errors[13]
    assert errors == {position: error for batch in local for position, error in batch.errors.items()}

    for batch, reference in zip(batches, local, strict=True):
        assert batch.positions == reference.positions
        for got, want in zip(batch.prepared["colour"], reference.prepared["colour"], strict=True):
            np.testing.assert_array_equal(got, want)
    in_worker = [where for batch in batches for where in batch.prepared["where"]]
    assert all(flag and pid != os.getpid() for flag, pid in in_worker)
    assert not any(flag for batch in local for flag, _ in batch.prepared["where"])


def test_a_preparer_failing_on_one_image_is_that_images_error(tmp_path):
    sources = write_photos(tmp_path, 12)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (64, 8)).save(wide)
    sources[9] = wide
    batches = collect(sources, {"width": refuse_wide}, num_workers=2)
    errors = {position: error for batch in batches for position, error in batch.errors.items()}
    assert set(errors) == {5, 9}
    assert errors[9] == f"{wide}: unreadable (ValueError: too wide for this test)"
    assert [position for batch in batches for position in batch.positions] == [0, 1, 2, 3, 4, 6, 7, 8, 10, 11]


def test_batches_in_flight_stay_within_four_a_worker(tmp_path, monkeypatch):
    submitted = []

    class CountingExecutor(decode.ProcessPoolExecutor):
        def submit(self, *args, **kwargs):
            submitted.append(1)
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(decode, "ProcessPoolExecutor", CountingExecutor)
    sources = write_photos(tmp_path, 20)
    ahead = []
    for consumed, _ in enumerate(iter_prepared(sources, {"colour": mean_colour}, batch_size=1, num_workers=2)):
        ahead.append(len(submitted) - consumed)  # submitted and not yet consumed, this batch included
    assert len(submitted) == 20
    assert max(ahead) == 4 * 2
    assert ahead[0] == 8  # not all 20 queued at once


def test_closing_the_generator_early_leaves_no_worker_processes(tmp_path):
    sources = write_photos(tmp_path, 20)
    batches = iter_prepared(sources, {"colour": mean_colour}, batch_size=1, num_workers=2)
    next(batches)
    assert len(multiprocessing.active_children()) == 2
    batches.close()
    assert multiprocessing.active_children() == []

    forgotten = iter_prepared(sources, {"colour": mean_colour}, batch_size=1, num_workers=2)
    next(forgotten)
    del forgotten
    gc.collect()
    assert multiprocessing.active_children() == []


KILLED_MID_RUN = """
import multiprocessing, os, signal, sys
from catalens.indexer.features.decode import iter_prepared

batches = iter_prepared(sys.argv[1:], {"pid": lambda image: os.getpid()}, batch_size=1, num_workers=2)
next(batches)
print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_workers_leave_when_the_main_process_is_killed_outright(tmp_path):
    sources = [str(path) for path in write_photos(tmp_path, 20)]
    printed = tmp_path / "workers.txt"
    with printed.open("w") as stdout:  # a pipe would stay open as long as the workers live
        result = subprocess.run([sys.executable, "-c", KILLED_MID_RUN, *sources], stdout=stdout, timeout=60)
    assert result.returncode == -signal.SIGKILL
    workers = [int(pid) for pid in printed.read_text().split()]
    assert len(workers) == 2
    try:
        deadline = time.monotonic() + 15
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(pid) for pid in workers), "decode workers outlived their killed parent"
    finally:
        for pid in filter(running, workers):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_that_dies_ends_the_run_with_a_clear_error(tmp_path):
    sources = write_photos(tmp_path, 12)
    red = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(red)
    sources[9] = red
    with pytest.raises(RuntimeError, match="decode worker process died"):
        collect(sources, {"crash": crash_on_red}, num_workers=2)
    assert multiprocessing.active_children() == []


def test_sift_in_a_worker_gives_the_in_process_descriptors(tmp_path):
    sources = []
    for seed in range(6):
        textured_label(seed, size=200).save(tmp_path / f"label{seed}.png")
        sources.append(tmp_path / f"label{seed}.png")
    # One preparer, used in this thread first: the forked workers inherit its detector (a search
    # in the same thread before indexing), and must still run OpenCV sequentially.
    preparer = SiftPreparer(200, 256)
    in_process = collect(sources, {"sift": preparer}, num_workers=0, batch_size=2)
    in_workers = collect(sources, {"sift": preparer, "threads": opencv_threads}, num_workers=2, batch_size=2)
    got = [d for batch in in_workers for d in batch.prepared["sift"]]
    want = [d for batch in in_process for d in batch.prepared["sift"]]
    assert len(got) == len(want) == 6 and all(len(d) > 20 for d in want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)
    # The worker's detector told OpenCV to run sequentially (setNumThreads(0) reads back as 1).
    assert {threads for batch in in_workers for threads in batch.prepared["threads"]} == {1}


def test_the_decode_loop_does_not_import_torch():
    tree = ast.parse(Path(decode.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.split(".")[0] == "torch" for name in imported)
    probe = "import sys, catalens.indexer.features.decode; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
