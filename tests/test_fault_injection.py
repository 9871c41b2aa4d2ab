"""SIGKILL at random points of ``index``, ``train-ae``, ``finetune`` and HTTP writes (issue 16);
afterwards the index opens, its counts match, and nothing committed before the kill is lost.

The kill times are drawn from a seeded generator; a failure names the seed, and
``CATALENS_FAULT_SEED=N`` replays it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from catalens.datasets.catalog import CatalogItem, write_manifest
from tests.conftest import draw_product

CATALENS = str(Path(sys.executable).parent / "catalens")
KEY = "fault-injection-key-0123"
SEED = int(os.environ.get("CATALENS_FAULT_SEED", time.time_ns() % 1_000_000))


@pytest.fixture()
def rng(request) -> random.Random:
    return random.Random(f"{SEED}:{request.node.name}")


def run_until_killed(argv: list[str], after: float, **env: str) -> int | None:
    """Run ``catalens argv`` and SIGKILL it ``after`` seconds in; its exit status if it ended first."""
    process = subprocess.Popen([CATALENS, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **env})
    try:
        return process.wait(timeout=after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return None


def assert_consistent(index: Path, committed: set[str], context: str) -> int:
    """The index opens and checks clean; every FAISS index holds exactly the stored rows; every
    item has its deep and colour rows; every id in ``committed`` is there. Returns the item count."""
    from catalens.api.cli import main
    from catalens.indexer.stores.backends import open_catalog

    context = f"{context} (CATALENS_FAULT_SEED={SEED})"
    assert main(["check", "--index", str(index)]) == 0, context
    catalog = open_catalog(index)
    try:
        count = catalog.items.count()
        for feature in catalog.dims():
            assert catalog.vectors(feature).ntotal == catalog.items.row_count(feature), (feature, context)
        for feature in ("deep", "colour"):
            assert catalog.items.row_count(feature) == count, (feature, context)
        missing = committed - set(catalog.items.records())
        assert not missing, (sorted(missing)[:5], context)
    finally:
        catalog.close()
    return count


@pytest.fixture()
def photos(tmp_path) -> list[CatalogItem]:
    folder = tmp_path / "photos"
    return [CatalogItem(id=f"p{n:02d}", image=draw_product(folder / f"p{n:02d}.jpg", seed=100 + n, size=160),
                        category=["Dairy/Milk", "Fruit/Apple", "Fruit/Pear"][n % 3]) for n in range(48)]


@pytest.fixture()
def indexed(synthetic_index, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic_index[0], tmp_path / "index"))


def run_until_count(argv: list[str], index: Path, target: int, then: float, **env: str) -> int | None:
    """Run ``catalens argv`` and SIGKILL it ``then`` seconds after ``index`` holds ``target`` items
    (a point of the run's progress, whatever the machine's speed); its exit status if it ended first."""
    process = subprocess.Popen([CATALENS, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **env})
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with sqlite3.connect(f"file:{index / 'items.sqlite'}?mode=ro", uri=True, timeout=1) as db:
                if db.execute("SELECT COUNT(*) FROM items").fetchone()[0] >= target:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.02)
    time.sleep(then)
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGKILL)
    process.wait()
    return None


def test_index_killed_at_random_points_resumes_without_losing_committed_items(photos, tmp_path, rng):
    index = tmp_path / "index"
    first = write_manifest(photos[:9], tmp_path / "first.jsonl")
    everything = write_manifest(photos, tmp_path / "all.jsonl")
    small_batches = {"CATALENS_COMMIT_EVERY": "4", "CATALENS_BATCH_SIZE": "4"}
    assert run_until_killed(["index", str(first), "--index", str(index), "--quiet"], 120, **small_batches) == 0
    committed = {item.id for item in photos[:9]}
    killed = 0
    for attempt in range(3):
        target, then = rng.randint(9, len(photos) - 4), rng.uniform(0.0, 0.4)
        status = run_until_count(["index", str(everything), "--index", str(index), "--quiet"], index, target, then,
                                 **small_batches)
        killed += status is None
        committed |= set(_records(index)) if status is None else set()
        assert_consistent(index, committed, f"index killed {then:.2f}s after {target} items, attempt {attempt}")
    assert killed, f"no run was killed before it ended (CATALENS_FAULT_SEED={SEED})"
    assert run_until_killed(["index", str(everything), "--index", str(index), "--quiet"], 120) == 0
    assert assert_consistent(index, {item.id for item in photos}, "index run to the end") == len(photos)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_http_writes_killed_at_a_random_point_keep_what_was_answered_and_leave_no_orphans(indexed, photos, rng):
    port = _free_port()
    server = subprocess.Popen([CATALENS, "serve", "--index", str(indexed), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "CATALENS_API_KEY": KEY})
    url, answered, stop = f"http://127.0.0.1:{port}", set(), threading.Event()
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

        def write() -> None:
            with httpx.Client(timeout=30) as client:
                for photo in photos:
                    if stop.is_set():
                        return
                    try:
                        response = client.post(f"{url}/items", headers={"X-API-Key": KEY},
                                               files={"image": ("p.jpg", Path(photo.image).read_bytes(), "image/jpeg")},
                                               data={"id": photo.id, "category": photo.category})
                    except httpx.HTTPError:
                        return
                    if response.status_code == 200:
                        answered.add(photo.id)

        writers = [threading.Thread(target=write) for _ in range(2)]
        for writer in writers:
            writer.start()
        after = rng.uniform(0.5, 4.0)
        time.sleep(after)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
        stop.set()
    for writer in writers:
        writer.join()
    assert_consistent(indexed, answered, f"server killed {after:.2f}s into writes")

    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    # A restart: orphan uploads go. Started and shut down as a server is, so its background refit
    # thread ends with it instead of refitting a closed catalog after the test.
    with TestClient(create_app(indexed, api_key=KEY)):
        pass
    with_items = {Path(record.image).name for record in _records(indexed).values()}
    assert {path.name for path in (indexed / "uploads").iterdir()} <= with_items


def _records(index: Path):
    from catalens.indexer.stores.backends import open_catalog

    catalog = open_catalog(index)
    try:
        return catalog.items.records()
    finally:
        catalog.close()


def test_train_ae_killed_at_a_random_point_leaves_a_whole_index_and_trains_again(indexed, rng):
    items = set(_records(indexed))
    after = rng.uniform(3.0, 10.0)
    run_until_killed(["train-ae", "--index", str(indexed), "--epochs", "12"], after)
    assert assert_consistent(indexed, items, f"train-ae killed after {after:.2f}s") == len(items)
    assert run_until_killed(["train-ae", "--index", str(indexed), "--epochs", "2"], 120) == 0
    assert_consistent(indexed, items, "train-ae after the kill")
    meta = json.loads((indexed / "catalens.json").read_text())
    assert "ae" in meta["config"]["features"]


@pytest.mark.slow
def test_finetune_killed_at_a_random_point_leaves_a_whole_index(indexed, rng):
    items = set(_records(indexed))
    after = rng.uniform(4.0, 30.0)
    run_until_killed(["finetune", "--index", str(indexed), "--steps", "20"], after)
    assert assert_consistent(indexed, items, f"finetune killed after {after:.2f}s") == len(items)
    from catalens.api.cli import main

    assert main(["search", str(next(iter(_records(indexed).values())).image), "--index", str(indexed)]) == 0


# --- the first run, killed at every durable step (issue 35)


class Killed(BaseException):
    """Stands for SIGKILL inside the process: no ``except Exception`` handler stops it."""


class KillSwitch:
    """Counts the durable steps of a run (SQLite commits, FAISS, model and metadata files, each
    before and after) and raises ``Killed`` at step ``at`` (never where ``at`` is None)."""

    def __init__(self, at: int | None = None):
        self.at, self.steps = at, []

    def step(self, name: str) -> None:
        self.steps.append(name)
        if len(self.steps) == self.at:
            raise Killed(name)


def install_kill_switch(monkeypatch, switch: KillSwitch) -> None:
    from contextlib import contextmanager

    from catalens.indexer import estimator
    from catalens.indexer.stores import folder
    from catalens.indexer.stores.faiss_vectors import FaissVectorStore
    from catalens.indexer.stores.sqlite_items import SqliteItemStore

    transaction = SqliteItemStore._transaction

    @contextmanager
    def committed_then_step(self):
        with transaction(self) as db:
            yield db
        switch.step("sqlite commit")

    def around(name, function):
        def wrapped(*args, **kwargs):
            switch.step(f"before {name}")
            result = function(*args, **kwargs)
            switch.step(f"after {name}")
            return result
        return wrapped

    monkeypatch.setattr(SqliteItemStore, "_transaction", committed_then_step)
    monkeypatch.setattr(FaissVectorStore, "save", around("faiss save", FaissVectorStore.save))
    monkeypatch.setattr(folder, "write_json_atomic", around("catalens.json", folder.write_json_atomic))
    monkeypatch.setattr(estimator.Estimator, "save", around("model save", estimator.Estimator.save))


def index_answers(index: Path, queries: list[Path]) -> dict:
    """What an index answers: its modes, dims, item count, and each mode's top 5 ids for each query."""
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.engine import SearchEngine
    from catalens.search.settings import SearchSettings

    catalog = open_catalog(index)
    try:
        engine = SearchEngine(catalog, SearchSettings(confidence=False, query_threads=1))
        answers = {"modes": engine.modes(), "dims": catalog.dims(), "items": catalog.items.count()}
        for mode in engine.modes():
            results = engine.search([str(path) for path in queries], k=5, mode=mode)
            answers[mode] = [[(hit.id, round(hit.score, 3)) for hit in result.results] for result in results]
        return answers
    finally:
        catalog.close()


