import json
import subprocess
import sys

import pytest

from catalens.api.cli import main
from catalens.indexer.config import IndexConfig
from catalens.indexer.pipeline import index_catalog
from tests.conftest import refit_index


@pytest.fixture()
def tiny_index(tiny_catalog, tmp_path):
    index_catalog(tiny_catalog, tmp_path / "idx", IndexConfig(num_workers=0), progress=False)
    refit_index(tmp_path / "idx")
    return tmp_path / "idx"


def test_json_lines_follow_the_contract(tiny_catalog, tiny_index, tmp_path, capsys):
    query = tiny_catalog / "Dairy/Yoghurt/item01.jpg"
    broken = tmp_path / "broken.jpg"
    broken.write_text("nope")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{broken}\n\n")
    assert main(["search", str(query), "--index", str(tiny_index), "--k", "3", "--mode", "deep",
                 "--json", "--from-file", str(listing)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["query"] == str(query) and len(first["results"]) == 3
    assert set(first["results"][0]) == {"id", "score", "confidence", "category", "title"}
    assert "match" in first and all(0 <= hit["confidence"] <= 1 for hit in first["results"])
    assert first["results"][0]["id"] == "Dairy/Yoghurt/item01.jpg"
    scores = [hit["score"] for hit in first["results"]]
    assert scores == sorted(scores, reverse=True)
    assert second == {"query": str(broken), "error": f"{broken}: not an image (unrecognised format)"}


def test_category_prefix_filter_matches_whole_levels(tiny_catalog, tiny_index, capsys):
    query = tiny_catalog / "Dairy/Yoghurt/item01.jpg"
    main(["search", str(query), "--index", str(tiny_index), "--k", "10", "--mode", "deep", "--json", "--category", "Fruit"])
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 4 and all(hit["category"].startswith("Fruit/") for hit in results)
    # "Dai" is no whole level of any category: said, not answered with an empty list.
    assert main(["search", str(query), "--index", str(tiny_index), "--mode", "deep", "--json", "--category", "Dai"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "category 'Dai' is not in this index; did you mean Dairy?" in captured.err


def test_info_reports_counts_backbone_and_size(tiny_index, capsys):
    assert main(["info", "--index", str(tiny_index), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 12 and info["backbone"] == "efficientnet_lite0"
    assert info["dims"]["deep"] == 1280 and info["size_bytes"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "x.jpg", "--index", "/nonexistent"], "no catalens index here"),
        (["search", "--index", "/nonexistent"], "give at least one query image"),
        (["index", "/nonexistent/catalog", "--index", "/tmp/x"], "no such folder or manifest"),
    ],
)
def test_usage_errors_exit_non_zero_with_one_line(argv, message):
    done = subprocess.run([sys.executable, "-m", "catalens.api.cli", *argv], capture_output=True, text=True)
    assert done.returncode != 0
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_unknown_mode_is_a_usage_error(tiny_index, tiny_catalog, capsys):
    assert main(["search", str(tiny_catalog / "Dairy/Milk/item00.jpg"), "--index", str(tiny_index), "--mode", "psychic"]) == 2
    assert "--mode psychic: unknown mode; this index answers: fused, local, deep" in capsys.readouterr().err


def test_table_output_is_readable(tiny_catalog, tiny_index, capsys):
    main(["search", str(tiny_catalog / "Fruit/Apple/item05.jpg"), "--index", str(tiny_index), "--k", "2", "--mode", "deep"])
    out = capsys.readouterr().out
    assert "#  id" in out and "Fruit/Apple/item05.jpg" in out
