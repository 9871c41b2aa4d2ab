"""One decode budget for every path (issue 35, rows 3-6): JPEGs of thousands of scans, progressive
JPEGs counted at their full-size coefficients, strip images the features would scale up to
gigabytes, and thumbnails and explanations decoded within the shared budget. Every hostile file
is generated here."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalens.indexer import imageio
from catalens.indexer.imageio import ImageDecodeError, jpeg_layout, load_query, load_rgb
from tests.conftest import draw_product

KEY = "decode-limits-key-0123456"
# A refinement scan with no data: 10 bytes that make libjpeg walk every block once more.
EMPTY_SCAN = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x10"


def jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def with_empty_scans(data: bytes, scans: int) -> bytes:
    """A progressive grey JPEG with ``scans`` empty refinement scans before its end marker."""
    return data[:-2] + EMPTY_SCAN * scans + b"\xff\xd9"


@pytest.fixture()
def index(synthetic_index, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic_index[0], tmp_path / "index"))


@pytest.fixture()
def client(index):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    with TestClient(create_app(index, api_key=KEY, max_upload_bytes=400_000)) as client:
        yield client


# --- row 3: scans


def test_a_jpeg_of_thousands_of_empty_scans_is_refused_before_decoding():
    data = with_empty_scans(jpeg(np.zeros((640, 600), np.uint8), progressive=True), 3000)
    assert jpeg_layout(data).scans > imageio.MAX_JPEG_SCANS
    with pytest.raises(ImageDecodeError, match="too many scans"):
        load_query(data)


def test_a_jpeg_at_the_scan_limit_still_decodes():
    base = jpeg(np.zeros((64, 64), np.uint8), progressive=True)
    data = with_empty_scans(base, imageio.MAX_JPEG_SCANS - jpeg_layout(base).scans)
    assert jpeg_layout(data).scans == imageio.MAX_JPEG_SCANS
    assert load_query(data).size == (64, 64)


def test_a_search_with_a_jpeg_of_thousands_of_scans_is_a_422_that_says_why(client):
    data = with_empty_scans(jpeg(np.zeros((640, 600), np.uint8), progressive=True), 3000)
    response = client.post("/search", files={"image": ("scans.jpg", data, "image/jpeg")})
    assert response.status_code == 422 and "too many scans" in response.json()["detail"]


# --- row 5: progressive JPEGs at their true cost


@pytest.mark.parametrize("subsampling, blocks", [(0, 3 * 125 * 125), (2, 126 * 126 + 2 * 63 * 63)])
def test_a_progressive_jpeg_counts_every_coefficient_of_its_full_size(subsampling, blocks):
    layout = jpeg_layout(jpeg(np.zeros((1000, 1000, 3), np.uint8), progressive=True, subsampling=subsampling))
    assert layout.progressive and layout.buffered and layout.scans == 10
    assert layout.coefficient_bytes == blocks * 64 * 2


def test_a_progressive_jpeg_over_the_byte_limit_is_refused_though_its_draft_is_small(monkeypatch):
    monkeypatch.setattr(imageio, "QUERY_MAX_DECODE_BYTES", 16 * 2**20)
    array = np.zeros((2000, 2000, 3), np.uint8)
    array[::40] = 200
    # 24 MB of coefficients held at full size; the draft it decodes to is 1000x1000 (4 MB).
    with pytest.raises(ImageDecodeError, match="too large.*progressive JPEG"):
        load_query(jpeg(array, progressive=True, subsampling=0))
    assert load_query(jpeg(array, subsampling=0)).size == (1000, 1000)  # a baseline one decodes at its draft


def test_normal_progressive_and_baseline_photos_decode_as_before(grocery):
    photo = next(grocery.rglob("*.jpg"))
    baseline = load_rgb(photo)
    progressive = io.BytesIO()
    baseline.save(progressive, "JPEG", progressive=True, quality=95)
    assert load_rgb(progressive.getvalue()).size == baseline.size == Image.open(photo).size
    assert not jpeg_layout(photo.read_bytes()).buffered


# --- row 4: strips


@pytest.mark.parametrize("size", [(6000, 1), (1, 3000), (100_000, 1), (650, 10)])
def test_a_strip_image_is_refused_naming_the_file_and_the_reason(tmp_path, size):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (90, 20, 20)).save(path)
    with pytest.raises(ImageDecodeError, match=rf"strip.png: image too elongated \({size[0]}x{size[1]}"):
        load_rgb(path)


def test_a_strip_at_the_aspect_limit_is_accepted_and_its_features_stay_small():
    from catalens.indexer.features.colour import ColourPreparer

    image = load_query(png(np.full((10, 10 * imageio.MAX_ASPECT_RATIO, 3), 90, np.uint8)))
    assert image.size == (640, 10)
    assert ColourPreparer()(image).shape == (192,)


def test_indexing_reports_a_strip_as_a_failure_and_prepares_the_rest(tmp_path):
    from catalens.indexer.features.colour import ColourPreparer
    from catalens.indexer.features.decode import iter_prepared

    strip, product = tmp_path / "strip.png", draw_product(tmp_path / "product.jpg", seed=3)
    Image.new("L", (6000, 1), 40).save(strip)
    (batch,) = iter_prepared([strip, product], {"colour": ColourPreparer()}, num_workers=0)
    assert batch.positions == [1] and "strip.png: image too elongated (6000x1" in batch.errors[0]


@pytest.mark.parametrize("route", ["/search", "/items"])
def test_a_strip_upload_is_a_422_and_nothing_is_stored(client, route):
    before = client.get("/stats").json()
    response = client.post(route, files={"image": ("strip.png", png(np.zeros((1, 6000, 3), np.uint8)), "image/png")},
                           data={"id": "strip"}, headers={"X-API-Key": KEY})
    assert response.status_code == 422 and "too elongated (6000x1" in response.json()["detail"]
    assert client.get("/stats").json() == before


# --- row 6: thumbnails and explanations


@pytest.fixture()
def decodes(monkeypatch) -> list[tuple[str, object]]:
    """What each decode of the process reserved from the shared budget and converted to RGB."""
    seen: list[tuple[str, object]] = []
    reserve, to_rgb = imageio.QUERY_DECODE_BUDGET.reserve, imageio._to_rgb

    def spy_reserve(nbytes):
        seen.append(("reserved", nbytes))
        return reserve(nbytes)

    def spy_to_rgb(image):
        seen.append(("converted", image.size))
        return to_rgb(image)

    monkeypatch.setattr(imageio.QUERY_DECODE_BUDGET, "reserve", spy_reserve)
    monkeypatch.setattr(imageio, "_to_rgb", spy_to_rgb)
    return seen


def large_cut_out(side: int = 2400) -> bytes:
    """A product on a transparent band, 2400 px a side: 22 MiB decoded, a PNG of a few kB."""
    product = Image.new("RGB", (64, 64), (200, 180, 40))
    product.paste((20, 60, 160), (8, 8, 40, 30))
    product.paste((150, 20, 20), (30, 36, 60, 58))
    array = np.zeros((side, side, 4), np.uint8)
    array[..., :3] = np.asarray(product.resize((side, side), Image.NEAREST))
    array[..., 3] = 255
    array[: side // 8, :, 3] = 0
    return png(array, "RGBA")


def every_decode_was_reduced_and_reserved(seen) -> None:
    converted = [size for kind, size in seen if kind == "converted"]
    assert converted and all(max(size) <= imageio.QUERY_MAX_SIDE for size in converted), converted
    assert len([kind for kind, _ in seen if kind == "reserved"]) == len(converted), seen


def test_a_thumbnail_of_a_large_catalog_image_is_decoded_reduced_within_the_budget(client, decodes):
    added = client.post("/items", files={"image": ("cut-out.png", large_cut_out(), "image/png")},
                        data={"id": "cut-out"}, headers={"X-API-Key": KEY})
    assert added.status_code == 200, added.text
    decodes.clear()
    response = client.get("/items/cut-out/image", params={"size": 16})
    assert response.status_code == 200 and max(Image.open(io.BytesIO(response.content)).size) == 16
    every_decode_was_reduced_and_reserved(decodes)


def test_an_explanation_decodes_the_result_reduced_within_the_budget(client, decodes):
    image = large_cut_out()
    added = client.post("/items", files={"image": ("cut-out.png", image, "image/png")},
                        data={"id": "cut-out"}, headers={"X-API-Key": KEY})
    assert added.status_code == 200, added.text
    decodes.clear()
    response = client.post("/explain", files={"image": ("q.png", image, "image/png")},
                           data={"id": "cut-out", "mode": "fused", "k": "3"})
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).height > 300
    every_decode_was_reduced_and_reserved(decodes)


def test_an_explanation_of_a_wide_photo_draws_panels_of_bounded_width():
    from catalens.search.explain import draw_matches

    wide, square = Image.new("RGB", (64 * 10, 10), (20, 90, 20)), Image.new("RGB", (300, 300))
    canvas = draw_matches(wide, square, np.array([[600.0, 5.0]]), np.array([[150.0, 150.0]]), "wide")
    assert canvas.shape[1] <= 4 * 360 + 360  # 23,040 px wide when the panel kept the full height
