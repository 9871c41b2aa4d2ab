"""The HTTP API over a real small index of grocery photos: every endpoint and the bad requests."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from catalens.datasets.catalog import CatalogItem

pytestmark = pytest.mark.slow

KEY = "test-key-123-456-789"
PER_CLASS = 10


def pick_small_catalog(catalog: list[CatalogItem], classes: int = 4, per_class: int = PER_CLASS) -> list[CatalogItem]:
    """``per_class`` items of ``classes`` fine classes, each from a different top/coarse branch."""
    by_category: dict[str, list[CatalogItem]] = {}
    for item in catalog:
        by_category.setdefault(item.category, []).append(item)
    chosen, seen_coarse = [], set()
    for category in sorted(by_category):
        coarse = "/".join(category.split("/")[:2])
        if coarse in seen_coarse or len(by_category[category]) < per_class:
            continue
        seen_coarse.add(coarse)
        chosen.append(category)
        if len(chosen) == classes:
            break
    return [item for category in chosen for item in by_category[category][:per_class]]


def build_small_index(catalog: list[CatalogItem], folder: Path, classes: int = 4) -> tuple[Path, list[CatalogItem]]:
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog
    from tests.conftest import refit_index

    items = pick_small_catalog(catalog, classes)
    report = index_catalog(items, folder / "index", IndexConfig(), progress=False)
    assert not report.failures, report.failures[:3]
    refit_index(folder / "index")
    return folder / "index", items


@pytest.fixture(scope="module")
def small_index(grocery_catalog, tmp_path_factory):
    return build_small_index(grocery_catalog, tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def client(small_index):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    with TestClient(create_app(small_index[0], api_key=KEY)) as client:
        yield client


@pytest.fixture(scope="module")
def class_queries(small_index, val_photos):
    """One val photo (never in the catalog) per indexed class."""
    categories = sorted({item.category for item in small_index[1]})
    return {category: next(photo.path for photo in val_photos if photo.category == category) for category in categories}


def upload(path: Path | bytes, name: str = "photo.jpg", content_type: str = "image/jpeg") -> dict:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return {"image": (name, data, content_type)}


def jpeg_bytes(colour=(200, 30, 30), size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


# --- read endpoints


def test_health_and_stats_describe_the_open_index(client, small_index):
    assert client.get("/health").json() == {"status": "ok", "items": len(small_index[1])}
    stats = client.get("/stats").json()
    assert stats["items"] == len(small_index[1])
    assert stats["categories"] == 4
    assert "deep" in stats["modes"] and stats["default_mode"] in stats["modes"]
    assert stats["dims"]["deep"] > 0
    assert stats["features"] == {"classify": True, "anomaly": False, "explain": True}  # no autoencoder trained
    assert stats["modes"][0] == stats["default_mode"] == "fused" and "ae" not in stats["modes"]
    assert stats["read_only"] is False


def test_search_finds_the_catalog_photo_itself_first_with_an_image_url(client, small_index):
    item = small_index[1][7]
    response = client.post("/search", files=upload(item.image), data={"k": "5", "mode": "deep"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "deep" and body["k"] == 5
    assert len(body["results"]) == 5
    top = body["results"][0]
    assert top["id"] == item.id and top["score"] > 0.99
    assert top["category"] == item.category and top["title"] == item.title
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    # Calibrated confidence, and the verdict: the top id or null ("no confident match").
    assert all(0 <= hit["confidence"] <= 1 for hit in body["results"])
    assert "match" in body and body["match"] in (None, top["id"])
    image = client.get(top["image_url"])
    assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
    assert Image.open(io.BytesIO(image.content)).size == Image.open(item.image).size
    thumbnail = client.get(top["image_url"], params={"size": 64})
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 64


def test_search_of_unseen_photos_ranks_their_class_first(client, class_queries):
    correct = 0
    for category, path in class_queries.items():
        body = client.post("/search", files=upload(path), data={"k": "3"}).json()
        correct += body["results"][0]["category"] == category
    assert correct >= len(class_queries) - 1, f"{correct}/{len(class_queries)} top-1 correct"


def test_search_category_filter_keeps_only_that_branch(client, small_index, class_queries):
    category = sorted(class_queries)[1]
    branch = category.split("/")[0]
    other_photo = class_queries[sorted(class_queries)[0]]
    body = client.post("/search", files=upload(other_photo), data={"k": "20", "category": branch + "/"}).json()
    assert body["category"] == branch
    expected = sum(item.category.startswith(branch + "/") for item in small_index[1])
    assert len(body["results"]) == min(20, expected)
    assert all(hit["category"].startswith(branch + "/") for hit in body["results"])
    unknown = client.post("/search", files=upload(other_photo), data={"category": branch + "/No/Such/Branch"})
    assert unknown.status_code == 422
    assert unknown.json()["detail"].startswith(f"category '{branch}/No/Such/Branch' is not in this index; did you mean")


def test_every_mode_of_the_index_answers_and_others_say_why_not(client, small_index):
    item = small_index[1][3]
    for mode in client.get("/stats").json()["modes"]:
        response = client.post("/search", files=upload(item.image), data={"k": "3", "mode": mode})
        assert response.status_code == 200, (mode, response.text)
        assert response.json()["results"][0]["id"] == item.id, mode
    response = client.post("/search", files=upload(item.image), data={"mode": "ae"})
    assert response.status_code == 422 and "run 'catalens train-ae' first" in response.json()["detail"]


def test_fused_weights_are_settable_per_request(client, small_index):
    item = small_index[1][3]
    deep_only = client.post("/search", files=upload(item.image), data={"k": "1", "weights": '{"deep": 1}'})
    assert deep_only.status_code == 200, deep_only.text
    # Its own deep cosine (1) plus a tenth of its product's other photos' (product_weight 0.1).
    own = deep_only.json()["results"][0]
    assert own["id"] == item.id and 1.0 - 1e-3 <= own["score"] <= 1.4
    boosted = client.post("/search", files=upload(item.image), data={"k": "1", "weights": '{"deep": 1, "sift": 1}'})
    assert boosted.json()["results"][0]["score"] > own["score"] + 0.5  # plus its own keypoints, verified
    for bad in ('{"texture": 1}', "not json", '{"deep": "a lot"}'):
        response = client.post("/search", files=upload(item.image), data={"weights": bad})
        assert response.status_code == 422 and response.json()["detail"].startswith("weights:"), bad


def test_get_item_returns_its_record_and_unknown_ids_are_404(client, small_index):
    item = small_index[1][0]
    body = client.get(f"/items/{item.id}").json()
    assert body["id"] == item.id and body["category"] == item.category and body["attributes"] == item.attributes
    for path in ("/items/no-such-item", "/items/no-such-item/image"):
        response = client.get(path)
        assert response.status_code == 404 and "no-such-item" in response.json()["detail"]


def test_page_and_openapi_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="grid"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/search", "/classify", "/anomaly", "/items", "/items/{item_id}", "/stats", "/health"):
        assert path in paths, path
    for page in ("/docs", "/redoc"):  # their scripts come from this server, not a CDN
        html = client.get(page).text
        assert "/docs-static/" in html and "cdn." not in html, page


# --- classification, anomaly scores (a clear 503 before the model exists), explanations


def test_classify_proposes_a_category_path(client, class_queries):
    category, path = sorted(class_queries.items())[0]
    response = client.post("/classify", files=upload(path))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["category"].split("/")[0] == category.split("/")[0]
    assert body["levels"] and 0 <= body["levels"][0]["confidence"] <= 1


def test_anomaly_without_a_trained_autoencoder_is_a_503_that_says_what_to_run(client, class_queries):
    path = next(iter(class_queries.values()))
    response = client.post("/anomaly", files=upload(path))
    assert response.status_code == 503, response.text
    assert "train-ae" in response.json()["detail"]


def test_explain_draws_matched_keypoints_for_local_modes(client, small_index):
    item = small_index[1][5]
    deep = client.post("/explain", files=upload(item.image), data={"id": item.id, "mode": "deep"})
    assert deep.status_code == 422
    mode = "fused"
    response = client.post("/explain", files=upload(item.image), data={"id": item.id, "mode": mode, "k": "3"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("image/")
    assert Image.open(io.BytesIO(response.content)).width > 0
    missing = client.post("/explain", files=upload(item.image), data={"id": "not-a-result", "mode": mode})
    assert missing.status_code == 404


# --- bad requests


def test_search_without_a_file_is_a_422_with_a_detail(client):
    response = client.post("/search", data={"k": "3"})
    assert response.status_code == 422
    assert "image" in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    ("payload", "content_type", "status"),
    [
        (b"just some text", "text/plain", 415),
        (b"GIF89a-but-not-really", "image/gif", 415),
        (jpeg_bytes()[:200], "image/jpeg", 400),
        (b"", "image/jpeg", 400),
    ],
    ids=["text", "garbage-bytes", "truncated-jpeg", "empty"],
)
def test_uploads_that_are_not_usable_images_get_clear_4xx(client, payload, content_type, status):
    response = client.post("/search", files=upload(payload, content_type=content_type))
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_oversized_upload_is_refused_with_413(client):
    state = client.app.state.catalens
    limit = state.max_upload_bytes
    state.max_upload_bytes = 1000
    try:
        response = client.post("/search", files=upload(jpeg_bytes(size=(400, 400))))
    finally:
        state.max_upload_bytes = limit
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_decompression_bomb_is_refused_with_413(client):
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")  # ~20 KB that decodes to 144 Mpx
    assert len(buffer.getvalue()) < 100_000
    response = client.post("/search", files=upload(buffer.getvalue(), "bomb.png", "image/png"))
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]


@pytest.mark.parametrize(("field", "value"), [("mode", "telepathy"), ("k", "0"), ("k", "1000"), ("k", "many")])
def test_bad_search_parameters_are_422(client, small_index, field, value):
    response = client.post("/search", files=upload(small_index[1][0].image), data={field: value})
    assert response.status_code == 422, response.text


# --- writes


def test_writes_need_the_right_api_key(client, small_index):
    files = upload(small_index[1][0].image)
    assert client.post("/items", files=files, data={"id": "x"}).status_code == 401
    assert client.post("/items", files=files, data={"id": "x"}, headers={"X-API-Key": "wrong"}).status_code == 401
    response = client.delete(f"/items/{small_index[1][0].id}", headers={"X-API-Key": "wrong"})
    assert response.status_code == 401 and "API key" in response.json()["detail"]
    assert client.get(f"/items/{small_index[1][0].id}").status_code == 200


def test_read_only_server_refuses_writes_and_needs_no_key(small_index, monkeypatch):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    monkeypatch.delenv("CATALENS_API_KEY", raising=False)
    with pytest.raises(ValueError, match="CATALENS_API_KEY"):
        create_app(small_index[0])
    with TestClient(create_app(small_index[0], read_only=True)) as client:
        files = upload(small_index[1][0].image)
        response = client.post("/items", files=files, data={"id": "x"}, headers={"X-API-Key": KEY})
        assert response.status_code == 403 and "read-only" in response.json()["detail"]
        assert client.delete(f"/items/{small_index[1][0].id}").status_code == 403
        assert client.get("/stats").json()["read_only"] is True


def test_serve_refuses_to_start_with_writes_and_no_key(small_index, monkeypatch, capsys):
    from catalens.api.cli import main

    monkeypatch.delenv("CATALENS_API_KEY", raising=False)
    assert main(["serve", "--index", str(small_index[0])]) == 2
    assert "CATALENS_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("data", "fragment"),
    [({"id": "  "}, "id"), ({"id": "ok", "attributes": "{not json"}, "JSON"), ({"id": "ok", "attributes": "[1]"}, "object")],
)
def test_bad_item_fields_are_422(client, small_index, data, fragment):
    response = client.post("/items", files=upload(small_index[1][0].image), data=data, headers={"X-API-Key": KEY})
    assert response.status_code == 422 and fragment in response.json()["detail"]


def test_add_replace_and_delete_an_item_update_search_durably(client, small_index, class_queries):
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.engine import SearchEngine

    headers = {"X-API-Key": KEY}
    first, second = list(class_queries.values())[:2]
    root = small_index[0]
    count = len(small_index[1])

    added = client.post(
        "/items", files=upload(first), headers=headers,
        data={"id": "shop/sku-1", "category": "/Test/New/", "title": "Fresh item", "attributes": '{"sku": 1}'},
    )
    assert added.status_code == 200, added.text
    assert added.json()["status"] == "added"
    item = client.get("/items/shop/sku-1").json()
    assert item == {"id": "shop/sku-1", "category": "Test/New", "title": "Fresh item", "attributes": {"sku": 1},
                    "image_url": "/items/shop%2Fsku-1/image"}
    assert client.get(item["image_url"]).content == Path(first).read_bytes()
    top = client.post("/search", files=upload(first), data={"k": "1", "mode": "deep"}).json()["results"][0]
    assert top["id"] == "shop/sku-1" and top["score"] > 0.99
    assert client.get("/health").json()["items"] == count + 1

    replaced = client.post("/items", files=upload(second), headers=headers, data={"id": "shop/sku-1", "category": "Test/New"})
    assert replaced.json()["status"] == "updated"
    top = client.post("/search", files=upload(second), data={"k": "1", "mode": "deep"}).json()["results"][0]
    assert top["id"] == "shop/sku-1"
    old = client.post("/search", files=upload(first), data={"k": "3", "mode": "deep"}).json()["results"]
    assert all(hit["score"] < 0.99 for hit in old), "the replaced photo is still indexed"
    uploads = list((root / "uploads").iterdir())
    assert len(uploads) == 1, "the replaced upload was not cleaned up"

    retitled = client.post("/items", files=upload(second), headers=headers, data={"id": "shop/sku-1", "title": "Renamed"})
    assert retitled.json()["status"] == "metadata_updated"

    # What the server wrote is on disk: a fresh process opening the index finds the item.
    fresh = open_catalog(root)
    try:
        hit = SearchEngine(fresh).search([second], k=1, mode="deep")[0].results[0]
        assert hit.id == "shop/sku-1" and hit.title == "Renamed"
    finally:
        fresh.close()

    deleted = client.delete("/items/shop/sku-1", headers=headers)
    assert deleted.status_code == 200 and deleted.json() == {"removed": "shop/sku-1"}
    assert client.get("/items/shop/sku-1").status_code == 404
    assert client.delete("/items/shop/sku-1", headers=headers).status_code == 404
    hits = client.post("/search", files=upload(second), data={"k": "10"}).json()["results"]
    assert "shop/sku-1" not in {hit["id"] for hit in hits}
    assert client.get("/health").json()["items"] == count
    assert not list((root / "uploads").iterdir())
    fresh = open_catalog(root)
    try:
        assert fresh.items.item_by_id("shop/sku-1") is None
        assert "shop/sku-1" not in {h.id for h in SearchEngine(fresh).search([second], k=5, mode="deep")[0].results}
    finally:
        fresh.close()


def test_a_non_image_item_upload_is_refused_and_nothing_is_written(client, small_index):
    response = client.post(
        "/items", files=upload(b"%PDF-1.4 not a photo", "sheet.pdf", "application/pdf"),
        data={"id": "bad"}, headers={"X-API-Key": KEY},
    )
    assert response.status_code == 415
    assert client.get("/items/bad").status_code == 404


# --- concurrency


def test_a_slow_search_does_not_block_other_requests(client, small_index, monkeypatch):
    engine = client.app.state.catalens.service.engine
    release, entered = threading.Event(), threading.Event()
    original = engine.search

    def slow_search(*args, **kwargs):
        entered.set()
        release.wait(timeout=20)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "search", slow_search)
    outcome = {}
    worker = threading.Thread(
        target=lambda: outcome.setdefault("status", client.post("/search", files=upload(small_index[1][0].image)).status_code)
    )
    worker.start()
    try:
        assert entered.wait(timeout=20)
        started = time.perf_counter()
        assert client.get("/health").status_code == 200
        assert client.get(f"/items/{small_index[1][1].id}").status_code == 200
        elapsed = time.perf_counter() - started
    finally:
        release.set()
        worker.join(timeout=60)
    assert elapsed < 5, f"other requests waited {elapsed:.1f}s behind a search"
    assert outcome["status"] == 200


def test_searches_during_writes_always_see_a_whole_index(client, small_index, class_queries):
    """Readers racing an add and a delete get complete answers whose every hit still resolves."""
    headers = {"X-API-Key": KEY}
    photo = list(class_queries.values())[2]
    failures: list[str] = []

    def reader():
        for _ in range(3):
            response = client.post("/search", files=upload(photo), data={"k": "5", "mode": "deep"})
            if response.status_code != 200:
                failures.append(response.text)
                continue
            results = response.json()["results"]
            if len(results) != 5:
                failures.append(f"{len(results)} results")

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    for round_ in range(2):
        response = client.post("/items", files=upload(photo), data={"id": f"race-{round_}"}, headers=headers)
        assert response.status_code == 200, response.text
        assert client.delete(f"/items/race-{round_}", headers=headers).status_code == 200
    for thread in readers:
        thread.join(timeout=120)
    assert not failures, failures[:3]
    assert client.get("/health").json()["items"] == len(small_index[1])
