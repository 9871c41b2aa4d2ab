"""A new user's first contact, second round (issue 37): settings honoured by every command, -k,
locate's top N, folders and CSV, one-line Elasticsearch failures, the command's own usage,
answers that read at a glance, and the Python API (``catalens.open``)."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalens.api.cli import main
from tests.conftest import draw_product, indexed_shop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> tuple[Path, Path]:
    """(catalog folder, index folder): 12 generated photos in 3 categories, indexed and fitted once."""
    return indexed_shop(tmp_path_factory.mktemp("contact"))


def photos(shop) -> list[Path]:
    return sorted(shop[0].rglob("*.jpg"))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


# --- settings from files and variables, and -k


def test_search_k_comes_from_the_config_file_the_variable_and_then_the_option(shop, tmp_path, capsys, monkeypatch):
    config = tmp_path / "shop.toml"
    config.write_text("[search]\nk = 2\n")
    photo = str(photos(shop)[0])
    assert main(["search", photo, "--index", str(shop[1]), "--config", str(config), "--json"]) == 0
    assert len(json_lines(capsys.readouterr().out)[0]["results"]) == 2
    monkeypatch.setenv("CATALENS_SEARCH_K", "3")
    assert main(["search", photo, "--index", str(shop[1]), "--json"]) == 0
    assert len(json_lines(capsys.readouterr().out)[0]["results"]) == 3
    assert main(["search", photo, "--index", str(shop[1]), "-k", "1", "--json"]) == 0
    assert len(json_lines(capsys.readouterr().out)[0]["results"]) == 1


def test_every_command_on_photos_takes_config_and_names_a_bad_one(shop, tmp_path, capsys):
    """search, locate, classify and anomaly read the same [search] table: a misspelt setting in it is
    one line naming the file, exit 2, whichever of them is run."""
    config = tmp_path / "shop.toml"
    config.write_text("[search]\nkk = 3\n")
    photo = str(photos(shop)[0])
    for command in ("search", "locate", "classify", "anomaly"):
        assert main([command, photo, "--index", str(shop[1]), "--config", str(config)]) == 2, command
        assert str(config) in capsys.readouterr().err, command


def test_locate_max_n_gives_the_first_n_of_a_larger_max(shop):
    from catalens.api.service import CatalogService

    service = CatalogService.open(shop[1])
    try:
        photo = photos(shop)[0]
        many = service.locate([photo], max_detections=20)[0].detections
        few = service.locate([photo], max_detections=2)[0].detections
    finally:
        service.close()
    assert [d.id for d in few] == [d.id for d in many[:2]]


# --- folders, CSV, errors said once


def test_a_folder_as_photo_means_every_photo_in_it(shop, capsys):
    folder = shop[0] / "Dairy"
    assert main(["search", str(folder), "--index", str(shop[1]), "-k", "1", "--json"]) == 0
    answered = {line["query"] for line in json_lines(capsys.readouterr().out)}
    assert answered == {str(path) for path in folder.rglob("*.jpg")}


def test_format_csv_gives_a_header_and_a_row_per_result_and_per_failed_photo(shop, tmp_path, capsys):
    photo = str(photos(shop)[0])
    missing = str(tmp_path / "missing.jpg")
    assert main(["search", photo, missing, "--index", str(shop[1]), "-k", "2", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["query"] for row in rows] == [photo, photo, missing]
    assert rows[0]["rank"] == "1" and rows[0]["id"] and float(rows[0]["score"]) > 0 and rows[0]["confidence"]
    assert rows[2]["error"] == "file not found"
    assert main(["classify", photo, "--index", str(shop[1]), "--format", "csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["guess"].startswith(row["category"].split("/")[0]) or row["category"] == "unknown"


# --- failures: one line, the right usage


@pytest.mark.parametrize("command", [["search", "photo.jpg"], ["info"], ["classify", "photo.jpg"],
                                     ["index", "CATALOG"]])
def test_unreachable_elasticsearch_is_one_line_and_exit_2(command, shop, tmp_path):
    argv = [str(shop[0]) if arg == "CATALOG" else str(photos(shop)[0]) if arg == "photo.jpg" else arg for arg in command]
    done = subprocess.run([sys.executable, "-m", "catalens", *argv, "--es-url", f"http://localhost:{closed_port()}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Elasticsearch" in lines[0] and "cannot be reached" in lines[0]


def test_an_unknown_option_shows_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["search", "photo.jpg", "--index", "x", "--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: catalens search" in err and "unrecognized arguments: --bogus" in err


def test_index_naming_a_catalog_folder_says_it_is_a_catalog(shop, capsys):
    assert main(["search", str(photos(shop)[0]), "--index", str(shop[0])]) == 2
    err = capsys.readouterr().err
    assert "is a catalog" in err and "catalens index" in err


def test_version_and_python_m_catalens():
    import catalens

    assert catalens.__version__ and catalens.__version__ != "0+unknown"
    for argv in (["-m", "catalens", "--version"], ["-m", "catalens.api.cli", "--version"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == f"catalens {catalens.__version__}", done


# --- answers at a glance


def test_classify_leads_with_its_best_guess_and_keeps_its_json_contract(shop, capsys):
    photo = str(photos(shop)[0])
    assert main(["classify", photo, "--index", str(shop[1])]) == 0
    head = capsys.readouterr().out.strip().splitlines()[0]
    assert "best guess" in head or "sure at every level" in head, head
    assert main(["classify", photo, "--index", str(shop[1]), "--json"]) == 0
    (answer,) = json_lines(capsys.readouterr().out)
    assert {"query", "category", "levels", "neighbours"} <= set(answer)
    assert answer["guess"] == "/".join(level["name"] for level in answer["levels"])
    assert answer["sure_depth"] == (0 if answer["category"] == "unknown" else answer["category"].count("/") + 1)


def test_info_lists_each_modes_match_threshold(shop, capsys):
    assert main(["info", "--index", str(shop[1])]) == 0
    out = capsys.readouterr().out
    assert "match threshold, fused" in out


def test_search_verdict_names_the_confidence_and_the_threshold(shop, capsys):
    assert main(["search", str(photos(shop)[0]), "--index", str(shop[1]), "-k", "1"]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[0]
    assert "threshold" in verdict or "cannot judge" in verdict, verdict


# --- the Python API


def test_python_api_answers_a_path_bytes_a_pil_image_and_an_array_alike(shop):
    import catalens

    path = photos(shop)[0]
    with catalens.open(shop[1]) as index:
        answers = [index.search(photo, k=3) for photo in
                   (path, str(path), path.read_bytes(), Image.open(path), np.asarray(Image.open(path)),
                    np.asarray(Image.open(path), dtype=np.float32) / 255)]
        tops = [answer.results[0] for answer in answers]
        assert len({top.id for top in tops}) == 1
        assert tops[0].id == str(path.relative_to(shop[0]))
        assert {top.category for top in tops} == {path.parent.relative_to(shop[0]).as_posix()}
        assert all(isinstance(top.score, float) and top.confidence is not None for top in tops)
        assert answers[0].match in (None, tops[0].id)
        assert index.search(path, k=2, mode="deep", category="Dairy").results[0].category.startswith("Dairy")
        assert index.classify(path).guess
        assert index.locate(path, max=2).detections is not None
        assert "modes" in index.info()


def test_python_api_raises_for_one_unreadable_photo_and_keeps_errors_in_a_list(shop, tmp_path):
    import catalens

    with catalens.open(shop[1]) as index:
        with pytest.raises(catalens.PhotoError, match="file not found") as raised:
            index.search(tmp_path / "missing.jpg")
        assert str(raised.value).count("missing.jpg") == 1
        good, bad = index.search([photos(shop)[0], tmp_path / "missing.jpg"], k=1)
        assert good.results and bad.error.endswith("file not found")


def test_python_api_adds_and_removes_items(shop, tmp_path):
    import shutil

    import catalens

    copy = Path(shutil.copytree(shop[1], tmp_path / "index"))
    new = draw_product(tmp_path / "new.jpg", seed=99, text="new one")
    with catalens.open(copy) as index:
        index.add(Image.open(new), id="sku-new", category="Fruit/Apple", title="New apple", refit=False)
        assert index.search(new, k=1, mode="deep").results[0].id == "sku-new"
        assert index.remove("sku-new", "never-there", refit=False) == ["never-there"]
        assert index.search(new, k=1, mode="deep").results[0].id != "sku-new"


def test_python_api_opens_an_elasticsearch_url_as_the_command_line_does(monkeypatch):
    from catalens.index import _location

    monkeypatch.delenv("CATALENS_ES_INDEX", raising=False)
    assert _location("http://localhost:9200") == "es+http://localhost:9200/catalens"
    assert _location("http://localhost:9200/shop") == "es+http://localhost:9200/shop"
    assert _location("shop-index") == "shop-index"


# --- the server's settings are each request's defaults (found on a fresh-clone tour)


def _search_without_k(app, photo: Path) -> dict:
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        response = client.post("/search", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()


def test_http_search_without_k_gives_the_servers_k(shop, monkeypatch):
    from catalens.api.http.app import create_app
    from catalens.search.settings import load_search_settings

    photo = photos(shop)[0]
    monkeypatch.setenv("CATALENS_SEARCH_K", "2")
    body = _search_without_k(create_app(shop[1], read_only=True, settings=load_search_settings()), photo)
    assert body["k"] == 2 and len(body["results"]) == 2, body
    body = _search_without_k(create_app(shop[1], read_only=True, settings=load_search_settings(k=500)), photo)
    assert body["k"] == 100 and len(body["results"]) == 12  # the server's 500, within MAX_K = 100: all 12 items


def test_serve_reads_its_search_settings_from_config(shop, tmp_path, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.setdefault("app", app))
    config = tmp_path / "shop.toml"
    config.write_text('[search]\nk = 3\nmode = "deep"\n')
    assert main(["serve", "--index", str(shop[1]), "--read-only", "--config", str(config)]) == 0
    body = _search_without_k(served["app"], photos(shop)[0])
    assert body["k"] == 3 and body["mode"] == "deep" and len(body["results"]) == 3, body
    config.write_text("[search]\nkk = 3\n")
    assert main(["serve", "--index", str(shop[1]), "--read-only", "--config", str(config)]) == 2


# --- what commands print when there is little to say (found on a fresh-clone tour)


class _FakeService:
    """Stands in for the index's service where only what a command prints is under test."""

    def __init__(self, **answers):
        self.answers = answers

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.answers[name]

    def close(self) -> None:
        pass


