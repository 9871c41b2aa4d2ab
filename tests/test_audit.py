"""catalens audit: misfiled items, duplicates and non-products found from the stored rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from catalens.datasets.catalog import CatalogItem
from catalens.search.audit import (
    AuditSettings,
    EvidenceModel,
    audit,
    disagreeing_level,
    dismiss,
    leave_one_out,
    nearest,
)
from tests.conftest import draw_product

CATEGORIES = ["Dairy/Milk/Whole", "Dairy/Milk/Skimmed", "Fruit/Apple", "Fruit/Pear"]
KEY = "audit-test-key-0123456789"


def _shots(folder: Path, category_seed: int, n: int) -> list[Path]:
    """``n`` photos of one product: the same drawing, shifted and re-lit a little."""
    base = Image.open(draw_product(folder / f"base{category_seed}.png", seed=category_seed * 17 + 3))
    rng = np.random.default_rng(category_seed)
    paths = []
    for i in range(n):
        dx, dy = rng.integers(0, 16, 2)
        shot = base.crop((dx, dy, dx + 236, dy + 236)).resize((256, 256))
        shot = ImageEnhance.Brightness(shot).enhance(float(rng.uniform(0.85, 1.15)))
        path = folder / f"p{category_seed}-{i}.jpg"
        shot.save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def flawed_index(tmp_path_factory) -> tuple[Path, list[CatalogItem]]:
    """Four products of six photos each; one photo of the first filed under the third, an exact copy
    of a pear photo under an apple id, and a blank placeholder under the milk."""
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    folder = tmp_path_factory.mktemp("audit")
    items = []
    for c, category in enumerate(CATEGORIES):
        for i, path in enumerate(_shots(folder / "images", c, 6)):
            items.append(CatalogItem(f"sku-{c}-{i}", path, category, f"product {c}"))
    items[0] = CatalogItem("sku-0-0", items[0].image, "Fruit/Apple", "product 0")  # misfiled
    copy = folder / "images" / "copy.jpg"
    shutil.copyfile(items[-1].image, copy)
    items.append(CatalogItem("sku-copy", copy, "Fruit/Apple", "copy"))
    blank = folder / "images" / "blank.jpg"
    Image.new("RGB", (256, 256), (240, 240, 240)).save(blank)
    items.append(CatalogItem("sku-blank", blank, "Dairy/Milk/Whole", "placeholder"))
    report = index_catalog(items, folder / "index", IndexConfig(features=["deep", "colour"]), progress=False)
    assert report.added == len(items)
    return folder / "index", items


def _findings(index: Path, **settings):
    from catalens.indexer.stores.backends import open_catalog

    catalog = open_catalog(index)
    try:
        return audit(catalog, AuditSettings(**settings)).findings
    finally:
        catalog.close()


def test_the_level_that_disagrees_is_named():
    assert disagreeing_level("Packages/Milk/Arla-Standard", "Packages/Milk/Arla-Medium") == "leaf"
    assert disagreeing_level("Packages/Milk/Arla", "Packages/Juice/Bravo") == "coarse"
    assert disagreeing_level("Fruit/Apple/Gala", "Vegetables/Leek") == "top"
    assert disagreeing_level("Fruit/Kiwi", "Fruit/Apple/Gala") == "coarse"


def test_leave_one_out_never_counts_the_item_itself():
    # Two leaves; item 0 sits on top of leaf B's items but is filed under A with one other item.
    rows = np.array([[1, 0], [0, 1], [1, 0.05], [1, 0.1], [1, -0.05]], np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 1])
    positions, sims = nearest(rows, 3)
    assert 0 not in positions[0]
    loo = leave_one_out(rows, labels, np.array(["A", "B"]), positions, sims, n_neighbours=3, temperature=0.05)
    assert loo.proba[0, 1] > 0.9  # without itself, A's prototype is item 1, far away


def test_evidence_model_puts_its_base_rate_at_the_prior():
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(0, 1, (500, 2)), rng.normal(3, 1, (500, 2))]
    y = np.r_[np.zeros(500, bool), np.ones(500, bool)]
    low = EvidenceModel(prior=0.01).fit(X, y).predict_proba(X)
    high = EvidenceModel(prior=0.5).fit(X, y).predict_proba(X)
    assert low.mean() < high.mean()
    assert 0.4 < high.mean() < 0.6


def test_a_photo_filed_under_another_product_is_the_first_mislabelled_finding(flawed_index):
    findings = [f for f in _findings(flawed_index[0], min_score=0.0) if f.problem == "mislabelled"]
    # The pear photo copied under an apple id is misfiled too: the two lead, nothing else.
    assert {f.id for f in findings[:2]} == {"sku-0-0", "sku-copy"}
    misfiled = next(f for f in findings if f.id == "sku-0-0")
    assert misfiled.suggested == "Dairy/Milk/Whole"
    assert misfiled.evidence["level"] == "top"
    assert misfiled.evidence["neighbours"][0]["category"] == "Dairy/Milk/Whole"


def test_an_exact_copy_under_another_id_is_a_duplicate_naming_both(flawed_index):
    duplicates = [f for f in _findings(flawed_index[0]) if f.problem == "duplicate"]
    pairs = [{f.id, *f.evidence["ids"]} for f in duplicates]
    assert any({"sku-copy", "sku-3-5"} <= pair for pair in pairs)
    copy = next(f for f in duplicates if "sku-copy" in {f.id, *f.evidence["ids"]})
    assert copy.evidence["exact"] and copy.score > 0.9


def test_a_blank_placeholder_is_the_first_not_a_product_finding(flawed_index):
    odd = [f for f in _findings(flawed_index[0], min_score=0.0) if f.problem == "not-a-product"]
    assert odd[0].id == "sku-blank"


def test_dismissed_findings_stay_hidden_until_the_item_changes(flawed_index, tmp_path):
    from catalens.indexer.pipeline import index_catalog
    from catalens.indexer.stores.backends import open_catalog

    index = tmp_path / "index"
    shutil.copytree(flawed_index[0], index)
    catalog = open_catalog(index)
    try:
        dismiss(catalog, "sku-0-0")
        assert "sku-0-0" not in {f.id for f in audit(catalog, AuditSettings(min_score=0.0)).findings}
    finally:
        catalog.close()
    items = [CatalogItem(i.id, i.image, "Fruit/Pear" if i.id == "sku-0-0" else i.category, i.title)
             for i in flawed_index[1]]
    index_catalog(items, index, progress=False)  # the item changes: filed elsewhere
    assert "sku-0-0" in {f.id for f in _findings(index, min_score=0.0)}


def test_cli_json_lines_follow_the_contract_and_dismiss_by_id(flawed_index, tmp_path, capsys):
    from catalens.api.cli import main

    index = tmp_path / "index"
    shutil.copytree(flawed_index[0], index)
    assert main(["audit", "--index", str(index), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines and all(set(line) == {"id", "category", "problem", "suggested", "score", "evidence"} for line in lines)
    assert {line["problem"] for line in lines} <= {"mislabelled", "duplicate", "not-a-product"}
    assert [line["score"] for line in lines] == sorted((line["score"] for line in lines), reverse=True)
    assert main(["audit", "--index", str(index), "--json", "--category", "Fruit"]) == 0
    assert all(json.loads(line)["category"].startswith("Fruit/") for line in capsys.readouterr().out.splitlines())
    assert main(["audit", "--index", str(index), "--top", "3"]) == 0
    assert "score" in capsys.readouterr().out
    first = lines[0]["id"]
    assert main(["audit", "--index", str(index), "--dismiss", first]) == 0
    capsys.readouterr()
    assert main(["audit", "--index", str(index), "--json"]) == 0
    assert first not in {json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()}
    assert main(["audit", "--index", str(index), "--dismiss", "no-such-item"]) == 2


def test_http_audit_reads_without_a_key_and_dismissing_needs_it(flawed_index, tmp_path):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    index = tmp_path / "index"
    shutil.copytree(flawed_index[0], index)
    with TestClient(create_app(index, api_key=KEY)) as client:
        body = client.post("/audit", data={"top": "5"}).json()
        assert 0 < len(body["findings"]) <= 5
        finding = body["findings"][0]
        assert finding["image_url"].startswith("/items/") and "neighbours" in finding["evidence"]
        assert client.post("/audit", data={"problem": "nonsense"}).status_code == 422
        assert client.post("/audit", data={"dismiss": finding["id"]}).status_code == 401
        assert client.post("/audit", data={"dismiss": finding["id"]}, headers={"X-API-Key": "wrong-key-wrong-key"}).status_code == 401
        assert client.post("/audit", data={"dismiss": finding["id"]}, headers={"X-API-Key": KEY}).status_code == 200
        after = client.post("/audit", data={"top": "50"}).json()
        assert finding["id"] not in {f["id"] for f in after["findings"]} and after["dismissed"] >= 1
    with TestClient(create_app(index, read_only=True)) as client:
        assert client.post("/audit", data={"top": "5"}).status_code == 200
        assert client.post("/audit", data={"dismiss": finding["id"]}, headers={"X-API-Key": KEY}).status_code == 403


@pytest.mark.slow
def test_grocery_subset_with_planted_errors_finds_them_first(grocery, tmp_path):
    """Iconic + 8 train photos a product (~730 items), 5% of the train photos misfiled."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_audit import mislabel_figures, plant_mislabels

    from catalens.datasets.grocery import catalog_items
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog
    from catalens.indexer.stores.backends import open_catalog

    items, seen = [], {}
    for item in catalog_items(("iconic", "train"), grocery):
        seen[item.category] = seen.get(item.category, 0) + (item.attributes["split"] == "train")
        if item.attributes["split"] == "iconic" or seen[item.category] <= 8:
            items.append(item)
    planted_items, planted = plant_mislabels(items, seed=0)
    index_catalog(planted_items, tmp_path / "index", IndexConfig(features=["deep", "colour", "sift"]), progress=False)
    catalog = open_catalog(tmp_path / "index")
    try:
        report = audit(catalog, AuditSettings(min_score=0.0))
    finally:
        catalog.close()
    found = [f for f in report.findings if f.problem == "mislabelled"]
    figures = mislabel_figures([f.id for f in found], [f.suggested for f in found], planted)
    assert figures["precision"] >= 0.75, figures
    assert figures["suggestion"] >= 0.9, figures
    assert report.seconds < 30
    # The suspects were verified on their stored keypoints, planted ones against the leaf they look like.
    verified = [f for f in found[:figures["K"]] if f.id in planted and "verified_inliers" in f.evidence]
    assert verified and np.mean([f.evidence["verified_inliers"]["suggested"] > f.evidence["verified_inliers"]["filed"]
                                 for f in verified]) >= 0.7


