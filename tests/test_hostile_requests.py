"""Hostile uploads and requests against the HTTP API (issue 16): bodies over the limit in every
transfer encoding, writes without the key, images that decode to far more bytes than they
weigh, ids that routes could confuse, orphan uploads and the key's length."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

KEY = "hostile-requests-key-0123"


@pytest.fixture()
def index(synthetic_index, tmp_path) -> Path:
    return Path(shutil.copytree(synthetic_index[0], tmp_path / "index"))


@pytest.fixture()
def app(index):
    from catalens.api.http.app import create_app

    return create_app(index, api_key=KEY, max_upload_bytes=200_000)


@pytest.fixture()
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield client


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def call_asgi(app, method: str, path: str, headers: dict[str, str], chunks: int, chunk_bytes: int = 65536):
    """Send a body of ``chunks`` chunks without a Content-Length (as chunked transfer arrives) to
    the app; returns (status, body, how many chunks the app pulled)."""
    pulled = 0
    answer: dict = {"body": b""}

    async def receive():
        nonlocal pulled
        if pulled >= chunks:
            return {"type": "http.disconnect"}
        pulled += 1
        head = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n") if pulled == 1 else b""
        return {"type": "http.request", "body": head + b"x" * chunk_bytes, "more_body": pulled < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("testserver", 80), "client": ("127.0.0.1", 1),
             "headers": [(k.lower().encode(), v.encode()) for k, v in
                         {"content-type": "multipart/form-data; boundary=xyz", "transfer-encoding": "chunked",
                          **headers}.items()]}
    asyncio.run(app(scope, receive, send))
    return answer["status"], answer["body"], pulled


def test_a_chunked_body_over_the_limit_is_cut_off_at_the_limit_with_413(app):
    # 1,600 chunks of 64 KiB = 100 MiB offered; the limit is 200 kB plus 1 MiB of form overhead.
    status, body, pulled = call_asgi(app, "POST", "/search", {}, chunks=1600)
    assert status == 413 and b"upload limit" in body
    assert pulled * 65536 <= 200_000 + 1024 * 1024 + 65536


def test_a_write_without_the_key_is_refused_before_its_body_is_read(app):
    status, _, pulled = call_asgi(app, "POST", "/items", {}, chunks=4800)  # 300 MiB offered
    assert status == 401 and pulled == 0
    status, _, pulled = call_asgi(app, "POST", "/items", {"x-api-key": "wrong-but-long-enough-key"}, chunks=4800)
    assert status == 401 and pulled == 0


def test_a_declared_length_over_the_limit_is_refused_unread(client):
    response = client.post("/search", content=b"x" * 1_300_000, headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413


def test_a_16_bit_png_is_reduced_before_any_float_copy_and_answered(client):
    array = np.zeros((3000, 3000), np.uint16)
    array[::40] = 50_000
    response = client.post("/search", files={"image": ("deep.png", png_bytes(array), "image/png")})
    assert response.status_code == 200, response.text


def test_an_image_whose_decoded_bytes_exceed_the_budget_is_413(client, monkeypatch):
    import catalens.indexer.imageio as imageio

    monkeypatch.setattr(imageio, "QUERY_MAX_DECODE_BYTES", 1_000_000)
    rgba = np.zeros((600, 600, 4), np.uint8)  # 360k pixels, 1.44 MB decoded
    response = client.post("/search", files={"image": ("cut-out.png", png_bytes(rgba, "RGBA"), "image/png")})
    assert response.status_code == 413 and "MiB decoded" in response.json()["detail"]


def test_large_queries_of_every_mode_decode_to_a_reduced_rgb_image():
    from catalens.indexer.imageio import QUERY_MAX_SIDE, load_query

    side = QUERY_MAX_SIDE * 2 + 10
    for array, mode in [(np.zeros((side, 40), np.uint16), None), (np.zeros((side, 40), np.float32), "F"),
                        (np.zeros((side, 40, 4), np.uint8), "RGBA"), (np.zeros((side, 40), np.uint8), "P")]:
        buffer = io.BytesIO()
        Image.fromarray(array, mode).save(buffer, format="TIFF" if mode == "F" else "PNG")
        image = load_query(buffer.getvalue())
        assert image.mode == "RGB" and max(image.size) <= QUERY_MAX_SIDE, (mode, image.size)


def test_an_id_with_a_slash_is_reached_and_not_confused_with_an_image_route(client):
    headers = {"X-API-Key": KEY}
    for item_id, seed in (("c", 1), ("c/image", 2)):
        response = client.post("/items", files={"image": ("p.jpg", jpeg_bytes(seed), "image/jpeg")},
                               data={"id": item_id}, headers=headers)
        assert response.status_code == 200, response.text
    assert client.get("/items/c%2Fimage").json()["id"] == "c/image"
    assert client.get("/items/c").json()["id"] == "c"
    assert client.get("/items/c/image").headers["content-type"].startswith("image/")
    assert client.get("/items/c%2Fimage/image").headers["content-type"].startswith("image/")
    assert client.delete("/items/c%2Fimage", headers=headers).json()["removed"] == "c/image"
    assert client.get("/items/c").status_code == 200


@pytest.mark.parametrize("item_id", ["a\nb", "tab\there", "../up", "nul\x00"])
def test_ids_the_catalog_readers_refuse_are_refused_over_http_too(client, item_id):
    response = client.post("/items", files={"image": ("p.jpg", jpeg_bytes(), "image/jpeg")},
                           data={"id": item_id}, headers={"X-API-Key": KEY})
    assert response.status_code == 422


@pytest.mark.parametrize("key", [" ", " " * 40, "short-key", "a b c d e f g h i j k l m n o"])
def test_a_key_shorter_than_16_non_blank_characters_is_refused(index, key):
    from catalens.api.http.app import create_app

    with pytest.raises(ValueError, match="16 characters"):
        create_app(index, api_key=key)


def test_serve_refuses_a_blank_key_in_one_line(index, monkeypatch, capsys):
    from catalens.api.cli import main

    monkeypatch.setenv("CATALENS_API_KEY", " ")
    assert main(["serve", "--index", str(index)]) == 2
    assert "16 characters" in capsys.readouterr().err


def test_orphan_uploads_are_removed_at_start_and_used_ones_kept(index):
    from fastapi.testclient import TestClient

    from catalens.api.http.app import create_app

    with TestClient(create_app(index, api_key=KEY)) as client:
        response = client.post("/items", files={"image": ("p.jpg", jpeg_bytes(5), "image/jpeg")},
                               data={"id": "kept"}, headers={"X-API-Key": KEY})
        assert response.status_code == 200
    uploads = index / "uploads"
    kept = list(uploads.iterdir())
    (uploads / "0123456789ab-deadbeef.jpg").write_bytes(jpeg_bytes(6))  # killed before its item committed
    (uploads / "0123456789ab-deadbeef.part").write_bytes(b"half")     # killed while saving
    with TestClient(create_app(index, api_key=KEY)):  # a restart, shut down as a server is
        pass
    assert sorted(uploads.iterdir()) == kept


def test_http_writes_append_to_one_log_a_day(client, index):
    for n in range(3):
        response = client.post("/items", files={"image": ("p.jpg", jpeg_bytes(n), "image/jpeg")},
                               data={"id": f"logged-{n}"}, headers={"X-API-Key": KEY})
        assert response.status_code == 200
    assert len(list((index / "logs").iterdir())) == 1


def test_serve_refuses_to_start_when_the_backbone_weights_are_missing(index, monkeypatch, capsys, tmp_path):
    import json

    import torch

    from catalens.api.cli import main

    meta = json.loads((index / "catalens.json").read_text())
    meta["config"]["backbone"] = "resnet50"  # torchvision weights: not on this machine here
    (index / "catalens.json").write_text(json.dumps(meta))
    monkeypatch.setenv("CATALENS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert main(["serve", "--index", str(index), "--read-only"]) == 2
    err = capsys.readouterr().err
    assert "resnet50" in err and len(err.strip().splitlines()) == 1


# --- issue 35: bounded work per request, refused formats, Unicode hygiene, headers, slow clients


def eps_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "EPS")  # PostScript, written without Ghostscript
    return buffer.getvalue()


@pytest.mark.parametrize("path", ["/search", "/explain"])
def test_a_category_of_thousands_of_levels_is_refused_at_once_without_an_image(client, path):
    import time

    started = time.perf_counter()
    response = client.post(path, data={"category": "zz/" * 40_000 + "zz", "id": "x"})
    assert response.status_code == 422 and "at most" in response.json()["detail"], response.text
    assert time.perf_counter() - started < 2
    response = client.post(path, data={"category": "zz/" * 33 + "zz", "id": "x"})
    assert response.status_code == 422 and "34 levels" in response.json()["detail"]


@pytest.mark.parametrize("category", ["\\", "/", "//", " / \\ "])
def test_a_category_with_no_level_is_422_not_an_unfiltered_search(client, category):
    response = client.post("/search", files={"image": ("p.jpg", jpeg_bytes(), "image/jpeg")}, data={"category": category})
    assert response.status_code == 422 and "no category level" in response.json()["detail"]


def test_a_blank_category_field_still_means_no_filter(client):
    response = client.post("/search", files={"image": ("p.jpg", jpeg_bytes(), "image/jpeg")}, data={"category": " "})
    assert response.status_code == 200, response.text


def test_the_cli_refuses_a_category_past_the_caps_or_with_no_level_in_one_line(index, synthetic_index, capsys):
    from catalens.api.cli import main

    photo = next(synthetic_index[1].rglob("*.jpg"))
    for category in ("zz/" * 40_000 + "zz", "/"):
        assert main(["search", str(photo), "--index", str(index), "--category", category]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("at most" in err or "no category level" in err), err


@pytest.mark.parametrize("weights", ['{"deep": NaN}', '{"deep": Infinity}', '{"deep": 1e308}', '{"deep": -1}',
                                     '{"deep": 0, "colour": 0}', "{}"])
def test_weights_that_rank_nothing_or_invert_the_ranking_are_422(client, weights):
    response = client.post("/search", files={"image": ("p.jpg", jpeg_bytes(), "image/jpeg")}, data={"weights": weights})
    assert response.status_code == 422 and response.json()["detail"].startswith("weights:"), response.text


def test_weights_from_the_environment_that_rank_nothing_are_a_config_error(monkeypatch):
    from catalens.indexer.config import ConfigError
    from catalens.search.settings import load_search_settings

    for value in ('{"deep": NaN}', '{"deep": -0.5}', '{"deep": 0}'):
        monkeypatch.setenv("CATALENS_SEARCH_WEIGHTS", value)
        with pytest.raises(ConfigError, match="CATALENS_SEARCH_WEIGHTS: weights"):
            load_search_settings()


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[[[1]]]", '{"deep":' * 50_000 + "1" + "}" * 50_000,
                                  '{"deep": [[1]]}', '{"deep": 1, "pad": "' + "x" * 5000 + '"}'])
def test_weights_nested_too_deeply_or_too_large_are_422(client, text):
    response = client.post("/search", data={"weights": text})
    assert response.status_code == 422 and response.json()["detail"].startswith("weights:"), response.text[:200]


@pytest.mark.parametrize("attributes", ["[" * 200_000 + "]" * 200_000, '{"a":' * 50_000 + "1" + "}" * 50_000,
                                        '{"a":' * 17 + "1" + "}" * 17, '{"notes": "' + "x" * 70_000 + '"}'])
def test_attributes_nested_too_deeply_or_too_large_are_422(client, attributes):
    response = client.post("/items", files={"image": ("p.jpg", jpeg_bytes(), "image/jpeg")},
                           data={"id": "deep", "attributes": attributes}, headers={"X-API-Key": KEY})
    assert response.status_code == 422 and response.json()["detail"].startswith("attributes"), response.text[:200]


def test_an_eps_upload_is_415_and_never_reaches_ghostscript(client, monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    for path, headers, data in (("/search", {}, {}), ("/items", {"X-API-Key": KEY}, {"id": "eps"})):
        response = client.post(path, files={"image": ("p.eps", eps_bytes(), "image/png")}, data=data, headers=headers)
        assert response.status_code == 415 and "EPS" in response.json()["detail"], response.text


def test_indexing_refuses_an_eps_file_with_a_per_file_error(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was called"))
    catalog = tmp_path / "catalog" / "Dairy"
    catalog.mkdir(parents=True)
    (catalog / "photo.jpg").write_bytes(jpeg_bytes(3, 128))
    (catalog / "poster.jpg").write_bytes(eps_bytes())
    report = index_catalog(tmp_path / "catalog", tmp_path / "index", IndexConfig(features=["colour"]), progress=False)
    assert report.added == 1 and len(report.failures) == 1
    assert "poster.jpg" in str(report.failures[0]) and "not an image format catalens decodes" in report.failures[0].reason


def test_the_formats_the_readme_and_tests_rely_on_still_decode():
    from catalens.indexer.imageio import load_rgb

    for image_format in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM"):
        buffer = io.BytesIO()
        Image.new("RGB", (24, 24), (10, 200, 30)).save(buffer, image_format)
        assert load_rgb(buffer.getvalue()).size == (24, 24), image_format


def test_two_image_parts_are_422_not_the_last_one_silently(client):
    files = [("image", ("a.jpg", jpeg_bytes(1), "image/jpeg")), ("image", ("b.jpg", jpeg_bytes(2), "image/jpeg"))]
    response = client.post("/search", files=files)
    assert response.status_code == 422 and "'image'" in response.json()["detail"]


@pytest.mark.parametrize("field, value, named", [
    ("id", "sku\u202e1", "id"), ("id", "x" * 513, "at most 512"), ("title", "Milk\x00", "title"),
    ("title", "a\u2067b", "title"), ("category", "Dairy/Mi\u202dlk", "category"), ("category", "Dairy\x00", "category"),
    ("attributes", '{"br\\u0000and": "x"}', "attribute key"), ("attributes", '{"brand": "A\\u202eB"}', "attributes.brand"),
])
def test_control_and_bidi_characters_are_refused_over_http_naming_the_field(client, field, value, named):
    data = {"id": "sku-1", field: value}
    response = client.post("/items", files={"image": ("p.jpg", jpeg_bytes(), "image/jpeg")}, data=data,
                           headers={"X-API-Key": KEY})
    assert response.status_code == 422 and named in response.json()["detail"], response.text
    assert client.get("/items/sku-1").status_code == 404


def test_http_and_the_readers_share_one_id_length_limit(client):
    from catalens.datasets.catalog import MAX_ID_CHARS

    response = client.post("/items", files={"image": ("p.jpg", jpeg_bytes(), "image/jpeg")},
                           data={"id": "x" * MAX_ID_CHARS}, headers={"X-API-Key": KEY})
    assert response.status_code == 200, response.text


def test_every_response_carries_the_security_headers(client, app):
    some_id = next(iter(app.state.catalens.catalog.items.records()))
    responses = [client.get("/"), client.get("/docs"), client.get("/openapi.json"), client.get("/static/app.js"),
                 client.get(f"/items/{some_id}/image"), client.get(f"/items/{some_id}/image?size=32"),
                 client.get("/items/no-such-item"), client.post("/items"),  # 404, 401 from the guard
                 client.post("/search", content=b"x" * 1_300_000, headers={"content-type": "multipart/form-data; boundary=x"})]
    for response in responses:
        assert response.headers.get("x-content-type-options") == "nosniff", response.url
        assert response.headers.get("x-frame-options") == "DENY", response.url
        assert response.headers.get("referrer-policy") == "same-origin", response.url
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 200, 404, 401, 413]
    assert "swagger-ui" in responses[1].text


def test_a_client_that_sends_its_headers_slowly_is_disconnected():
    import socket
    import threading
    import time

    import uvicorn

    from catalens.api.http.connections import HeaderDeadlineProtocol

    class QuickDeadline(HeaderDeadlineProtocol):
        header_timeout = 0.5

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=QuickDeadline, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=5)

        def closed_within(connection: socket.socket, seconds: float) -> bool:
            connection.settimeout(seconds)
            started = time.monotonic()
            try:
                return connection.recv(1024) == b"" and time.monotonic() - started < seconds
            except TimeoutError:
                return False

        with connect() as fast:  # a whole request at once is answered, and kept alive
            fast.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"ok"):
                answer += fast.recv(1024)
            assert answer.startswith(b"HTTP/1.1 200")
            fast.sendall(b"GET / HTTP/1.1\r\n")  # the next request's headers, never finished
            assert closed_within(fast, 2)
        with connect() as slow:
            started = time.monotonic()
            slow.sendall(b"GET / HTTP/1.1\r\n")
            closed = False
            for _ in range(20):  # a header line every 0.2 s, never the blank line that ends them
                time.sleep(0.2)
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    closed = True
                    break
                slow.settimeout(0.01)
                try:
                    if slow.recv(1024) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed and time.monotonic() - started < 2.5
        with connect() as silent:  # connects and sends nothing
            assert closed_within(silent, 2)
    finally:
        server.should_exit = True
        thread.join(5)
