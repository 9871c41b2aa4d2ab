"""One index, many processes: a running server sees what the CLI adds and removes, in every
mode; a read-only server writes nothing into the index (issue 35)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catalens.datasets.catalog import CatalogItem, write_manifest
from tests.conftest import draw_product

CATALENS = str(Path(sys.executable).parent / "catalens")
KEY = "shared-index-key-0123"


@pytest.fixture()
def index(synthetic_index, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic_index[0], tmp_path / "index"))


@pytest.fixture()
def server(index, monkeypatch):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app
    from catalens.indexer.stores import folder
    from catalens.search.settings import SearchSettings

    monkeypatch.setattr(folder, "CATCH_UP_SECONDS", 0.0)  # the test does not wait out the second
    app = create_app(index, api_key=KEY, settings=SearchSettings(confidence=False))
    with TestClient(app) as client:
        yield client


def search(client, image: Path, mode: str, k: int = 5) -> list[str]:
    response = client.post("/search", data={"mode": mode, "k": str(k)},
                           files={"image": ("q.jpg", image.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


def catalens(*argv: str) -> None:
    done = subprocess.run([CATALENS, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_running_server_sees_what_the_cli_adds_and_removes_in_every_mode(server, index, tmp_path):
    modes = server.get("/stats").json()["modes"]
    assert {"fused", "local", "deep", "colour"} <= set(modes)
    new = [CatalogItem(id=f"new{n}", image=draw_product(tmp_path / f"new{n}.jpg", seed=500 + n, size=200),
                       category="Fruit/Kiwi") for n in range(3)]
    catalens("index", str(write_manifest(new, tmp_path / "new.jsonl")), "--index", str(index), "--keep-missing",
             "--quiet")
    assert server.get("/stats").json()["items"] == 12
    for item in new:
        for mode in modes:
            assert search(server, Path(item.image), mode)[0] == item.id, (item.id, mode)

    catalens("remove", "new0", "new1", "new2", "--index", str(index))
    assert server.get("/stats").json()["items"] == 9
    for mode in modes:
        found = search(server, Path(new[0].image), mode, k=12)
        assert not {"new0", "new1", "new2"} & set(found), (mode, found)
        if mode in ("deep", "colour"):
            assert len(found) == 9, (mode, found)
    assert server.get("/items/new0").status_code == 404


def test_a_server_writing_after_the_cli_keeps_the_cli_items_in_its_saved_files(server, index, tmp_path):
    """The server's save comes after the CLI's commit: its FAISS files must hold the CLI's items
    too, not be stamped with a generation they do not hold."""
    from catalens.indexer.stores.backends import open_catalog

    added = CatalogItem(id="cli", image=draw_product(tmp_path / "cli.jpg", seed=700, size=200), category="Fruit/Fig")
    catalens("index", str(write_manifest([added], tmp_path / "cli.jsonl")), "--index", str(index), "--keep-missing",
             "--quiet")
    photo = draw_product(tmp_path / "http.jpg", seed=701, size=200)
    response = server.post("/items", headers={"X-API-Key": KEY}, data={"id": "http", "category": "Fruit/Fig"},
                           files={"image": ("p.jpg", photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    catalog = open_catalog(index)
    try:
        for feature in catalog.dims():
            assert catalog.load_vectors(feature) is None, feature  # the saved file loads and is current
            assert catalog.vectors(feature).ntotal == catalog.items.count() == 11
    finally:
        catalog.close()


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def ask_everything(client, photo: Path) -> None:
    """What a read-only server is asked: stats, an item, searches in every mode (with calibrated
    confidences, which it fits where none is stored), classification."""
    stats = client.get("/stats").json()
    assert stats["read_only"] and stats["items"] == 9
    for mode in stats["modes"]:
        assert search(client, photo, mode), mode
    assert client.post("/classify", files={"image": ("q.jpg", photo.read_bytes(), "image/jpeg")}).status_code == 200
    item = next(iter(stats["top_categories"]))
    assert client.get("/items/nothing-here").status_code == 404, item


@pytest.fixture()
def unfitted(index) -> Path:
    """The index without its stored fits: a server wants to fit and store them."""
    for name in ("match_calibration.pt", "classifier.pt"):
        (index / "models" / name).unlink(missing_ok=True)
    return index


def test_a_read_only_server_writes_nothing_into_its_index(unfitted, synthetic_index):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    before = files_of(unfitted)
    with TestClient(create_app(unfitted, read_only=True)) as client:
        ask_everything(client, next(synthetic_index[1].rglob("*.jpg")))
        assert files_of(unfitted) == before
    after = files_of(unfitted)
    assert after == before, sorted(set(after) ^ set(before))
    assert not any(name.endswith(("-wal", "-shm", ".pt.tmp")) for name in after)


@pytest.fixture()
def read_only_mount(unfitted, tmp_path):
    """``unfitted``, seen through a read-only bind mount (skipped where this process cannot mount)."""
    mounted = tmp_path / "read-only"
    mounted.mkdir()
    done = subprocess.run(["mount", "--bind", str(unfitted), str(mounted)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({done.stderr.decode().strip()})")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mounted)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield mounted
    finally:
        subprocess.run(["umount", str(mounted)], capture_output=True)


def test_a_read_only_server_starts_and_answers_from_a_read_only_filesystem(read_only_mount, synthetic_index):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    with pytest.raises(OSError):
        (read_only_mount / "probe").write_text("")  # the mount is read-only, even for root
    with TestClient(create_app(read_only_mount, read_only=True)) as client:
        ask_everything(client, next(synthetic_index[1].rglob("*.jpg")))
    assert subprocess.run([CATALENS, "info", "--index", str(read_only_mount)], capture_output=True).returncode == 0
    done = subprocess.run([CATALENS, "remove", "Dairy/Milk/item0.jpg", "--index", str(read_only_mount)], capture_output=True, text=True)
    assert done.returncode == 2 and "read-only" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_server_saving_after_a_cli_finetune_keeps_that_finetune_on_record(index, monkeypatch):
    """The record of the last finetune (which network made the deep_ft rows; the match calibration
    digests it) belongs to the process that finetuned: a server that saves afterwards must take it
    in, not write its own older record back."""
    from catalens.indexer.stores import folder
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.calibration import features_read

    monkeypatch.setattr(folder, "CATCH_UP_SECONDS", 0.0)
    cli = open_catalog(index)
    cli.meta["adaptation"] = {"steps": 200, "kept": True}
    cli.save()
    server = open_catalog(index)
    try:
        cli.meta["adaptation"] = {"steps": 600, "kept": True}  # finetune again, from the CLI
        cli.save()
        assert server.catch_up(force=True)
        assert server.meta["adaptation"] == {"steps": 600, "kept": True}
        assert features_read(server) == features_read(cli)
        server.save()  # a write of its own (POST /items) saves catalens.json
        cli.meta["adaptation"] = {"steps": 300, "kept": True}  # and once more
        cli.save()
        server.catch_up(force=True)
        assert server.meta["adaptation"]["steps"] == 300
    finally:
        server.close()
        cli.close()
    reader = open_catalog(index, read_only=True)
    try:
        assert reader.meta["adaptation"] == {"steps": 300, "kept": True}
    finally:
        reader.close()


def test_a_configuration_changed_elsewhere_is_taken_in_unless_this_process_changed_its_own(index, monkeypatch):
    """catalens.json's configuration is the file's (another process's ``--faiss-factory``), except
    where this process changed its own since it last read the file: then its own stands and is saved."""
    from catalens.indexer.stores import folder
    from catalens.indexer.stores.backends import open_catalog

    monkeypatch.setattr(folder, "CATCH_UP_SECONDS", 0.0)
    cli, server = open_catalog(index), open_catalog(index)
    try:
        cli.config = cli.config.model_copy(update={"faiss_factory": "HNSW32"})
        cli.save()
        assert server.catch_up(force=True)
        assert server.config.faiss_factory == "HNSW32"  # taken in: the server had not changed its own
        server.config = server.config.model_copy(update={"faiss_factory": "Flat"})
        cli.meta["updated_by"] = "cli"  # the file changes again, its configuration does not
        cli.save()
        assert server.catch_up(force=True)
        assert server.config.faiss_factory == "Flat"  # the server's own change stands
        server.save()
    finally:
        server.close()
        cli.close()
    reader = open_catalog(index, read_only=True)
    try:
        assert reader.config.faiss_factory == "Flat"
    finally:
        reader.close()
