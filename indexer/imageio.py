"""Robust image decoding: any file a shop might upload becomes an RGB image or a clear error.

Every decode (queries, indexing, uploads, thumbnails, explanations) is bounded by one memory
budget counted in bytes, not pixels: the header says how many bytes the decoded image takes in
its own mode (16-bit, float and alpha images take 2-4 bytes a pixel; a progressive JPEG holds
every coefficient of the full-size image whatever its draft scale), an image over
``QUERY_MAX_DECODE_BYTES`` is refused before it is decoded, JPEG decodes at a reduced scale
(draft mode), and anything larger than ``QUERY_MAX_SIDE`` is reduced in its own mode before any
conversion copies it. All decodes of a process share ``QUERY_DECODE_BUDGET``: a decode waits
until its bytes fit. CPU is bounded too: a JPEG of more than ``MAX_JPEG_SCANS`` scans and an
image whose sides are more than ``MAX_ASPECT_RATIO`` apart are refused before decoding.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
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
# What the reduction and the conversion to 8-bit RGB of one decode may add: four copies of the
# reduced image at 4 bytes a pixel, at most QUERY_MAX_SIDE^2 pixels each.
QUERY_WORK_BYTES = 16 * 1024 * 1024
# All decodes at once: two worst-case photos, so eight concurrent uploads wait their turn.
QUERY_BUDGET_BYTES = 2 * (QUERY_MAX_DECODE_BYTES + QUERY_WORK_BYTES)
# libjpeg walks every block of the image once a scan, at any draft scale (3.3 ms a scan for 40
# grey megapixels, even for an empty scan). Encoders write 6 (grey) to about 10 (colour) scans;
# 100 costs at most ~0.6 s at the largest coefficient buffer the byte limit lets through.
MAX_JPEG_SCANS = 100
# deep scales a photo's short side up to 256 px before cropping its centre: a 64:1 strip makes a
# 16384x256 copy (16 MiB, what QUERY_WORK_BYTES allows); a 6000x1 one would make 1.5 GB.
MAX_ASPECT_RATIO = 64

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
        self._reset()

    def _reset(self) -> None:
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
# A decode worker forked while a server thread held the budget's lock would wait on it forever;
# the child decodes alone and starts with an empty budget of its own.
os.register_at_fork(after_in_child=QUERY_DECODE_BUDGET._reset)


def decoded_bytes(image: Image.Image) -> int:
    """Bytes PIL holds for ``image`` decoded in its own mode: one a pixel for 1/L/P, two for
    16-bit grey, four for everything else (PIL keeps RGB as 4 bytes too)."""
    mode = image.mode
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return image.size[0] * image.size[1] * per_pixel


# Markers that may follow a scan's entropy-coded data (0xFF00 is a stuffed byte, 0xFFD0-D7 restarts).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Start-of-frame markers (0xC4 is DHT, 0xC8 reserved, 0xCC DAC); 0xC2/C6/CA/CE are progressive.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


@dataclass(frozen=True)
class JpegLayout:
    """What a JPEG's markers say its decoding costs, read before any of it is decoded."""

    scans: int  # start-of-scan markers of the first image, counted up to the limit plus one
    progressive: bool
    coefficient_bytes: int  # the full-size coefficient buffer libjpeg keeps when it needs several passes

    @property
    def buffered(self) -> bool:
        """libjpeg holds every coefficient of the image (progressive, or a sequential image in
        several scans), at full size whatever the draft scale."""
        return self.progressive or self.scans > 1


def jpeg_layout(data: bytes | mmap.mmap, max_scans: int = MAX_JPEG_SCANS) -> JpegLayout:
    """Count the scans of the JPEG ``data`` and size its coefficient buffer from its frame header.

    Walks the marker segments and skips each scan's entropy-coded data with one C-level search,
    so a 20 MB file is read in milliseconds; counting stops past ``max_scans``.
    """
    size, position, scans = len(data), 2, 0
    progressive, coefficient_bytes = False, 0
    while position + 4 <= size and scans <= max_scans:
        if data[position] != 0xFF:  # stray bytes: libjpeg skips to the next marker, so do we
            found = _NEXT_MARKER.search(data, position)
            if found is None:
                break
            position = found.start()
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:  # end of the first image (an MPO's next frames are not decoded)
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a segment
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if marker in _FRAME_MARKERS and length >= 8:
            progressive = marker in _PROGRESSIVE_MARKERS
            coefficient_bytes = _coefficient_bytes(bytes(data[position + 4:position + 2 + length]))
        position += 2 + length
        if marker == 0xDA:
            scans += 1
            found = _NEXT_MARKER.search(data, position)
            position = found.start() if found else size
    return JpegLayout(scans, progressive, coefficient_bytes)


