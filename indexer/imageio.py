"""Robust image decoding: any file a shop might upload becomes an RGB image or a clear error.

Queries (``load_query``) are decoded within a memory budget counted in bytes, not pixels: the
header says how many bytes the decoded image takes in its own mode (16-bit, float and alpha
images take 2-4 bytes a pixel), an image over ``QUERY_MAX_DECODE_BYTES`` is refused before it is
decoded, JPEG decodes at a reduced scale (draft mode), and anything larger than
``QUERY_MAX_SIDE`` is reduced in its own mode before any conversion copies it. All queries of a
process share ``QUERY_DECODE_BUDGET``: a decode waits until its bytes fit.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from catalens.datasets.catalog import IMAGE_FORMATS

# Far above any product photo (a 64-megapixel phone shot) and far below what a bomb expands to.
DEFAULT_MAX_PIXELS = 80_000_000

# Every feature reads at most ~640 px a side (its draft size); queries are reduced to this first.
QUERY_MAX_SIDE = 1024
# A query's decoded pixels in their own mode: a 33-megapixel RGB or RGBA image, a 67-megapixel
# 16-bit grey one. A JPEG counts at its draft scale.
QUERY_MAX_DECODE_BYTES = 128 * 1024 * 1024
# What the reduction and the conversion to 8-bit RGB of one query may add: four copies of
# QUERY_MAX_SIDE^2 pixels at 4 bytes.
QUERY_WORK_BYTES = 16 * 1024 * 1024
# All queries decoding at once: two worst-case queries, so eight concurrent uploads wait their turn.
QUERY_BUDGET_BYTES = 2 * (QUERY_MAX_DECODE_BYTES + QUERY_WORK_BYTES)

# A truncated JPEG must raise, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An image that cannot be used; ``str()`` names the file and the reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


ImageSource = str | Path | bytes


class DecodeBudget:
    """Bytes of decoded pixels that every decode of a process holds together at most; a decode
    waits until its share fits. What bounds a server's memory under concurrent uploads."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._used = 0
        self._free = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.capacity)
        with self._free:
            self._free.wait_for(lambda: self._used + nbytes <= self.capacity)
            self._used += nbytes
        try:
            yield
        finally:
            with self._free:
                self._used -= nbytes
                self._free.notify_all()


QUERY_DECODE_BUDGET = DecodeBudget(QUERY_BUDGET_BYTES)


def decoded_bytes(image: Image.Image) -> int:
    """Bytes PIL holds for ``image`` decoded in its own mode: one a pixel for 1/L/P, two for
    16-bit grey, four for everything else (PIL keeps RGB as 4 bytes too)."""
    mode = image.mode
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return image.size[0] * image.size[1] * per_pixel


def _reduced(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` at most ``max_side`` a side, reduced in its own mode by a whole factor (a box filter:
    one pass, no full-size copy). Palette and 1-bit images take the nearest pixel (averaging
    palette indices mixes unrelated colours); images with alpha are reduced a band of rows at a
    time, because PIL premultiplies alpha in a full-size copy first."""
    factor = math.ceil(max(image.size) / max_side)
    if factor <= 1:
        return image
    width, height = image.size
    size = (math.ceil(width / factor), math.ceil(height / factor))
    if image.mode in ("1", "P", "PA"):
        return image.resize(size, Image.NEAREST)
    if image.mode.startswith("I;16"):
        return image.resize(size, Image.BOX)
    if image.mode in ("RGBA", "LA"):
        reduced = Image.new(image.mode, size)
        band = factor * 64
        for top in range(0, height, band):
            reduced.paste(image.crop((0, top, width, min(height, top + band))).reduce(factor), (0, top // factor))
        return reduced
    return image.reduce(factor)


def _unaccepted(handle) -> str:
    """Why a file no accepted format recognised is refused: a format catalens does not decode (named
    from its first bytes, as Pillow's plugins recognise them, without opening it), or no image at all."""
    handle.seek(0)
    prefix = handle.read(16)
    for name, (_, accept) in Image.OPEN.items():
        try:
            recognised = name not in IMAGE_FORMATS and accept is not None and accept(prefix)
        except Exception:  # noqa: BLE001 - a plugin's check of 16 bytes; recognising is only for the message
            recognised = False
        if recognised:
            return f"not an image format catalens decodes (it looks like {name}; catalens decodes {', '.join(IMAGE_FORMATS)})"
    return "not an image (unrecognised format)"


def _describe(source: ImageSource) -> str:
    return "<upload>" if isinstance(source, bytes) else str(source)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Every mode PIL can open (grayscale, palette, alpha, CMYK, 16/32-bit, float) to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(values / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
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
    max_side: int | None = None,
    max_bytes: int | None = None,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) to an upright RGB image (its first frame).

    ``draft_size`` lets JPEG decode at a reduced scale when the caller only needs a small image,
    which is several times faster for large photos. ``max_side`` reduces a larger image before
    any conversion; ``max_bytes`` refuses one whose decoded pixels would take more, before it is
    decoded; ``budget`` is shared with other decodes. Raises ``ImageDecodeError``.
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
                image = Image.open(handle, formats=IMAGE_FORMATS)
            except UnidentifiedImageError:
                raise ImageDecodeError(name, _unaccepted(handle)) from None
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
            draft = draft_size or max_side
            if draft and image.format == "JPEG":
                image.draft("RGB", (draft, draft))
            needed = decoded_bytes(image)
            if max_bytes is not None and needed > max_bytes:
                raise ImageDecodeError(
                    name, f"image too large to decode ({image.size[0]}x{image.size[1]} {image.mode}: "
                          f"{needed / 2**20:.0f} MiB decoded, limit {max_bytes / 2**20:.0f} MiB)")
            work = QUERY_WORK_BYTES if max_side else 0
            with budget.reserve(needed + work) if budget is not None else nullcontext():
                try:
                    image.load()
                except (OSError, SyntaxError, ValueError) as error:
                    raise ImageDecodeError(name, f"truncated or corrupt image data ({error})") from None
                except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                    raise ImageDecodeError(name, "image too large (decompression bomb refused)") from None
                if max_side:
                    image = _reduced(image, max_side)
                try:
                    image = ImageOps.exif_transpose(image)
                except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the picture
                    pass
                return _to_rgb(image)
    finally:
        handle.close()


def load_query(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A query photo, decoded within the query memory budget (see the module's docstring)."""
    return load_rgb(source, max_pixels, max_side=QUERY_MAX_SIDE, max_bytes=QUERY_MAX_DECODE_BYTES,
                    budget=QUERY_DECODE_BUDGET)


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
            yield name, load_query(source, max_pixels), None
        except ImageDecodeError as error:
            yield name, None, str(error)
