"""Robust image decoding: any file a shop might upload becomes an RGB image or a clear error."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Far above any product photo (a 64-megapixel phone shot) and far below what a bomb expands to.
DEFAULT_MAX_PIXELS = 80_000_000

# A truncated JPEG must raise, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An image that cannot be used; ``str()`` names the file and the reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


ImageSource = str | Path | bytes


def _describe(source: ImageSource) -> str:
    return "<upload>" if isinstance(source, bytes) else str(source)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Every mode PIL can open (grayscale, palette, alpha, CMYK, 16/32-bit, float) to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min(initial=0)), float(values.max(initial=1))
        scaled = (values - low) / (high - low or 1.0) * 255.0
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if mode in {"RGBA", "LA", "PA"} or (mode == "P" and "transparency" in image.info):
        # Transparent product cut-outs sit on white, as they would on a shop page.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) to an upright RGB image.

    ``draft_size`` lets JPEG decode at a reduced scale when the caller only needs a small image,
    which is several times faster for large photos. Raises ``ImageDecodeError``.
    """
    name = _describe(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError(name, "empty upload (0 bytes)")
        handle = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageDecodeError(name, "file not found")
        if not path.is_file():
            raise ImageDecodeError(name, "not a regular file")
        if path.stat().st_size == 0:
            raise ImageDecodeError(name, "empty file (0 bytes)")
        handle = path.open("rb")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(handle)
            except UnidentifiedImageError:
                raise ImageDecodeError(name, "not an image (unrecognised format)") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageDecodeError(name, "image too large (decompression bomb refused)") from None
            except (OSError, SyntaxError, ValueError) as error:  # e.g. cut off inside the header
                raise ImageDecodeError(name, f"truncated or corrupt image data ({error})") from None
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    name, f"image too large ({width}x{height} = {width * height} pixels, limit {max_pixels})"
                )
            if width == 0 or height == 0:
                raise ImageDecodeError(name, "image has no pixels")
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            try:
                image.load()
            except (OSError, SyntaxError, ValueError) as error:
                raise ImageDecodeError(name, f"truncated or corrupt image data ({error})") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageDecodeError(name, "image too large (decompression bomb refused)") from None
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the picture
                pass
            return _to_rgb(image)
    finally:
        handle.close()


def decode_queries(
    sources: Sequence[ImageSource | Image.Image],
    names: Sequence[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[str, Image.Image | None, str | None]]:
    """(name, image, None) or (name, None, error) per query: a bad query is an answer, not a crash."""
    for position, source in enumerate(sources):
        if names:
            name = names[position]
        else:
            name = "<image>" if isinstance(source, (bytes, Image.Image)) else str(source)
        if isinstance(source, Image.Image):
            yield name, source, None
            continue
        try:
            yield name, load_rgb(source, max_pixels), None
        except ImageDecodeError as error:
            yield name, None, str(error)