def test_pictures_alike_only_in_the_global_rows_are_no_duplicate_unless_their_keypoints_verify(tmp_path):
    """Two noise pictures are as close as copies in the deep and colour rows; their keypoints do not
    match. A half-size copy of a product photo under another category keeps its keypoints."""
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.audit.duplicates import duplicate_pairs, stored_pair_inliers
    from catalens.search.audit.rows import CatalogRows, NeighbourLists

    rng = np.random.default_rng(0)
    items = []
    for c, category in enumerate(CATEGORIES):
        for i, path in enumerate(_shots(tmp_path / "images", c, 3)):
            items.append(CatalogItem(f"sku-{c}-{i}", path, category))
    label = _printed_label(rng)
    label.save(tmp_path / "images" / "label.jpg", quality=92)
    label.resize((160, 160)).save(tmp_path / "images" / "small.jpg", quality=80)
    items.append(CatalogItem("sku-label", tmp_path / "images" / "label.jpg", "Dairy/Milk/Whole"))
    items.append(CatalogItem("sku-small", tmp_path / "images" / "small.jpg", "Fruit/Pear"))
    for n, category in enumerate(CATEGORIES[:2]):
        noise = rng.integers(100, 156, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "images" / f"noise{n}.png")
        items.append(CatalogItem(f"sku-noise-{n}", tmp_path / "images" / f"noise{n}.png", category))
    index_catalog(items, tmp_path / "index", IndexConfig(features=["deep", "colour", "sift"]), progress=False)

    catalog = open_catalog(tmp_path / "index")
    try:
        data = CatalogRows.from_catalog(catalog)
        ids = data.ids
        positions, sims = {}, {}
        for name, rows in data.rows.items():
            positions[name], sims[name] = nearest(rows, len(ids) - 1)
        neighbours = NeighbourLists(positions, sims)
        # No gate on the global rows (the test's network is not the pretrained one): every pair
        # under two categories is a candidate, and only the keypoints decide.
        settings = AuditSettings(near_similarity=-1.0, near_colour_similarity=-1.0)
        loose = {frozenset((ids[i], ids[j])) for i, j, _, _ in duplicate_pairs(data, neighbours, settings)}
        assert frozenset(("sku-noise-0", "sku-noise-1")) in loose
        assert frozenset(("sku-label", "sku-small")) in loose
        inliers = stored_pair_inliers(catalog, data.keys)
        assert inliers is not None
        verified = {frozenset((ids[i], ids[j]))
                    for i, j, _, _ in duplicate_pairs(data, neighbours, settings, inliers)}
    finally:
        catalog.close()
    assert frozenset(("sku-noise-0", "sku-noise-1")) not in verified
    assert frozenset(("sku-label", "sku-small")) in verified