def test_a_first_run_killed_at_any_durable_step_resumes_to_the_index_an_uninterrupted_run_builds(
        photos, tmp_path, monkeypatch):
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    items = photos[:10]
    config = IndexConfig(num_workers=0, batch_size=4, commit_every=4)
    queries = [Path(items[n].image) for n in (0, 5, 9)]
    with monkeypatch.context() as patched:
        counted = KillSwitch()
        install_kill_switch(patched, counted)
        index_catalog(items, tmp_path / "whole", config, progress=False)
    expected = index_answers(tmp_path / "whole", queries)
    assert set(expected["dims"]) == {"deep", "colour"} and "sift" in expected["modes"]
    assert counted.steps.count("sqlite commit") >= 3 and "before catalens.json" in counted.steps
    lost = {}
    for at in range(1, len(counted.steps) + 1):
        index = tmp_path / f"killed-{at}"
        with monkeypatch.context() as patched:
            install_kill_switch(patched, KillSwitch(at))
            with pytest.raises(Killed):
                index_catalog(items, index, config, progress=False)
        index_catalog(items, index, config, progress=False)
        answers = index_answers(index, queries)
        if answers != expected:
            lost[f"{at}: {counted.steps[at - 1]}"] = {key: value for key, value in answers.items()
                                                        if value != expected[key]}
    assert not lost, lost


