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



def test_folder_tree_titles_are_the_product_folder_made_readable_and_ids_keep_the_file_name(tmp_path):
    from tests.conftest import draw_product

    draw_product(tmp_path / "Fruit/Kiwi/Kiwi_010.jpg", seed=1)
    draw_product(tmp_path / "Packages/Milk/Arla-Standard-Milk/IMG_0042.jpg", seed=2)
    draw_product(tmp_path / "loose_photo.jpg", seed=3)
    titles = {item.id: item.title for item in read_folder_tree(tmp_path)}
    assert titles == {"Fruit/Kiwi/Kiwi_010.jpg": "Kiwi",
                      "Packages/Milk/Arla-Standard-Milk/IMG_0042.jpg": "Arla Standard Milk",
                      "loose_photo.jpg": "loose photo"}


def test_manifest_titles_are_kept_as_written(tmp_path):
    from tests.conftest import draw_product

    image = draw_product(tmp_path / "Kiwi_010.jpg", seed=1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "k", "image": str(image), "category": "Fruit/Kiwi",
                                    "title": "Kiwi_010 (organic)"}) + "\n")
    assert read_manifest(manifest)[0].title == "Kiwi_010 (organic)"

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
    from catalens.indexer.stores.backends import open_catalog

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


def _manifest_with(tmp_path: Path, second_line: bytes) -> Path:
    manifest = tmp_path / "catalog.jsonl"
    manifest.write_bytes(json.dumps({"id": "ok", "image": "a.jpg"}).encode() + b"\n" + second_line + b"\n")
    return manifest


@pytest.mark.parametrize("attributes", ['[' * 100_000 + ']' * 100_000, '{"a":' * 5000 + '1' + '}' * 5000,
                                        '{"a":' * 17 + '1' + '}' * 17])
def test_a_manifest_line_nested_past_the_limit_is_one_error_naming_its_line(tmp_path, attributes):
    manifest = _manifest_with(tmp_path, b'{"id": "deep", "image": "b.jpg", "attributes": ' + attributes.encode() + b"}")
    with pytest.raises(CatalogError, match=r"catalog.jsonl:2: .*nested more than 16 levels"):
        read_manifest(manifest)


def test_manifest_attributes_over_the_size_limit_are_refused_with_the_line(tmp_path):
    line = json.dumps({"id": "big", "image": "b.jpg", "attributes": {"notes": "x" * 70_000}}).encode()
    with pytest.raises(CatalogError, match=r"catalog.jsonl:2: attributes take more than 65536 bytes"):
        read_manifest(_manifest_with(tmp_path, line))


def test_a_manifest_line_that_is_not_utf8_is_one_error_naming_its_line(tmp_path):
    manifest = _manifest_with(tmp_path, b'{"id": "caf\xe9", "image": "b.jpg"}')
    with pytest.raises(CatalogError, match=r"catalog.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_manifest(manifest)


@pytest.mark.parametrize("field, value, named", [
    ("id", "sku\u202e1", "id"), ("id", "nul\x00", "id"), ("title", "Milk\x00", "title"),
    ("title", "evil\u2066name", "title"), ("category", "Dairy/Mi\u202elk", "category"),
    ("attributes", {"br\x00and": "x"}, "attribute key"), ("attributes", {"brand": "A\u202eB"}, "attributes.brand"),
])
def test_control_and_bidi_characters_are_refused_in_a_manifest_naming_the_field(tmp_path, field, value, named):
    record = {"id": "sku-2", "image": "b.jpg", field: value}
    manifest = _manifest_with(tmp_path, json.dumps(record).encode())
    with pytest.raises(CatalogError, match=rf"catalog.jsonl:2: {named}"):
        read_manifest(manifest)


def test_attribute_values_may_hold_line_breaks_and_tabs(tmp_path):
    record = {"id": "sku-2", "image": "b.jpg", "attributes": {"notes": "line one\nline\ttwo"}}
    assert read_manifest(_manifest_with(tmp_path, json.dumps(record).encode()))[1].attributes == record["attributes"]


def test_one_id_length_limit_applies_to_manifests(tmp_path):
    from catalens.datasets.catalog import MAX_ID_CHARS

    ok = json.dumps({"id": "x" * MAX_ID_CHARS, "image": "b.jpg"}).encode()
    assert read_manifest(_manifest_with(tmp_path, ok))[1].id == "x" * MAX_ID_CHARS
    long = json.dumps({"id": "x" * 200_000, "image": "b.jpg"}).encode()
    with pytest.raises(CatalogError, match=rf"catalog.jsonl:2: id .* at most {MAX_ID_CHARS}"):
        read_manifest(_manifest_with(tmp_path, long))


def test_a_category_over_the_level_cap_is_refused_in_a_manifest(tmp_path):
    line = json.dumps({"id": "sku-2", "image": "b.jpg", "category": "a/" * 40 + "b"}).encode()
    with pytest.raises(CatalogError, match=r"catalog.jsonl:2: category has 41 levels"):
        read_manifest(_manifest_with(tmp_path, line))


def test_a_folder_name_with_a_bidi_override_is_refused_naming_it(tiny_catalog):
    (tiny_catalog / "Dairy" / "Milk" / "item00.jpg").rename(tiny_catalog / "Dairy" / "Milk" / "gpj.\u202eexe.jpg")
    with pytest.raises(CatalogError, match="bidirectional control"):
        read_folder_tree(tiny_catalog)