def _printed_label(rng: np.random.Generator, size: int = 320) -> Image.Image:
    """A pack's printed label: many coloured corners for keypoints."""
    label = Image.new("RGB", (size, size), (250, 250, 245))
    draw = ImageDraw.Draw(label)
    for _ in range(120):
        x, y = rng.integers(0, size - 20, 2)
        w, h = rng.integers(6, 40, 2)
        draw.rectangle((int(x), int(y), int(x + w), int(y + h)), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return label


def test_a_photo_verifies_against_its_own_products_leaf_and_not_another(tmp_path):
    """Three shots of one label under one leaf, three of another label under another: an item's best
    verified match in its own leaf keeps inliers, in the other leaf none count."""
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.audit.rows import CatalogRows
    from catalens.search.audit.verified import LeafMatches
    from catalens.search.settings import MIN_INLIERS

    rng = np.random.default_rng(3)
    (tmp_path / "images").mkdir()
    items = []
    for c, category in enumerate(CATEGORIES[:2]):
        label = _printed_label(rng)
        for i in range(3):
            dx, dy = rng.integers(0, 30, 2)
            path = tmp_path / "images" / f"l{c}-{i}.jpg"
            label.crop((int(dx), int(dy), int(dx) + 280, int(dy) + 280)).save(path, quality=90)
            items.append(CatalogItem(f"sku-{c}-{i}", path, category))
    index_catalog(items, tmp_path / "index", IndexConfig(features=["deep", "colour", "sift"]), progress=False)
    catalog = open_catalog(tmp_path / "index")
    try:
        data = CatalogRows.from_catalog(catalog)
        leaves, labels = np.unique(data.categories, return_inverse=True)
        matches = LeafMatches.of_catalog(catalog, data.keys, data.embedding(), labels, per_leaf=2)
        assert matches is not None
        items_at = np.arange(len(labels))
        own = matches.best_inliers(items_at, labels)
        other = matches.best_inliers(items_at, 1 - labels)
        # Members the global evidence suspects more than the item do not vouch for their leaf.
        doubted = LeafMatches.of_catalog(catalog, data.keys, data.embedding(), labels, per_leaf=2,
                                         doubt=np.where(labels == 1, 0.9, 0.1))
        mates_doubted = doubted.best_inliers(items_at, labels, np.full(len(labels), 0.5))
        as_doubtful = doubted.best_inliers(items_at, labels, np.full(len(labels), 0.95))
    finally:
        catalog.close()
    assert (own >= MIN_INLIERS).all(), own
    assert (other == 0).all(), other
    assert (mates_doubted[labels == 0] >= MIN_INLIERS).all() and (mates_doubted[labels == 1] == 0).all(), mates_doubted
    assert (as_doubtful >= MIN_INLIERS).all(), as_doubtful


class _LeafInliers:
    """Stands in for ``LeafMatches``: planted rows (leaf -1) verify against the leaf they look like,
    not the one they are planted under; so does suspect ``slip``; every other suspect verifies
    against its own leaf."""

    def __init__(self, slip: int):
        self.slip = slip

    def inliers(self, items, filed_leaf, suggested, ceilings=None):
        return np.array([(0, 60) if leaf == -1 or i == self.slip else (60, 0)
                         for i, leaf in zip(items, filed_leaf, strict=True)])


def test_the_rescore_reads_verified_matches_where_the_global_evidence_ties():
    from catalens.search.audit.verified import verified_rescore

    rng = np.random.default_rng(0)
    n = 60
    # Global evidence that cannot tell the suspects apart, nor them from the planted rows.
    filed, planted = rng.normal(0, 0.01, (n, 2)), rng.normal(0, 0.01, (n, 2))
    model = EvidenceModel(prior=0.3).fit(np.r_[filed, planted], np.r_[np.zeros(n, bool), np.ones(n, bool)])
    leaf = np.zeros(n, np.int64)
    p, verified = verified_rescore(_LeafInliers(slip=7), model, filed, planted, leaf, leaf, np.full(n, -1), leaf,
                                   shortlist=n, rng=rng, min_p=0.0)
    assert verified[7] == (0, 60)
    assert p[7] > 0.5 > np.delete(p, 7).max()
