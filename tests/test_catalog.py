import json
from pathlib import Path

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


def _unlistable(monkeypatch, folder: Path) -> None:
    """``folder`` cannot be listed (chmod cannot refuse root, who runs the tests in CI)."""
    import os

    real = os.scandir

    def scandir(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_of_the_catalog_that_cannot_be_listed_is_an_error_naming_it(tiny_catalog, monkeypatch):
    _unlistable(monkeypatch, tiny_catalog / "Dairy" / "Milk")
    with pytest.raises(CatalogError, match=r"Dairy/Milk: cannot list this folder .*Permission denied"):
        read_folder_tree(tiny_catalog)


def test_an_unlistable_folder_removes_nothing_from_the_index(tiny_catalog, tmp_path, monkeypatch, capsys):
    from catalens.api.cli import main
    from catalens.indexer.backends import open_catalog

    index = tmp_path / "index"
    assert main(["index", str(tiny_catalog), "--index", str(index), "--quiet"]) == 0
    _unlistable(monkeypatch, tiny_catalog / "Dairy" / "Milk")
    assert main(["index", str(tiny_catalog), "--index", str(index), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Dairy/Milk" in err and len(err.strip().splitlines()) == 1
    catalog = open_catalog(index)
    try:
        assert catalog.items.count() == 12
    finally:
        catalog.close()


@pytest.mark.parametrize("item_id", ["a\nb", "bell\x07", " padded", "x/../y", "."])
def test_a_manifest_id_no_table_or_url_can_carry_is_refused_with_its_line(tmp_path, item_id):
    manifest = tmp_path / "catalog.jsonl"
    manifest.write_text(json.dumps({"id": "ok", "image": "a.jpg"}) + "\n" + json.dumps({"id": item_id, "image": "b.jpg"}) + "\n")
    with pytest.raises(CatalogError, match=r"catalog.jsonl:2: "):
        read_manifest(manifest)


def test_a_folder_name_with_a_newline_is_refused_naming_it(tiny_catalog):
    broken = tiny_catalog / "Dairy" / "Milk\nSkimmed"
    broken.mkdir()
    (tiny_catalog / "Dairy" / "Milk" / "item00.jpg").rename(broken / "item00.jpg")
    with pytest.raises(CatalogError, match="control character"):
        read_folder_tree(tiny_catalog)
