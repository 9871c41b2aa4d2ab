import io

import numpy as np
import pytest
from PIL import Image

from catalens.indexer.imageio import ImageDecodeError, load_rgb


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = _save(image, tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_rgb(path).size == (20, 40)


@pytest.mark.parametrize(
    "mode, colour, suffix",
    [("L", 128, "png"), ("1", 1, "png"), ("P", 3, "png"), ("CMYK", (0, 255, 255, 0), "jpg"), ("LA", (90, 255), "png")],
)
def test_every_mode_becomes_rgb(tmp_path, mode, colour, suffix):
    path = _save(Image.new(mode, (16, 16), colour), tmp_path / f"img.{suffix}")
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (16, 16)


def test_transparent_pixels_sit_on_white(tmp_path):
    path = _save(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), tmp_path / "clear.png")
    assert np.asarray(load_rgb(path))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    rgb = np.asarray(load_rgb(path))
    assert rgb.min() == 0 and rgb.max() == 255 and 100 < rgb.mean() < 155


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
    ],
)
def test_unusable_files_raise_with_path_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=rf"bad.jpg: {reason}"):
        load_rgb(path)


def test_truncated_jpeg_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg: truncated or corrupt"):
        load_rgb(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = _save(Image.new("1", (12000, 12000)), tmp_path / "bomb.png")  # tiny file, 144 Mpx
    with pytest.raises(ImageDecodeError, match="bomb.png: image too large"):
        load_rgb(path, max_pixels=50_000_000)


def test_missing_file_and_bytes_sources(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")
    buffer = io.BytesIO()
    Image.new("RGB", (5, 7)).save(buffer, "PNG")
    assert load_rgb(buffer.getvalue()).size == (5, 7)
    with pytest.raises(ImageDecodeError, match="<upload>: empty upload"):
        load_rgb(b"")


def test_jpeg_cut_inside_its_header_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, "JPEG")
    path = tmp_path / "header.jpg"
    path.write_bytes(buffer.getvalue()[:30])
    with pytest.raises(ImageDecodeError, match="header.jpg: "):
        load_rgb(path)
