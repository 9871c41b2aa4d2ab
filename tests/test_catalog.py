import json

import pytest

from catalens.datasets.catalog import CatalogError, load_catalog, read_folder_tree, read_manifest


def test_folder_tree_folders_become_the_category_path(tiny_catalog):
    items = read_folder_tree(tiny_catalog)
    assert len(items) == 12
    by_id = {item.id: item for item in items}
    assert by_id["Dairy/Milk/item00.jpg"].category == "Dairy/Milk"
    assert by_id["Fruit/Apple/item02.jpg"].image.is_file()


def test_manifest_resolves_relative_images_against_its_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    manifest = tmp_path / "catalog.jsonl"
    manifest.write_text(
        json.dumps({"id": "sku-1", "image": "imgs/a.jpg", "category": "/Packages/Milk/Arla/",
                    "title": "Arla", "attributes": {"fat": "3%"}}) + "\n\n"
        + json.dumps({"id": "sku-2", "image": "/abs/b.jpg"}) + "\n"
    )
    first, second = read_manifest(manifest)
    assert first.image == tmp_path / "imgs" / "a.jpg"
    assert first.category == "Packages/Milk/Arla"
    assert first.attributes == {"fat": "3%"}
    assert str(second.image) == "/abs/b.jpg" and second.category == ""


def test_manifest_duplicate_id_names_both_lines(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "image": "1.jpg"}\n{"id": "b", "image": "2.jpg"}\n{"id": "a", "image": "3.jpg"}\n')
    with pytest.raises(CatalogError, match=r"m.jsonl:3: duplicate id 'a' \(first defined on line 1\)"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"image": "a.jpg"}', "'id' is required"),
        ('{"id": "a"}', "'image' is required"),
        ('["a"]', "must be a JSON object"),
        ('{"id": "a", "image": "a.jpg", "attributes": [1]}', "'attributes' must be a JSON object"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "ok", "image": "ok.jpg"}\n' + line + "\n")
    with pytest.raises(CatalogError, match=rf"m.jsonl:2: .*{message}"):
        read_manifest(manifest)


def test_load_catalog_rejects_what_is_neither_folder_nor_manifest(tmp_path):
    with pytest.raises(CatalogError, match="no such folder or manifest"):
        load_catalog(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no images found"):
        load_catalog(tmp_path / "empty")