def test_calibrate_speaks_of_one_mode_it_cannot_judge_in_the_singular(monkeypatch, capsys):
    from types import SimpleNamespace

    from catalens.api.cli import training

    rows = [{"mode": "fused", "queries": 120, "threshold": 0.82, "precision": 0.95, "coverage": 0.5},
            {"mode": "ae", "queries": 120, "threshold": 1.0, "precision": 0.0, "coverage": 0.0}]
    model = SimpleNamespace(summary=lambda: rows, max_stale=0.2)
    monkeypatch.setattr(training, "open_service", lambda args: _FakeService(calibrate=model))
    assert main(["calibrate", "--index", "unused"]) == 0
    out = capsys.readouterr().out
    assert "ae: no threshold was right 95% of the time" in out
    assert "this mode never calls a result a confident match (its confidences" in out, out
    rows.append({"mode": "colour", "queries": 120, "threshold": 1.0, "precision": 0.0, "coverage": 0.0})
    assert main(["calibrate", "--index", "unused"]) == 0
    assert "these modes never call a result a confident match (their confidences" in capsys.readouterr().out


def test_audit_without_findings_says_so_instead_of_an_empty_table(monkeypatch, capsys):
    from types import SimpleNamespace

    from catalens.api.cli import audit

    report = SimpleNamespace(findings=[], items=59, seconds=2.8, dismissed=0)
    monkeypatch.setattr(audit, "open_service", lambda args: _FakeService(catalog_audit=report))
    assert main(["audit", "--index", "unused", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no findings\n") and "problem" not in out, out
    assert "0 findings in 59 items" in out