EXIT_BEFORE_LAST_METADATA = """
import os, sys
from catalens.indexer.stores import folder
from catalens.api.cli import main

write, seen = folder.write_json_atomic, []

def write_or_die(path, data):
    seen.append(path)
    if len(seen) == 2:  # catalens.json is written when the index is made, then after the run's last commit
        os._exit(137)
    write(path, data)

folder.write_json_atomic = write_or_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_first_index_process_dying_after_its_last_commit_resumes_with_every_mode(photos, tmp_path):
    index, manifest = tmp_path / "index", write_manifest(photos[:8], tmp_path / "first.jsonl")
    argv = ["index", str(manifest), "--index", str(index), "--quiet"]
    died = subprocess.run([sys.executable, "-c", EXIT_BEFORE_LAST_METADATA, *argv], capture_output=True, text=True)
    assert died.returncode == 137, died.stderr
    assert json.loads((index / "catalens.json").read_text())["dims"] == {}  # what the kill left
    rerun = subprocess.run([CATALENS, *argv], capture_output=True, text=True)
    assert rerun.returncode == 0 and "unchanged" in rerun.stdout, rerun.stderr
    info = json.loads(subprocess.run([CATALENS, "info", "--json", "--index", str(index)], capture_output=True,
                                     text=True, check=True).stdout)
    assert set(info["dims"]) == {"deep", "colour"} and {"deep", "colour", "local"} <= set(info["modes"])
    assert json.loads((index / "catalens.json").read_text())["dims"] == info["dims"]
    assert_consistent(index, {item.id for item in photos[:8]}, "first run killed before its last catalens.json")


# --- a full disk (ENOSPC) on every write path of index and the HTTP writes (issue 35)


def disk_full_after(written: int):
    """A writer that writes ``written`` bytes of what it was given, then finds the disk full."""
    def write(path, data=b"x" * 64) -> None:
        with open(path, "wb") as handle:
            handle.write(bytes(data)[:written] if isinstance(data, (bytes, bytearray)) else b"x" * written)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


def full_disk_at(monkeypatch, where: str) -> None:
    """Make the disk full at one write path: the SQLite commit, a FAISS file, a fitted model's
    file, catalens.json or an upload."""
    from catalens.indexer import estimator
    from catalens.indexer.stores import faiss_vectors
    from catalens.indexer.stores.sqlite_items import SqliteItemStore

    if where == "sqlite":
        transaction = SqliteItemStore._transaction

        @contextlib.contextmanager
        def full(self):
            with transaction(self) as db:
                yield db
                raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(SqliteItemStore, "_transaction", full)
    elif where == "faiss":
        def write_index(index, path):
            disk_full_after(100)(path)
        monkeypatch.setattr(faiss_vectors.faiss, "write_index", write_index)
    elif where == "model":
        monkeypatch.setattr(estimator.np, "savez", lambda handle, **arrays: disk_full_after(0)(handle.name))
    else:
        suffix = {"catalens.json": ".tmp", "upload": ".part"}[where]
        write_text, write_bytes = Path.write_text, Path.write_bytes

        def fail_on(original):
            def write(self, data, *args, **kwargs):
                if self.name.endswith(suffix):
                    disk_full_after(10)(self, data.encode() if isinstance(data, str) else data)
                return original(self, data, *args, **kwargs)
            return write
        monkeypatch.setattr(Path, "write_text", fail_on(write_text))
        monkeypatch.setattr(Path, "write_bytes", fail_on(write_bytes))


def leftovers(folder: Path) -> list[str]:
    """Temporary and partial files under ``folder``, and empty ones (but SQLite's write-ahead log,
    empty after a checkpoint, the day's log and the lock file savers hold)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and (
        path.name.endswith((".tmp", ".part"))
        or (path.stat().st_size == 0 and not path.name.endswith((".log", "-wal", "-shm", ".lock")))))


