"""What a new user meets first (issue 15): the README's commands as written, one-line errors
instead of tracebacks, outcomes that say what happened, exit codes, streaming answers, help
text, and an HTTP API that documents itself offline and shows no server paths."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catalens.api.cli import build_parser, main
from catalens.indexer.config import ConfigError, IndexConfig, settle
from catalens.indexer.pipeline import IndexReport, index_catalog
from tests.conftest import draw_product, indexed_shop

ROOT = Path(__file__).resolve().parents[1]
KEY = "first-ten-minutes-key"


def catalens(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``catalens ARGV`` in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "catalens.api.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> tuple[Path, Path]:
    """(catalog folder, index folder): 12 generated photos in 3 categories, indexed once."""
    return indexed_shop(tmp_path_factory.mktemp("shop"))


@pytest.fixture()
def shop_copy(shop, tmp_path) -> Path:
    """A copy of the shop's index that a test may change."""
    return Path(shutil.copytree(shop[1], tmp_path / "index"))


# --- 1. the README's main command, as written: relative --workdir from the repo root


def test_demo_runs_as_the_readme_says_with_a_relative_workdir(tmp_path):
    workdir = os.path.relpath(tmp_path / "demo-index", ROOT)
    assert not Path(workdir).is_absolute()
    done = catalens("demo", "--workdir", workdir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "indexed 24 new, 0 unchanged, 0 failed" in done.stdout
    assert "top result is the photographed item" in done.stdout
    # The same table as 'catalens search' prints (issue 37): the confidence column beside the score.
    assert re.search(r"^#\s+id\s+score\s+confidence\s+category\s+title$", done.stdout, re.MULTILINE), done.stdout


def test_ci_runs_both_readme_commands_main_job_first():
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert "make demo" in readme and "make test" in readme
    assert ci.index("make demo") < ci.index("make test")


# --- 2. the docs' serve page (moved from the README, issue 37): the key, read-only, the header, the endpoints, curl


def test_docs_say_how_to_serve_and_call_the_api():
    page = (ROOT / "docs/http-api.md").read_text()
    for needed in ("CATALENS_API_KEY", "--read-only", "X-API-Key", "/docs", "/redoc", "/stats", "/health"):
        assert needed in page, needed
    assert "docs/http-api.md" in (ROOT / "README.md").read_text()
    curls = [line for line in page.splitlines() if line.lstrip().startswith("curl")]
    joined = "\n".join(curls)
    for endpoint in ("/search", "/classify", "/anomaly", "/items"):
        assert endpoint in joined, endpoint
    assert any("-X DELETE" in line and "X-API-Key" in line for line in curls)
    assert any("/items" in line and "X-API-Key" in line and "-F image=@" in line for line in curls)


def test_readme_and_the_commands_page_show_every_command():
    commands = build_parser()._subparsers._group_actions[0].choices
    for page in ("README.md", "docs/commands.md"):
        text = (ROOT / page).read_text()
        for name in commands:
            assert f"catalens {name}" in text, (page, name)


# --- 3. /docs and /redoc served by the app itself (the browser test renders them offline)


@pytest.fixture(scope="module")
def client(shop, tmp_path_factory):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    index = Path(shutil.copytree(shop[1], tmp_path_factory.mktemp("served") / "index"))
    with TestClient(create_app(index, api_key=KEY)) as client:
        client.index = index
        yield client


def test_api_docs_load_their_assets_from_this_server(client):
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        html = client.get(page).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(source.startswith("/") for source in sources), (page, sources)
        for asset in assets:
            url = next(source for source in sources if source.endswith(asset))
            response = client.get(url)
            assert response.status_code == 200 and len(response.content) > 10_000, (page, url)


# --- 4. one line, not a traceback, and no half-made index


@pytest.mark.parametrize("case", ["config typo", "bad variable", "missing config", "unknown table"])
def test_configuration_errors_are_one_line_naming_the_field_and_the_source(case, shop, tmp_path):
    catalog = str(shop[0])
    (tmp_path / "typo.toml").write_text('[index]\nfaiss_facotry = "IVF64,Flat"\n')
    (tmp_path / "tables.toml").write_text('[indx]\nbatch_size = 8\n')
    argv, env, expected = {
        "config typo": (["--config", "typo.toml"], {}, "typo.toml [index]: faiss_facotry: unknown setting (did you mean faiss_factory?)"),
        "bad variable": ([], {"CATALENS_BATCH_SIZE": "abc"}, "CATALENS_BATCH_SIZE: batch_size: Input should be a valid integer"),
        "missing config": (["--config", "nope.toml"], {}, "nope.toml: configuration file not found"),
        "unknown table": (["--config", "tables.toml"], {}, "tables.toml: unknown table [indx]; the tables are [index] and [search]"),
    }[case]
    done = catalens("index", catalog, "--index", "made", *argv, cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert expected in one_line(done)
    assert not (tmp_path / "made").exists()


def test_search_settings_errors_name_the_variable(shop, tmp_path):
    done = catalens("search", str(next(shop[0].rglob("*.jpg"))), "--index", str(shop[1]), env={"CATALENS_SEARCH_K": "0"})
    assert done.returncode == 2 and "CATALENS_SEARCH_K: k: Input should be greater than or equal to 1" in one_line(done)


def test_variables_are_read_by_pydantic_settings_lists_and_tables_included(monkeypatch):
    from catalens.indexer.config import load_config
    from catalens.search.settings import load_search_settings

    monkeypatch.setenv("CATALENS_FEATURES", "deep, colour")
    monkeypatch.setenv("CATALENS_FEATURE_OPTIONS", '{"sift": {"max_keypoints": 300}}')
    monkeypatch.setenv("CATALENS_SEARCH_WEIGHTS", '{"deep": 1, "sift": 0.5}')
    config, settings = load_config(batch_size=4), load_search_settings()
    assert config.features == ["deep", "colour"] and config.batch_size == 4
    assert config.feature_options == {"sift": {"max_keypoints": 300}}
    assert settings.weights == {"deep": 1.0, "sift": 0.5}
    monkeypatch.setenv("CATALENS_FEATURES", '["deep"]')
    assert load_config().features == ["deep"]
    monkeypatch.setenv("CATALENS_SEARCH_WEIGHTS", "{deep: 1")
    with pytest.raises(ValueError, match="CATALENS_SEARCH_WEIGHTS: weights: Input should be a valid dictionary"):
        load_search_settings()


def test_the_older_feature_switches_still_drop_their_features(monkeypatch, tmp_path):
    # Scripts (and the speed issue) index deep features only with these; ignored, they indexed all.
    from catalens.indexer.config import ConfigError, load_config

    monkeypatch.setenv("CATALENS_LOCAL_FEATURES", "false")
    assert load_config().features == ["deep", "colour"]
    monkeypatch.setenv("CATALENS_COLOUR_FEATURES", "False")
    config = load_config()
    assert config.features == ["deep"] and "features" in config.model_fields_set and "sift" not in config.feature_options
    assert load_config(features=["deep", "sift"]).features == ["deep", "sift"]  # an argument wins
    monkeypatch.setenv("CATALENS_COLOUR_FEATURES", "true")
    assert load_config().features == ["deep", "colour"]
    monkeypatch.setenv("CATALENS_LOCAL_FEATURES", "nope")
    with pytest.raises(ConfigError, match="CATALENS_LOCAL_FEATURES='nope': expected true or false"):
        load_config()


def test_search_in_a_mode_not_built_yet_is_one_line(shop):
    done = catalens("search", str(next(shop[0].rglob("*.jpg"))), "--index", str(shop[1]), "--mode", "ae")
    assert done.returncode == 2
    assert "--mode ae: this index has no 'ae' feature yet (run 'catalens train-ae' first)" in one_line(done)


def test_an_unknown_backbone_is_one_line_and_makes_no_index(shop, tmp_path):
    done = catalens("index", str(shop[0]), "--index", "made", "--backbone", "resnet9000", cwd=tmp_path)
    assert done.returncode == 2 and "unknown backbone 'resnet9000'; available:" in one_line(done)
    assert not (tmp_path / "made").exists()


def test_a_backbone_without_weights_here_is_one_line_and_makes_no_index(shop, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    env = {"CATALENS_WEIGHTS_DIR": str(empty), "TORCH_HOME": str(empty)}
    done = catalens("index", str(shop[0]), "--index", "made", "--backbone", "resnet50", cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert "no pretrained weights for resnet50 on this machine: put resnet50-" in one_line(done)
    assert not (tmp_path / "made").exists()


def test_backbone_weights_are_located_without_building_the_network(tmp_path, monkeypatch):
    import torch

    from catalens.indexer.backbones import WeightsNotFoundError, check_backbone

    monkeypatch.setenv("CATALENS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert check_backbone("efficientnet_lite0").locate_weights().is_file()  # ships with pip
    with pytest.raises(WeightsNotFoundError, match="no pretrained weights for alexnet_fc7"):
        check_backbone("alexnet_fc7")
    (tmp_path / "alexnet-owt-7be5be79.pth").write_bytes(b"not loaded, only found")
    assert check_backbone("alexnet_fc7").locate_weights() == tmp_path / "alexnet-owt-7be5be79.pth"


# --- 5. settings on an existing index: refused, or applied and said


def test_only_explicit_settings_count_on_an_existing_index():
    stored = IndexConfig(backbone="resnet50", faiss_factory="HNSW32", features=["deep", "colour", "ae"])
    assert settle(stored, IndexConfig(), fitted={"ae"}) == (stored, [])  # defaults were not asked for


def test_settings_an_index_depends_on_are_refused_in_one_sentence():
    stored = IndexConfig(features=["deep", "colour", "sift", "ae"])
    with pytest.raises(ConfigError, match=r"an existing index cannot change backbone \(it has 'efficientnet_lite0', "
                                          r"not 'resnet50'\); input_scaling"):
        settle(stored, IndexConfig(backbone="resnet50", input_scaling="imagenet"), fitted={"ae"})
    with pytest.raises(ConfigError, match="features .*drops"):
        settle(stored, IndexConfig(features=["deep"]), fitted={"ae"})
    with pytest.raises(ConfigError, match="the options of sift"):
        settle(stored, IndexConfig(feature_options={"sift": {"max_keypoints": 10}}))
    # Listing the configured features without the fitted ones drops nothing.
    assert settle(stored, IndexConfig(features=["deep", "colour", "sift"]), fitted={"ae"})[1] == []


def test_settings_that_can_change_are_applied_and_said():
    settled, notes = settle(IndexConfig(), IndexConfig(faiss_factory="HNSW32", batch_size=4, features=[
        "deep", "colour", "sift", "style"]))
    assert (settled.faiss_factory, settled.batch_size, settled.features[-1]) == ("HNSW32", 4, "style")
    assert any("FAISS files are rebuilt" in note for note in notes)
    assert any(note.startswith("batch_size 4 replaces 16") for note in notes)
    assert any(note.startswith("features: style added") for note in notes)


def test_a_new_faiss_factory_on_an_existing_index_is_said_and_built(shop, shop_copy, tmp_path, capsys):
    (tmp_path / "hnsw.toml").write_text('[index]\nfaiss_factory = "HNSW32"\n')
    assert main(["index", str(shop[0]), "--index", str(shop_copy), "--config", str(tmp_path / "hnsw.toml"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "configuration: faiss_factory 'HNSW32' replaces 'Flat': the FAISS files are rebuilt" in out
    assert main(["info", "--index", str(shop_copy), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["faiss_factory"] == "HNSW32" and "faiss_configured" not in info
    assert main(["index", str(shop[0]), "--index", str(shop_copy), "--backbone", "efficientnet_lite1", "--quiet"]) == 2
    assert "an existing index cannot change backbone" in capsys.readouterr().err


def test_info_reports_the_faiss_index_really_built(shop, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CATALENS_FAISS_FACTORY", "IVF4096,PQ32")
    monkeypatch.setenv("CATALENS_FEATURES", "colour")
    assert main(["index", str(shop[0]), "--index", str(tmp_path / "index"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", "--index", str(tmp_path / "index"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["faiss_factory"], info["faiss_configured"]) == ("Flat", "IVF4096,PQ32")
    assert main(["info", "--index", str(tmp_path / "index")]) == 0
    table = capsys.readouterr().out
    assert re.search(r"faiss_factory\s+Flat\n", table) and "IVF4096,PQ32 needs 163840 items to train" in table
    assert re.search(r"created\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", table)


def test_an_ivf_index_is_trained_once_the_catalog_is_large_enough(tmp_path):
    from catalens.indexer.stores.backends import open_catalog

    for number in range(48):
        draw_product(tmp_path / "catalog" / "Shelf" / f"p{number:02d}.jpg", seed=100 + number, size=64)
    config = IndexConfig(features=["colour"], faiss_factory="IVF1,Flat", commit_every=16, num_workers=0)
    index_catalog(tmp_path / "catalog", tmp_path / "index", config, progress=False)  # first commit: 16 rows, exact
    catalog = open_catalog(tmp_path / "index")
    try:
        assert catalog.info()["faiss_factory"] == "IVF1,Flat"
        assert catalog.vectors("colour").factory == "IVF1,Flat" and catalog.vectors("colour").ntotal == 48
    finally:
        catalog.close()


def test_an_unknown_category_is_a_usage_error_naming_close_ones(shop):
    done = catalens("search", str(next(shop[0].rglob("*.jpg"))), "--index", str(shop[1]), "--category", "Fruit/Nope")
    assert done.returncode == 2 and done.stdout == ""
    assert "category 'Fruit/Nope' is not in this index; did you mean Fruit/Apple or Fruit?" in one_line(done)


def test_explain_says_where_it_wrote(shop, tmp_path, capsys):
    query = shop[0] / "Fruit/Apple/item02.jpg"
    assert main(["search", str(query), "--index", str(shop[1]), "--k", "2", "--explain", str(tmp_path / "why")]) == 0
    out = capsys.readouterr().out
    assert f"explanations of {query}: " in out and f"image(s) in {tmp_path / 'why'}" in out
    assert main(["search", str(query), "--index", str(shop[1]), "--k", "1", "--json", "--explain", str(tmp_path / "w2")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"][0]["id"] == "Fruit/Apple/item02.jpg"  # stdout stays JSON
    assert f"in {tmp_path / 'w2'}" in captured.err


def test_serve_prints_its_url(shop, monkeypatch, capsys):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(options))
    monkeypatch.delenv("CATALENS_API_KEY", raising=False)
    assert main(["serve", "--index", str(shop[1]), "--read-only", "--port", "8123"]) == 0
    assert "catalens serve: http://127.0.0.1:8123/ (API docs at /docs; read-only)" in capsys.readouterr().out
    assert served[0]["port"] == 8123


def test_the_summary_rate_is_the_extraction_rate():
    report = IndexReport(index="x", extracted=30, extract_seconds=5.0, seconds=60.0)
    assert report.images_per_second == 6.0


# --- 6. exit codes that say whether anything worked


def test_index_where_every_image_failed_exits_1(tmp_path):
    manifest = tmp_path / "catalog.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"sku-{n}", "image": f"gone/{n}.jpg", "category": "A/B"}) + "\n"
                                for n in range(3)))
    done = catalens("index", str(manifest), "--index", str(tmp_path / "index"), "--quiet")
    assert done.returncode == 1
    assert "failed            3" in done.stdout or re.search(r"failed\s+3", done.stdout)
    assert "no image of the catalog could be read" in done.stdout


def test_search_exits_1_when_no_photo_could_be_answered(shop, tmp_path, capsys):
    photo = str(next(shop[0].rglob("*.jpg")))
    assert main(["search", str(tmp_path / "missing.jpg"), "--index", str(shop[1]), "--mode", "deep"]) == 1
    out = capsys.readouterr().out
    assert "missing.jpg: error: file not found" in out and out.count("missing.jpg") == 1  # the path said once
    assert main(["search", photo, str(tmp_path / "missing.jpg"), "--index", str(shop[1]), "--mode", "deep"]) == 0
    assert main(["classify", str(tmp_path / "missing.jpg"), "--index", str(shop[1])]) == 1


# --- 7. the server offers what the index can answer, and shows no server paths


@pytest.fixture(scope="module")
def trained(shop, tmp_path_factory) -> Path:
    """A copy of the shop's index with a small pixel autoencoder trained on it."""
    from catalens.api.service import CatalogService

    index = Path(shutil.copytree(shop[1], tmp_path_factory.mktemp("trained") / "index"))
    service = CatalogService.open(index)
    try:
        service.train_autoencoder(epochs=1, input_kind="pixels", progress=False, width=8, code_channels=4)
    finally:
        service.close()
    return index


def test_stats_offers_exactly_the_modes_the_index_answers(client, trained):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    stats = client.get("/stats").json()
    assert stats["modes"] == ["fused", "local", "deep", "colour", "sift"]
    assert stats["features"]["anomaly"] is False
    any_bytes = {"image": ("p.jpg", b"refused before it is read", "image/jpeg")}
    response = client.post("/search", files=any_bytes, data={"mode": "ae"})
    assert response.status_code == 422 and "train-ae" in response.json()["detail"]
    with TestClient(create_app(trained, read_only=True)) as after_training:
        stats = after_training.get("/stats").json()
        assert "ae" in stats["modes"] and stats["features"]["anomaly"] is True


def test_heatmaps_of_a_long_list_are_numbered_across_chunks(shop, trained, tmp_path, capsys):
    photos = sorted(str(path) for path in shop[0].rglob("*.jpg"))
    listing = tmp_path / "photos.txt"
    listing.write_text("\n".join(photos))
    assert main(["anomaly", "--from-file", str(listing), "--index", str(trained), "--json",
                 "--heatmaps", str(tmp_path / "maps")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 12
    drawn = sorted(path.name for path in (tmp_path / "maps").iterdir())
    assert drawn == [f"{n:04d}_{Path(photo).stem}.png" for n, photo in enumerate(photos)]


def test_http_errors_show_no_server_paths(client, shop):
    photo = {"image": ("p.jpg", (shop[0] / "Dairy/Milk/item00.jpg").read_bytes(), "image/jpeg")}
    response = client.post("/anomaly", files=photo)
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "train-ae" in detail
    assert str(client.index) not in detail and str(client.index.resolve()) not in detail
    assert not re.search(r"(^|\s)/\w+/", detail), detail
    response = client.post("/search", files=photo, data={"category": "Fruit/Nope"})
    assert response.status_code == 422
    assert response.json()["detail"] == "category 'Fruit/Nope' is not in this index; did you mean Fruit/Apple or Fruit?"


def test_path_scrubber_hides_the_index_and_other_server_paths(tmp_path):
    from catalens.api.http.problems import PathScrubber

    scrub = PathScrubber.for_location(tmp_path / "index")
    assert scrub(f"{tmp_path / 'index'}: no autoencoder trained for this index") == "no autoencoder trained for this index"
    assert scrub(f"model {tmp_path / 'index' / 'models' / 'ae.pt'} is damaged") == "model this index/models/ae.pt is damaged"
    assert scrub("put x.pth in /root/.cache/torch/hub/checkpoints") == "put x.pth in <server path>"
    assert scrub("no item 'Dairy/Milk/a.jpg'") == "no item 'Dairy/Milk/a.jpg'"  # ids and categories stay
    bare = PathScrubber.for_location("idx")  # a relative name given to serve
    assert bare("idx: no catalens index here; idx is empty") == "no catalens index here; idx is empty"
    assert bare("anomaly scoring is not available: idx: no autoencoder") == "anomaly scoring is not available: no autoencoder"


# --- 8. long batch work streams its answers, with a bar on a terminal


def test_from_file_answers_stream_as_json_lines_with_a_bar_on_a_terminal(shop, tmp_path, capsys, monkeypatch):
    from catalens.api.service import CatalogService

    photos = sorted(str(path) for path in shop[0].rglob("*.jpg"))[:10]
    listing = tmp_path / "photos.txt"
    listing.write_text("\n".join(photos) + "\n")
    printed_before_each_call: list[int] = []
    lines: list[str] = []
    real_search = CatalogService.search

    def search(self, sources, **options):
        lines.extend(capsys.readouterr().out.splitlines())
        printed_before_each_call.append(len(lines))
        return real_search(self, sources, **options)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(CatalogService, "search", search)
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["search", "--from-file", str(listing), "--index", str(shop[1]), "--k", "2", "--mode", "deep",
                 "--json"]) == 0
    lines.extend(capsys.readouterr().out.splitlines())
    assert [json.loads(line)["query"] for line in lines] == photos  # stdout: JSON lines only, in order
    assert printed_before_each_call == [0, 8]  # the first chunk's answers were out before the next was asked
    assert re.search(r"searching: +\d+%.*\| [1-9]\d*/10 \[", terminal.getvalue())


def test_no_bar_when_stderr_is_not_a_terminal(shop, tmp_path):
    photos = sorted(str(path) for path in shop[0].rglob("*.jpg"))[:3]
    done = catalens("classify", *photos, "--index", str(shop[1]), "--json")
    assert done.returncode == 0 and done.stderr == ""
    assert len([json.loads(line) for line in done.stdout.splitlines()]) == 3


# --- 9. help for every argument, defaults shown; the OpenAPI document


def test_every_argument_of_every_command_is_explained_with_its_default():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        text = command.format_help()
        assert command.description, name
        for action in command._actions:
            assert action.help, (name, action.dest)
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings and action.default is not None and action.default is not False:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_openapi_documents_the_key_the_errors_and_every_response(client):
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert {"type": "apiKey", "in": "header", "name": "X-API-Key"}.items() <= next(iter(schemes.values())).items()
    assert spec["paths"]["/items"]["post"]["security"] and spec["paths"]["/items/{item_id}"]["delete"]["security"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(spec["paths"]["/search"]["post"]["responses"])
    for path, model in (("/classify", "ClassifyResponse"), ("/anomaly", "AnomalyResponse"), ("/search", "SearchResponse")):
        schema = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(model), path
    assert "X-API-Key" in spec["info"]["description"]
