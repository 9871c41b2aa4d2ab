"""``catalens locate``: several products in one photo, each with its box."""

import json

import numpy as np
import pytest
from PIL import Image

from catalens.api.cli import main
from catalens.indexer.config import IndexConfig
from catalens.indexer.pipeline import index_catalog
from catalens.search.locate import (
    LocateSettings,
    PhotoEdges,
    disowned,
    iou,
    overruled,
    snap_box,
    suppress,
    voted_box,
    windows,
)
from tests.conftest import refit_index, textured_label

CATEGORIES = ["Dairy/Milk", "Dairy/Yoghurt", "Juice/Orange", "Juice/Apple"]
# Where the two products lie in the photo, and at what size: neither at the catalog's scale.
PLACED = {"Dairy/Yoghurt": (40, 60, 40 + 240, 60 + 240), "Juice/Apple": (420, 150, 420 + 280, 150 + 280)}


@pytest.fixture(scope="module")
def label_index(tmp_path_factory):
    """Four printed-label products, one catalog image each, and a photo showing two of them."""
    folder = tmp_path_factory.mktemp("labels")
    for seed, category in enumerate(CATEGORIES):
        path = folder / "catalog" / category / "label.jpg"
        path.parent.mkdir(parents=True)
        textured_label(seed).save(path, quality=95)
    index_catalog(folder / "catalog", folder / "index", IndexConfig(num_workers=0), progress=False)
    refit_index(folder / "index")
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(100, 140, (480, 760, 3), dtype=np.uint8))
    for category, box in PLACED.items():
        seed = CATEGORIES.index(category)
        photo.paste(textured_label(seed).resize((box[2] - box[0], box[3] - box[1])), box[:2])
    photo.save(folder / "two-products.png")
    return folder / "index", folder / "two-products.png"


