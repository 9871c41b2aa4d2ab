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
    create_app(index, api_key=KEY).state.catalens.service.close()
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
