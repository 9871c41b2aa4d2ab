"""Search by words (issue 38): normalisation, typo tolerance, the SQLite text index, the entry
points, the Elasticsearch bodies and the OCR ``text`` feature."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from catalens.datasets.catalog import CatalogItem
from catalens.indexer.stores import ItemFilter, ItemUpdate, item_key
from catalens.indexer.stores.sqlite_items import SqliteItemStore
from catalens.indexer.stores.text import matching_terms, normalise, read_words, within_edits
from tests.conftest import draw_product


def test_normalise_folds_case_and_swedish_diacritics():
    assert normalise("Ekologisk MJÖLK, Lättmjölk") == "ekologisk mjolk lattmjolk"
    assert normalise("Smørbrød Straße") == "smorbrod strasse"


def test_typos_allowed_grow_with_the_term_as_fuzziness_auto():
    vocabulary = ["oatly", "arla", "ar", "alpro", "standardmjolk", "tropicana"]
    assert matching_terms("otaly", vocabulary) == ["oatly"]  # a swap is one edit
    assert matching_terms("ar", vocabulary) == ["ar"]  # two letters: no typo allowed
    assert "tropicana" in matching_terms("tropicanna", vocabulary)
    assert matching_terms("mjolk", vocabulary) == ["standardmjolk"]  # a compound holds the word
    assert not within_edits("arla", "alpro", 1)


def test_words_read_join_neighbouring_fragments_of_a_spaced_logo():
    assert "morgon" in read_words("GOD'\nMOR\nGON").split()


def _store(tmp_path: Path) -> SqliteItemStore:
    store = SqliteItemStore(tmp_path / "items.sqlite")
    items = [
        CatalogItem("sku-1001", tmp_path / "a.jpg", "Packages/Milk", "Arla Standardmjölk", {"brand": "Arla"}),
        CatalogItem("sku-1002", tmp_path / "b.jpg", "Packages/Milk", "Garant Ekologisk Mjölk", {}),
        CatalogItem("sku-1012", tmp_path / "c.jpg", "Packages/Juice", "", {"flavour": "apelsin"}),
        CatalogItem("sku-2000", tmp_path / "d.jpg", "Packages/Oatghurt", "", {}),
    ]
    rows = [{}, {}, {}, {"text": "OATLY\nTHE ORIGINAL"}]
    store.write([ItemUpdate(item, "1:1", row) for item, row in zip(items, rows, strict=True)])
    return store


def _ids(store: SqliteItemStore, query: str, k: int = 10, filter: ItemFilter | None = None) -> list[str]:
    keys, scores = store.search_text(query, k, filter)
    assert np.all(np.diff(scores) <= 1e-6), "best first"
    records = store.items(keys.tolist())
    return [records[int(key)].id for key in keys]


def test_sqlite_text_search_matches_titles_attributes_ids_and_words_read_despite_typos(tmp_path):
    store = _store(tmp_path)
    assert _ids(store, "mjolk")[:2] == ["sku-1001", "sku-1002"] or set(_ids(store, "mjolk")[:2]) == {"sku-1001", "sku-1002"}
    assert _ids(store, "EKOLOGISK mjölk")[0] == "sku-1002"
    assert _ids(store, "apelsin") == ["sku-1012"]  # an attribute value
    assert _ids(store, "otaly") == ["sku-2000"]  # only printed on the pack, and misspelt
    assert _ids(store, "sku-1002")[0] == "sku-1002"  # the exact id ranks above its one-typo neighbours
    assert _ids(store, "nothing like it") == []


def test_sqlite_text_search_follows_filters_metadata_changes_and_deletions(tmp_path):
    store = _store(tmp_path)
    assert _ids(store, "arla", filter=ItemFilter(category="Packages/Juice")) == []
    assert _ids(store, "mjolk", filter=ItemFilter(keys=np.array([item_key("sku-1002")]))) == ["sku-1002"]
    store.update_metadata([CatalogItem("sku-1012", tmp_path / "c.jpg", "Packages/Juice", "Tropicana Juice", {})])
    assert _ids(store, "tropicana") == ["sku-1012"] and _ids(store, "apelsin") == []
    store.delete(["sku-2000"])
    assert _ids(store, "oatly") == []


def test_a_store_written_before_text_search_gets_its_text_index_on_open(tmp_path):
    store = _store(tmp_path)
    store.close()
    with sqlite3.connect(tmp_path / "items.sqlite") as db:  # as catalens before text search left it
        db.execute("DROP TABLE item_text_terms")
        db.execute("DROP TABLE item_text")
        db.execute("DELETE FROM state WHERE name = 'text_index'")
    reopened = SqliteItemStore(tmp_path / "items.sqlite", create=False)
    assert _ids(reopened, "garant") == ["sku-1002"]


@pytest.fixture()
def titled_index(tmp_path):
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    items = [CatalogItem(f"item{i}", draw_product(tmp_path / f"item{i}.jpg", seed=i), category, title)
             for i, (category, title) in enumerate([("Dairy/Milk", "Arla Mellanmjölk"), ("Dairy/Milk", "Oatly iKaffe"),
                                                    ("Fruit/Apple", "Granny Smith"), ("Fruit/Apple", "Pink Lady")])]
    index_catalog(items, tmp_path / "idx", IndexConfig(features=["deep", "colour"], num_workers=0), progress=False)
    return tmp_path / "idx", items


def test_cli_search_by_words_alone_prints_the_same_json_as_photo_search(titled_index, capsys):
    from catalens.api.cli import main

    index, _ = titled_index
    assert main(["search", "--text", "mellanmjolk", "--index", str(index), "--json"]) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert result["query"] == "mellanmjolk"
    assert result["results"][0]["id"] == "item0"
    assert set(result["results"][0]) >= {"id", "score", "category", "title"}


def test_explain_prints_the_words_each_result_matched(titled_index, capsys, tmp_path):
    from catalens.api.cli import main

    index, _ = titled_index
    assert main(["search", "--text", "oatlu", "--index", str(index), "--k", "1", "--explain", str(tmp_path)]) == 0
    assert "item1: oatly (title)" in capsys.readouterr().out


def test_words_with_a_photo_join_fused_search(titled_index):
    from catalens.api.service import CatalogService

    index, items = titled_index
    service = CatalogService.open(index)
    try:
        plain = service.search([items[2].image], k=4, confidence=False)[0]
        worded = service.search([items[2].image], k=4, text="pink lady", confidence=False)[0]
        # The words lift the item they name; the photo's own item stays among the results.
        position = [hit.id for hit in plain.results].index("item3")
        assert [hit.id for hit in worded.results].index("item3") <= position
        assert worded.results[[hit.id for hit in worded.results].index("item3")].score > \
            plain.results[position].score
    finally:
        service.close()


def test_http_search_takes_words_without_a_photo(titled_index):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    index, _ = titled_index
    with TestClient(create_app(index, read_only=True)) as client:
        response = client.post("/search", data={"text": "granny smth", "k": "2"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["mode"] == "text" and body["results"][0]["id"] == "item2"
        assert client.post("/search", data={"k": "2"}).status_code == 422  # neither words nor a photo


def test_elasticsearch_text_query_is_a_fuzzy_match_on_folded_fields():
    from catalens.indexer.stores.elastic.mapping import index_template, item_document, text_body

    body = text_body("ekologisk mjölk", 10, ["text_read"], ItemFilter(category="Packages"))
    should = body["query"]["bool"]["should"]
    assert {"match": {"search_text": {"query": "ekologisk mjölk", "fuzziness": "AUTO"}}} in should
    assert {"match": {"text_read": {"query": "ekologisk mjölk", "fuzziness": "AUTO"}}} in should
    assert body["query"]["bool"]["filter"] == [{"term": {"category.tree": "Packages"}}]
    template = index_template({}, (), text_features=["text"])["template"]
    assert template["settings"]["analysis"]["analyzer"]["folded"]["filter"] == ["lowercase", "asciifolding"]
    assert template["mappings"]["properties"]["text_read"]["analyzer"] == "folded"
    document = item_document(ItemUpdate(CatalogItem("p1", Path("p1.jpg"), "Packages/Milk", "Mjölk", {}), "1:1",
                                        {"text": "GOD'\nMOR\nGON"}))
    assert document["text"] == "GOD'\nMOR\nGON" and "morgon" in document["text_read"].split()
    assert "mjolk" in document["search_text"].split()


def test_the_text_feature_is_registered_opt_in():
    from catalens.indexer.config import IndexConfig, load_config
    from catalens.indexer.features import feature_spec, list_features

    assert "text" in list_features() and feature_spec("text").kind == "text"
    assert "text" not in IndexConfig().features
    assert load_config(features="deep,colour,sift,text").features[-1] == "text"


def _ocr_models_present() -> bool:
    from catalens.indexer.features.ocr import DETECTOR, models_dir

    return (models_dir() / DETECTOR).is_file()


@pytest.mark.skipif(not _ocr_models_present(), reason="OCR models not fetched (make setup fetches them)")
def test_the_text_feature_reads_printed_words_and_makes_them_searchable(tmp_path):
    from catalens.api.service import CatalogService
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    font = ImageFont.load_default(size=48)
    items = []
    for i, word in enumerate(["OATLY", "TROPICANA", "KAFFE"]):
        image = Image.new("RGB", (348, 348), (250, 250, 245))
        ImageDraw.Draw(image).text((30, 150), word, fill=(10, 10, 10), font=font)
        image.save(tmp_path / f"pack{i}.jpg", quality=95)
        items.append(CatalogItem(f"pack{i}", tmp_path / f"pack{i}.jpg", "Packages", ""))
    report = index_catalog(items, tmp_path / "idx", IndexConfig(features=["deep", "text"], num_workers=1),
                           progress=False)
    assert report.added == 3 and not report.failures
    service = CatalogService.open(tmp_path / "idx")
    try:
        read = service.catalog.items.rows("text")
        assert "TROPICANA" in read[item_key("pack1")].decode().upper()
        [result] = service.search([], text="tropicanna")
        assert result.results[0].id == "pack1"
        # The mode named after the feature ranks by the words read on the photo alone.
        [photo] = service.search([tmp_path / "pack0.jpg"], mode="text", k=1, confidence=False)
        assert photo.results[0].id == "pack0"
    finally:
        service.close()