@pytest.mark.parametrize("where", ["sqlite", "faiss", "model", "catalens.json"])
def test_a_full_disk_while_indexing_is_one_line_leaves_no_partial_file_and_the_rerun_builds_the_whole_index(
        photos, tmp_path, monkeypatch, capsys, where):
    from catalens.api.cli import main

    manifest = write_manifest(photos[:8], tmp_path / "catalog.jsonl")
    queries = [Path(photos[n].image) for n in (0, 7)]
    assert main(["index", str(manifest), "--index", str(tmp_path / "whole"), "--quiet"]) == 0
    expected = index_answers(tmp_path / "whole", queries)
    capsys.readouterr()
    index = tmp_path / "index"
    with monkeypatch.context() as patched:
        full_disk_at(patched, where)
        status = main(["index", str(manifest), "--index", str(index), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "the disk is full" in err and "Traceback" not in err, err
    assert not leftovers(index), leftovers(index)
    assert main(["index", str(manifest), "--index", str(index), "--quiet"]) == 0
    assert index_answers(index, queries) == expected


@pytest.fixture()
def writer(indexed):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    with TestClient(create_app(indexed, api_key=KEY)) as client:
        yield client


def post_photo(client, photo: CatalogItem) -> httpx.Response:
    return client.post("/items", headers={"X-API-Key": KEY}, data={"id": photo.id, "category": photo.category},
                       files={"image": ("p.jpg", Path(photo.image).read_bytes(), "image/jpeg")})


@pytest.mark.parametrize("where", ["sqlite", "upload"])
def test_a_write_refused_for_a_full_disk_is_a_json_507_and_leaves_nothing(writer, indexed, photos, monkeypatch, where):
    uploads_before = set((indexed / "uploads").glob("*")) if (indexed / "uploads").is_dir() else set()
    with monkeypatch.context() as patched:
        full_disk_at(patched, where)
        response = post_photo(writer, photos[0])
    assert response.status_code == 507, response.text
    assert "disk is full" in response.json()["detail"] and "not written" in response.json()["detail"]
    assert writer.get(f"/items/{photos[0].id}").status_code == 404
    assert set((indexed / "uploads").glob("*")) == uploads_before
    assert not leftovers(indexed), leftovers(indexed)
    assert post_photo(writer, photos[0]).status_code == 200  # once there is space again


def test_a_write_committed_before_the_disk_filled_is_answered_as_written_and_found(writer, indexed, photos,
                                                                                    monkeypatch):
    with monkeypatch.context() as patched:
        full_disk_at(patched, "faiss")
        response = post_photo(writer, photos[1])
    assert response.status_code == 200 and response.json()["status"] == "added", response.text
    assert not leftovers(indexed), leftovers(indexed)
    found = writer.post("/search", data={"mode": "deep", "k": "1"},
                        files={"image": ("q.jpg", Path(photos[1].image).read_bytes(), "image/jpeg")})
    assert found.json()["results"][0]["id"] == photos[1].id, found.text


def test_a_delete_refused_for_a_full_disk_is_a_json_507_and_keeps_the_item(writer, indexed, monkeypatch):
    item_id = next(iter(_records(indexed)))
    with monkeypatch.context() as patched:
        full_disk_at(patched, "sqlite")
        response = writer.delete(f"/items/{item_id}", headers={"X-API-Key": KEY})
    assert response.status_code == 507 and "not removed" in response.json()["detail"], response.text
    assert writer.get(f"/items/{item_id}").status_code == 200


# --- a full disk (ENOSPC) in finetune, train-ae and calibrate (issue 35): each durable step


def full_disk_on(monkeypatch, name: str) -> None:
    """Make the disk full for the file whose name holds ``name``, whichever writer saves it (a
    fitted model or the autoencoder's inputs through ``np.savez``, a checkpoint through
    ``torch.save``): 10 bytes are written, then ENOSPC."""
    import numpy as np
    import torch

    savez, save = np.savez, torch.save

    def savez_or_full(file, *args, **kwargs):
        target = str(getattr(file, "name", file))
        if name in Path(target).name:
            disk_full_after(10)(target)
        return savez(file, *args, **kwargs)

    def save_or_full(obj, file, *args, **kwargs):
        if name in Path(str(file)).name:
            disk_full_after(10)(file)
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(np, "savez", savez_or_full)
    monkeypatch.setattr(torch, "save", save_or_full)


def stranded(index: Path) -> list[str]:
    """``leftovers``, and the previous model's second name that a replaced model keeps meanwhile."""
    return leftovers(index) + sorted(str(path.relative_to(index)) for path in index.rglob("*.previous"))


def models_of(index: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (index / "models").glob("*.pt")}


def run_training_with_a_full_disk(index: Path, argv: list[str], where: str, monkeypatch, capsys) -> str:
    """``catalens argv`` with the disk full at ``where``: the one line it printed, after checking
    it exits 2 and leaves no partial file."""
    from catalens.api.cli import main

    capsys.readouterr()
    with monkeypatch.context() as patched:
        if where in ("sqlite", "faiss", "catalens.json"):
            full_disk_at(patched, where)
        else:
            full_disk_on(patched, where)
        status = main([*argv, "--index", str(index)])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and "the disk is full" in err and "Traceback" not in err, err
    assert not stranded(index), stranded(index)
    return err


def assert_as_before(index: Path, before: dict, models: dict[str, bytes], queries: list[Path], rows_committed: bool,
                     context: str) -> None:
    """The index opens and checks clean, and no enabled feature lacks its model. Where the disk
    filled before the new rows were committed, it answers exactly as before, with the previous
    model files; after, the new model and rows are stored together and every earlier mode serves."""
    answers = index_answers(index, queries)
    if rows_committed:
        assert set(before["modes"]) <= set(answers["modes"]) and answers["items"] == before["items"], context
    else:
        assert models_of(index) == models, context
        assert answers == before, context
    assert_consistent(index, set(_records(index)), context)
    meta = json.loads((index / "catalens.json").read_text())
    for feature, model in (("deep_ft", "deep_ft_adapted.pt"), ("ae", "ae_autoencoder.pt")):
        assert feature not in meta["config"]["features"] or (index / "models" / model).is_file(), context


@pytest.fixture()
def kept(monkeypatch):
    """finetune keeps the adapted network whatever it measured (two steps on nine items seldom
    beat the frozen one), so that its model and rows are written."""
    from catalens.indexer.training import adaptation

    monkeypatch.setattr(adaptation, "MIN_GAIN", -2.0)


# (where the disk fills, whether the rows are committed by then, whether an earlier finetune's model is there);
# the refit after a second finetune on the same items finds the calibration fresh and writes nothing.
FINETUNE_POINTS = [(where, committed, again) for where, committed in (
    ("deep_ft_adapted", False), ("sqlite", False), ("faiss", True), ("catalens.json", True))
    for again in (False, True)] + [("match_calibration", True, False)]


@pytest.mark.parametrize(("where", "rows_committed", "again"), FINETUNE_POINTS,
                         ids=[f"{where}-{'again' if again else 'first'}" for where, _, again in FINETUNE_POINTS])
def test_a_full_disk_in_finetune_is_one_line_and_leaves_the_index_and_model_as_before(
        indexed, kept, monkeypatch, capsys, where, rows_committed, again):
    from catalens.api.cli import main

    finetune = ["finetune", "--steps", "2", "--json"]
    if again:  # a model and rows of an earlier finetune are there to keep
        assert main([*finetune, "--index", str(indexed)]) == 0
    queries = [Path(record.image) for record in list(_records(indexed).values())[:2]]
    before, models = index_answers(indexed, queries), models_of(indexed)
    err = run_training_with_a_full_disk(indexed, finetune, where, monkeypatch, capsys)
    if where == "match_calibration":
        assert "catalens calibrate" in err, err
    assert_as_before(indexed, before, models, queries, rows_committed, f"finetune, {where}")
    assert main([*finetune, "--index", str(indexed)]) == 0
    meta = json.loads((indexed / "catalens.json").read_text())
    assert "deep_ft" in meta["config"]["features"] and (indexed / "models" / "deep_ft_adapted.pt").is_file()
    assert_consistent(indexed, set(_records(indexed)), f"finetune after a full disk at {where}")


TRAIN_AE_POINTS = [("ae_training_inputs", False), ("ae_training.ckpt", False), ("ae_autoencoder", False),
                   ("sqlite", False), ("faiss", True), ("catalens.json", True), ("match_calibration", True)]


@pytest.mark.parametrize(("where", "rows_committed"), TRAIN_AE_POINTS, ids=[where for where, _ in TRAIN_AE_POINTS])
def test_a_full_disk_in_train_ae_is_one_line_and_leaves_the_index_and_model_as_before(
        indexed, monkeypatch, capsys, where, rows_committed):
    from catalens.api.cli import main

    queries = [Path(record.image) for record in list(_records(indexed).values())[:2]]
    before, models = index_answers(indexed, queries), models_of(indexed)
    train = ["train-ae", "--epochs", "1", "--quiet"]
    err = run_training_with_a_full_disk(indexed, train, where, monkeypatch, capsys)
    if where == "match_calibration":
        assert "catalens calibrate" in err, err
    assert_as_before(indexed, before, models, queries, rows_committed, f"train-ae, {where}")
    assert main([*train, "--index", str(indexed)]) == 0
    meta = json.loads((indexed / "catalens.json").read_text())
    assert "ae" in meta["config"]["features"] and (indexed / "models" / "ae_autoencoder.pt").is_file()
    assert not (indexed / "models" / "ae_training.ckpt").exists()
    assert_consistent(indexed, set(_records(indexed)), f"train-ae after a full disk at {where}")


@pytest.mark.parametrize("where", ["classifier", "match_calibration"])
def test_a_full_disk_in_calibrate_is_one_line_and_keeps_the_stored_fits(indexed, monkeypatch, capsys, where):
    from catalens.api.cli import main

    if where == "classifier":  # calibrate fits the classifier where it is missing or stale
        (indexed / "models" / "classifier.pt").unlink()
    queries = [Path(record.image) for record in list(_records(indexed).values())[:2]]
    before, models = index_answers(indexed, queries), models_of(indexed)
    run_training_with_a_full_disk(indexed, ["calibrate", "--queries", "10", "--json"], where, monkeypatch, capsys)
    assert_as_before(indexed, before, models, queries, False, f"calibrate, {where}")
    assert main(["calibrate", "--queries", "10", "--json", "--index", str(indexed)]) == 0
    assert not stranded(indexed)
