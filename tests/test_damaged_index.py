"""A damaged index says so in one line, naming the file and what to do; what SQLite can rebuild is
rebuilt; an empty or foreign items.sqlite is never taken for an empty catalog (issue 16)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from catalens.api.cli import main


@pytest.fixture(scope="module")
def built_index(synthetic_index) -> tuple[Path, Path]:
    return synthetic_index


@pytest.fixture()
def index(built_index, tmp_path) -> Path:
    """A fresh copy of the built index, to damage."""
    return Path(shutil.copytree(built_index[0], tmp_path / "index"))


def query(built_index) -> str:
    return str(next(built_index[1].rglob("*.jpg")))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    (lambda p: truncate(p, 0.5), "cut short"),
    (lambda p: p.write_bytes(b"garbage!" * 4 + p.read_bytes()[32:]), "not an SQLite database"),
])
def test_a_damaged_item_store_is_one_line_naming_it_on_every_command(index, built_index, capsys, damage, reason):
    damage(index / "items.sqlite")
    for argv in (["search", query(built_index)], ["info"], ["classify", query(built_index)], ["remove", "x"],
                 ["index", str(built_index[1]), "--quiet"]):
        status, out, err = run_cli(capsys, *argv, "--index", str(index))
        assert status == 2, (argv, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "items.sqlite" in lines[0] and reason in lines[0], (argv, err)
        assert "records 9 items" in lines[0] and "Traceback" not in err
    assert (index / "items.sqlite").stat().st_size < 400_000  # never recreated as an empty store


def test_a_foreign_sqlite_file_is_not_taken_for_an_empty_catalog(index, built_index, capsys):
    (index / "items.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (index / f"items.sqlite{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(index / "items.sqlite") as db:
        db.execute("CREATE TABLE photos (name TEXT)")
    status, _, err = run_cli(capsys, "search", query(built_index), "--index", str(index))
    assert status == 2 and "not a catalens item store" in err and "photos" in err


@pytest.mark.parametrize("content", ["[]", "{not json", '{"config": []}'])
def test_damaged_metadata_is_one_line(index, capsys, content):
    (index / "catalens.json").write_text(content)
    status, _, err = run_cli(capsys, "info", "--index", str(index))
    assert status == 2 and len(err.strip().splitlines()) == 1 and "catalens.json" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage", "stale copy", "delete"])
def test_a_faiss_file_that_does_not_load_or_match_is_rebuilt_from_sqlite(index, built_index, capsys, damage):
    deep = index / "deep.faiss"
    if damage == "truncate":
        truncate(deep, 0.5)
    elif damage == "garbage":
        deep.write_bytes(b"not a faiss index at all")
    elif damage == "stale copy":  # the colour index has the same count but other dims: it must not load as deep
        shutil.copy(index / "colour.faiss", deep)
    else:
        deep.unlink()
    status, out, err = run_cli(capsys, "search", query(built_index), "--index", str(index), "--mode", "deep", "--json")
    assert status == 0, err
    assert json.loads(out.splitlines()[0])["results"][0]["id"].endswith(Path(query(built_index)).name)
    if damage != "delete":
        assert "deep.faiss" in err and "rebuilt" in err and "catalens check" in err
    status, out, _ = run_cli(capsys, "check", "--index", str(index))
    assert status == 0 and "repaired" in out
    status, out, _ = run_cli(capsys, "check", "--index", str(index))
    assert status == 0 and "repaired" not in out and "damaged" not in out


def test_check_fits_a_damaged_vocabulary_again_and_names_what_it_cannot_repair(index, capsys):
    truncate(index / "models" / "sift_vocabulary.pt", 0.1)
    status, out, _ = run_cli(capsys, "check", "--index", str(index))
    assert status == 0 and "sift_vocabulary.pt" in out and "repaired" in out
    truncate(index / "items.sqlite", 0.5)
    status, out, _ = run_cli(capsys, "check", "--index", str(index))
    assert status == 1 and "items.sqlite" in out and "damaged" in out


def test_check_without_repair_reports_and_changes_nothing(index, capsys):
    vocabulary = index / "models" / "sift_vocabulary.pt"
    truncate(vocabulary, 0.1)
    damaged = vocabulary.read_bytes()
    status, out, _ = run_cli(capsys, "check", "--index", str(index), "--no-repair")
    assert status == 1 and "sift_vocabulary.pt" in out and "not repaired" in out
    assert vocabulary.read_bytes() == damaged


def test_check_without_repair_says_what_it_would_rebuild_and_not_beyond_repair(index, capsys):
    truncate(index / "models" / "sift_vocabulary.pt", 0.1)
    (index / "deep.faiss").unlink()
    status, out, _ = run_cli(capsys, "check", "--index", str(index), "--no-repair")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("models/", "deep.faiss"))}
    assert all("rebuildable" in row for row in rows.values()) and len(rows) == 2, out
    assert status == 1 and "beyond what can be rebuilt" not in out and "all of it can be rebuilt" in out


def test_a_truncated_fitted_model_names_the_file(index, built_index, capsys):
    from catalens.indexer.features.autoencoder import MODEL_FILE

    models = index / "models"
    (models / MODEL_FILE).write_bytes((models / "sift_vocabulary.pt").read_bytes()[:500])
    config = json.loads((index / "catalens.json").read_text())
    config["config"]["features"].append("ae")
    (index / "catalens.json").write_text(json.dumps(config))
    status, _, err = run_cli(capsys, "index", str(built_index[1]), "--index", str(index), "--quiet")
    assert status == 2 and MODEL_FILE in err and len(err.strip().splitlines()) == 1
    status, out, _ = run_cli(capsys, "check", "--index", str(index))
    assert status == 1 and MODEL_FILE in out and "train-ae" in out
