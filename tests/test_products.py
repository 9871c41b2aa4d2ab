"""Product-level ranking: every photo of a product counts, and a top 10 can show 10 different products."""

from __future__ import annotations

import json

import numpy as np

from catalens.api.cli import main
from catalens.indexer.config import IndexConfig
from catalens.indexer.pipeline import index_catalog
from catalens.indexer.stores import ItemRecord
from catalens.search.products import product_of, rank_products
from tests.conftest import draw_product


def _record(key: int, category: str, product: str | None = None) -> ItemRecord:
    return ItemRecord(key, f"id{key}", "", category, "", {"product": product} if product else {})


def test_the_product_is_the_attribute_where_given_else_the_leaf_category():
    assert product_of(_record(1, "A/B", "sku-9")) == "sku-9"
    assert product_of(_record(2, "A/B")) == "A/B"


def test_several_close_photos_of_one_product_outrank_one_slightly_closer_photo_of_another():
    records = {1: _record(1, "X"), 2: _record(2, "Y"), 3: _record(3, "Y"), 4: _record(4, "Y"), 5: _record(5, "X")}
    keys, scores = np.array([1, 2, 3, 4, 5]), np.array([0.90, 0.88, 0.87, 0.86, 0.50])
    plain, _ = rank_products(keys, scores, records, weight=0.0, votes=5, collapse=False)
    assert plain.tolist() == [1, 2, 3, 4, 5]  # no weight: each item by its own score
    voted, voted_scores = rank_products(keys, scores, records, weight=0.1, votes=5, collapse=False)
    assert voted.tolist() == [2, 3, 4, 1, 5] and voted_scores[0] == np.float32(0.88 + 0.1 * (0.87 + 0.86))
    assert voted_scores[1] == np.float32(0.87 + 0.1 * (0.88 + 0.86))  # each item its own score: no ties
    assert np.all(np.diff(voted_scores) <= 0)
    capped, _ = rank_products(keys, scores, records, weight=0.1, votes=2, collapse=False)
    assert capped.tolist() == [2, 3, 1, 4, 5]  # one other photo counts: 0.967, 0.958, 0.95 (item 1), 0.948
    collapsed, _ = rank_products(keys, scores, records, weight=0.1, votes=5, collapse=True)
    assert collapsed.tolist() == [2, 1]
    assert rank_products(keys, scores, {1: records[1]}, 0.1, 5, True)[0].tolist() == [1]  # unknown keys dropped


def test_collapse_on_the_command_line_gives_one_result_per_product(tmp_path, capsys):
    root = tmp_path / "catalog"
    manifest = []
    for product in range(4):
        for shot in range(3):
            path = draw_product(root / f"p{product}_{shot}.jpg", seed=100 * product + shot % 2, text=f"P{product}")
            manifest.append({"id": f"p{product}-{shot}", "image": str(path), "category": "Shelf/All",
                             "attributes": {"product": f"p{product}"}})
    (tmp_path / "catalog.jsonl").write_text("\n".join(json.dumps(line) for line in manifest) + "\n")
    index_catalog(tmp_path / "catalog.jsonl", tmp_path / "idx", IndexConfig(num_workers=0), progress=False)
    query = str(root / "p2_0.jpg")
    assert main(["search", query, "--index", str(tmp_path / "idx"), "--k", "4", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["results"]
    assert main(["search", query, "--index", str(tmp_path / "idx"), "--k", "4", "--json", "--collapse"]) == 0
    collapsed = json.loads(capsys.readouterr().out)["results"]
    assert collapsed[0]["id"].startswith("p2-")
    products = [hit["id"].split("-")[0] for hit in collapsed]
    assert sorted(products) == ["p0", "p1", "p2", "p3"]  # four different products
    assert len({hit["id"].split("-")[0] for hit in plain}) < 4  # without it, p2's shots crowd the top