def test_two_products_in_one_photo_are_found_with_their_boxes(label_index, capsys):
    index, photo = label_index
    assert main(["locate", str(photo), "--index", str(index), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["query"] == str(photo)
    found = {}
    for detection in line["detections"]:
        assert set(detection) == {"id", "score", "category", "title", "box", "confidence"}
        assert 0.0 <= detection["confidence"] <= 1.0
        found.setdefault(detection["category"], detection["box"])
    for category, box in PLACED.items():
        assert category in found, line
        assert iou(found[category], box) >= 0.7, (category, found[category], box)
    scores = [d["score"] for d in line["detections"]]
    assert scores == sorted(scores, reverse=True)
    # The two verified products come first.
    assert {d["category"] for d in line["detections"][:2]} == set(PLACED)


def test_unreadable_photo_gives_an_error_line_and_draw_writes_a_png(label_index, tmp_path, capsys):
    index, photo = label_index
    broken = tmp_path / "broken.jpg"
    broken.write_text("nope")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{broken}\n")
    drawn = tmp_path / "drawn"
    assert main(["locate", str(photo), "--index", str(index), "--json", "--from-file", str(listing),
                 "--max", "1", "--draw", str(drawn)]) == 0
    captured = capsys.readouterr()
    first, second = (json.loads(line) for line in captured.out.splitlines())
    assert len(first["detections"]) == 1
    assert second == {"query": str(broken), "error": f"{broken}: not an image (unrecognised format)"}
    with Image.open(drawn / "two-products.boxes.png") as image:
        assert image.size == (760, 480)
    # Nothing readable at all: exit status 1.
    assert main(["locate", str(broken), "--index", str(index), "--json"]) == 1


def test_http_locate_returns_boxes_in_the_uploaded_photos_pixels(label_index):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    index, photo = label_index
    with TestClient(create_app(index, read_only=True)) as client:
        response = client.post("/locate", files={"image": ("two.png", photo.read_bytes(), "image/png")})
        assert response.status_code == 200, response.text
        body = response.json()
        boxes = {d["category"]: d["box"] for d in reversed(body["detections"])}
        assert all(iou(boxes[category], box) >= 0.7 for category, box in PLACED.items())
        assert body["detections"][0]["image_url"].startswith("/items/")
        assert client.post("/locate", files={"image": ("x.png", b"not an image", "image/png")}).status_code in (400, 415)


def test_windows_cover_the_photo_edges_at_every_scale():
    boxes = windows((1000, 700), (1.0, 0.5))
    assert (300, 0, 1000, 700) in boxes and (0, 0, 700, 700) in boxes
    assert max(b[2] for b in boxes if b[2] - b[0] == 350) == 1000
    assert max(b[3] for b in boxes if b[2] - b[0] == 350) == 700


def test_box_voting_averages_the_windows_that_agree_on_the_product():
    # A part of a product won NMS; the whole (0, 0, 60, 60) and a neighbouring part agree on the
    # same product almost as well. A far window of the product, an overlapping window preferring
    # another product and one scoring far less do not vote.
    boxes = [(0, 0, 40, 40), (0, 0, 60, 60), (20, 0, 60, 40), (200, 200, 240, 240), (10, 10, 50, 50), (0, 10, 40, 50)]
    best_product = np.array([0, 0, 0, 0, 1, 0])
    by_product = np.array([[0.9, 0.1], [0.85, 0.1], [0.82, 0.1], [0.9, 0.1], [0.5, 0.95], [0.6, 0.1]], np.float32)
    settings = LocateSettings(vote_tolerance=0.1, vote_iou=0.3)
    voted = voted_box(0, boxes, best_product, by_product, settings)
    weights = np.array([0.9, 0.85, 0.82])
    expected = weights @ np.array(boxes[:3], float) / weights.sum()
    assert np.allclose(voted, expected, atol=1e-4)
    assert voted[2] > 40 and iou(voted, (0, 0, 60, 60)) > iou(boxes[0], (0, 0, 60, 60))
    assert voted_box(0, boxes, best_product, by_product, LocateSettings(vote_tolerance=None)) == boxes[0]


def test_nms_drops_a_window_across_the_border_of_two_products_already_kept():
    # Two neighbouring products, each kept whole; a smaller window straddles their border,
    # half in each (IoU 0.17 and inside 0.5 with either, so no pairwise test drops it), and
    # prefers a third product. Nothing smaller lies inside it, so no part test can tell either.
    boxes = [(0, 0, 200, 200), (200, 0, 400, 200), (120, 50, 280, 150), (300, 300, 400, 400)]
    by_product = np.array([[0.8, 0.1, 0.1, 0.1], [0.1, 0.8, 0.1, 0.1], [0.2, 0.2, 0.6, 0.1],
                           [0.1, 0.1, 0.1, 0.55]], np.float32)
    size = (400, 400)
    assert suppress(boxes, by_product, size, LocateSettings(union_covered=0.6)) == [0, 1, 3]
    assert suppress(boxes, by_product, size, LocateSettings(union_covered=None)) == [0, 1, 2, 3]


def test_nms_drops_a_whole_window_whose_large_part_clearly_shows_another_product():
    # A 2x2 grid seen whole: the whole window (0) prefers product 0, and so do most of its parts,
    # the straddling ones included (1-3), so the majority test keeps it; but one quarter (4)
    # shows product 1 clearly, and product 0 not at all. Each quarter is then a product.
    boxes = [(0, 0, 400, 400), (0, 200, 200, 400), (100, 200, 300, 400), (0, 100, 200, 300), (0, 0, 200, 200),
             (200, 200, 400, 400)]
    by_product = np.array([[0.66, 0.2, 0.3], [0.7, 0.1, 0.2], [0.65, 0.2, 0.2], [0.6, 0.3, 0.2], [0.0, 0.7, 0.1],
                           [0.4, 0.1, 0.5]], np.float32)
    size = (400, 400)
    assert suppress(boxes, by_product, size, LocateSettings(part_veto=None))[0] == 0
    kept = suppress(boxes, by_product, size, LocateSettings(part_veto=0.3))
    assert 0 not in kept and {1, 4}.issubset(kept)


@pytest.mark.parametrize("cell", [200, 500])
def test_snapping_moves_a_box_to_the_border_of_its_product_and_to_the_photo_edge(cell):
    # A 2x2 flyer page of four textured photos (500 px cells: the borders are found on the page
    # reduced to 640 px). A third-of-the-page window inside the top-right cell (IoU 0.44 with it)
    # snaps to the cell: the border on its left, the page's edge above it. Over uniform noise,
    # with no border anywhere, the box stays as it is.
    rng = np.random.default_rng(0)
    page = np.zeros((2 * cell, 2 * cell, 3), np.uint8)
    for row, column in ((0, 0), (0, 1), (1, 0), (1, 1)):
        base = rng.integers(40, 215, 3)
        page[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell] = \
            np.clip(base + rng.normal(0, 12, (cell, cell, 3)), 0, 255)
    window = (round(4 * cell / 3), round(cell / 3), 2 * cell, cell)
    snapped = snap_box(window, PhotoEdges.of(Image.fromarray(page)), LocateSettings(snap_band=0.5))
    assert iou(window, (cell, 0, 2 * cell, cell)) < 0.5
    assert np.allclose(snapped, (cell, 0, 2 * cell, cell), atol=cell / 50)
    noise = Image.fromarray(np.clip(128 + rng.normal(0, 12, (2 * cell, 2 * cell, 3)), 0, 255).astype(np.uint8))
    inner = (0.75 * cell, 0.75 * cell, 1.25 * cell, 1.25 * cell)
    assert snap_box(inner, PhotoEdges.of(noise), LocateSettings(snap_band=0.5)) == inner
    assert snap_box(window, PhotoEdges.of(Image.fromarray(page)), LocateSettings(snap_band=None)) == window


def test_composites_are_deterministic_and_know_their_boxes(val_photos):
    from catalens.datasets.composites import grid, scatter

    first, again = grid(val_photos, 2, seed=3), grid(val_photos, 2, seed=3)
    assert [p.box for p in first.products] == [p.box for p in again.products]
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    cell = first.products[0].box[2]
    assert 300 <= cell <= 400 and first.image.size == (2 * cell, 2 * cell)
    assert len({p.category for p in first.products}) == 4
    placed = scatter(val_photos, 3, seed=1)
    boxes = [p.box for p in placed.products]
    assert len(boxes) == 3 and all(iou(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_a_region_is_renamed_by_the_classifier_over_its_box(label_index):
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.engine import SearchEngine
    from catalens.search.locate import _Candidate, classified

    index, photo = label_index
    catalog = open_catalog(index)
    try:
        records = {record.category: record for record in catalog.items.records().values()}
        # A window named Milk over the yoghurt: the crop of its box is what names it.
        wrong = _Candidate(records["Dairy/Milk"].key, 0.6, PLACED["Dairy/Yoghurt"], "region")
        renamed = classified(SearchEngine(catalog), Image.open(photo).convert("RGB"), [wrong])
    finally:
        catalog.close()
    assert len(renamed) == 1
    assert renamed[0].key == records["Dairy/Yoghurt"].key
    assert renamed[0].box == wrong.box and renamed[0].evidence == "region"
    assert 0.5 < renamed[0].score <= 1.0
    assert renamed[0].confidence is not None and 0.0 <= renamed[0].confidence <= 1.0


def test_a_region_clear_of_a_verified_boxs_inliers_is_kept_though_the_box_covers_it():
    from catalens.search.locate import _Candidate, merge

    # A verified box that is the catalog photo's loose frame: it spans two grid cells, while its
    # inliers lie in the right-hand one. The region on the left cell is another product; the one
    # over the inliers is the verified product again.
    verified = _Candidate(1, 2.0, (0, 0, 600, 300), "local", core=(380, 40, 460, 220))
    left, over = _Candidate(2, 0.7, (0, 0, 300, 300), "region"), _Candidate(3, 0.6, (300, 0, 600, 300), "region")
    assert [c.key for c in merge([verified], [left, over], LocateSettings())] == [1, 2]
    unknown = _Candidate(1, 2.0, (0, 0, 600, 300), "local")
    assert [c.key for c in merge([unknown], [left, over], LocateSettings())] == [1]


def test_the_classifier_overrules_a_verified_sibling_only_when_it_is_sure_of_another_leaf():
    # Leaf 1 verified (a sibling pack sharing the label's inliers); the crop says leaf 2.
    sure, unsure = np.array([0.1, 0.2, 0.7]), np.array([0.3, 0.25, 0.45])
    assert overruled(1, sure, 0.5) == 2
    assert overruled(1, unsure, 0.5) is None
    assert overruled(2, sure, 0.5) is None  # it agrees
    assert overruled(1, sure, None) is None  # switched off
    assert overruled(-1, sure, 0.5) == 2  # the verified item's leaf unknown to the classifier


def test_a_verified_box_is_disowned_only_when_the_classifier_all_but_rules_its_product_out():
    probabilities = np.array([0.01, 0.04, 0.95])
    assert disowned(0, probabilities, 0.05) and disowned(1, probabilities, 0.05)
    assert not disowned(2, probabilities, 0.05)
    assert not disowned(0, probabilities, None)  # switched off
    assert not disowned(-1, probabilities, 0.05)  # a product the classifier does not know