def _coefficient_bytes(frame: bytes) -> int:
    """Bytes of libjpeg's whole-image coefficient buffer for a frame header (SOFn's payload):
    64 two-byte coefficients a block, every component's blocks padded to whole MCUs."""
    height, width, count = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big"), frame[5]
    factors = [(frame[7 + 3 * i] >> 4, frame[7 + 3 * i] & 15) for i in range(count) if 8 + 3 * i <= len(frame)]
    if not factors:
        return 0
    h_max = max(max(h for h, _ in factors), 1)
    v_max = max(max(v for _, v in factors), 1)
    mcus_x, mcus_y = math.ceil(width / (8 * h_max)), math.ceil(height / (8 * v_max))
    return sum(mcus_x * h * mcus_y * v for h, v in factors) * 64 * 2


def _jpeg_layout_of(source: ImageSource, handle) -> JpegLayout:
    if isinstance(source, bytes):
        return jpeg_layout(source)
    # Mapped, not read: a catalog photo of any size costs no copy to count.
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return jpeg_layout(data)


def _reduced_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    factor = max(1, math.ceil(max(size) / max_side))
    return math.ceil(size[0] / factor), math.ceil(size[1] / factor)


def _reduced(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` at most ``max_side`` a side, reduced in its own mode by a whole factor (a box filter:
    one pass, no full-size copy). Palette and 1-bit images take the nearest pixel (averaging
    palette indices mixes unrelated colours); images with alpha are reduced a band of rows at a
    time, because PIL premultiplies alpha in a full-size copy first."""
    factor = math.ceil(max(image.size) / max_side)
    if factor <= 1:
        return image
    width, height = image.size
    size = _reduced_size(image.size, max_side)
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
    max_side: int | None = QUERY_MAX_SIDE,
    max_bytes: int | None = QUERY_MAX_DECODE_BYTES,
    budget: DecodeBudget | None = QUERY_DECODE_BUDGET,
) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) to an upright RGB image (its first frame).

    ``draft_size`` lets JPEG decode at a reduced scale when the caller only needs a small image,
    which is several times faster for large photos. ``max_side`` reduces a larger image before
    any conversion; ``max_bytes`` refuses one whose decoding would hold more, before it is
    decoded; ``budget`` is shared with other decodes. The defaults are the limits every decode
    of the service keeps (see the module's docstring). Raises ``ImageDecodeError``.
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
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise ImageDecodeError(
                    name, f"image too elongated ({width}x{height}: sides more than {MAX_ASPECT_RATIO}:1 apart; "
                          "the features scale its short side up to 256 px)")
            jpeg = image.format in ("JPEG", "MPO")  # MPO: a phone's JPEG with a second view appended
            draft = draft_size or max_side
            if draft and jpeg:
                image.draft("RGB", (draft, draft))
            needed, what = decoded_bytes(image), f"{image.size[0]}x{image.size[1]} {image.mode}"
            if jpeg:
                layout = _jpeg_layout_of(source, handle)
                if layout.scans > MAX_JPEG_SCANS:
                    raise ImageDecodeError(
                        name, f"JPEG with too many scans (over {MAX_JPEG_SCANS}; encoders write about 10): "
                              "decoding walks the whole image once a scan")
                if layout.buffered:
                    needed += layout.coefficient_bytes
                    what = (f"{width}x{height} {'progressive' if layout.progressive else 'multi-scan'} JPEG, "
                            f"whose {layout.coefficient_bytes / 2**20:.0f} MiB of coefficients are held at full "
                            f"size, decoded to {what}")
            if max_bytes is not None and needed > max_bytes:
                raise ImageDecodeError(
                    name, f"image too large to decode ({what}: {needed / 2**20:.0f} MiB decoded, "
                          f"limit {max_bytes / 2**20:.0f} MiB)")
            # The reduction, the conversion to 8-bit RGB and the upright turn each copy the reduced image.
            work = 4 * 4 * math.prod(_reduced_size(image.size, max_side)) if max_side else 0
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
