"""Box geometry (overlap, containment) and snapping a box's sides to the product's borders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from catalens.search.locate.settings import LocateSettings


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inside_fraction(a: Sequence[float], b: Sequence[float]) -> float:
    """How much of ``a``'s area lies inside ``b``."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1])
    return inter / area if area > 0 else 0.0


@dataclass(frozen=True)
class PhotoEdges:
    """Colour steps across the photo's column and row boundaries, summed over R, G, B and taken
    two pixels apart (a border softened by resizing or JPEG still counts): ``across_columns[y, x]``
    is the step at row y from column x to x + 2 (the boundary x + 1), ``across_rows`` likewise.
    Measured on the photo reduced by ``factor`` (borders need no more than 640 px a side)."""

    across_columns: np.ndarray
    across_rows: np.ndarray
    factor: int = 1

    @classmethod
    def of(cls, image: Image.Image, max_side: int = 640) -> PhotoEdges:
        factor = max(1, -(-max(image.size) // max_side))
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert copies even an RGB photo
        reduced = rgb.reduce(factor) if factor > 1 else rgb
        pixels = np.asarray(reduced, np.int16)
        return cls(np.abs(pixels[:, 2:] - pixels[:, :-2]).sum(axis=2, dtype=np.int16),
                   np.abs(pixels[2:] - pixels[:-2]).sum(axis=2, dtype=np.int16), factor)


def _snapped_side(steps: np.ndarray, position: float, span: tuple[int, int], band: float, limit: int,
                  toward_start: bool, settings: LocateSettings) -> float:
    """Where one side of a box goes. ``steps[along, b - 1]`` is the step across boundary b, for
    ``along`` the rows of a left or right side (the columns of a top or bottom one); the side
    may move ``band`` outward (toward 0 for a left or top side) and half that inward, give or
    take a pixel of rounding."""
    before, after = (band, band / 2) if toward_start else (band / 2, band)
    lo, hi = int(np.floor(position - before)) - 1, int(np.ceil(position + after)) + 1
    first, last = max(lo, 1), min(hi, limit - 1)
    if last <= first or span[1] - span[0] < 8:
        return position
    strength = np.median(steps[span[0]:span[1], first - 1:last], axis=0)
    best = int(np.argmax(strength))
    if strength[best] >= max(settings.snap_min_step, settings.snap_contrast * float(np.median(strength))):
        return float(first + best)
    # No border in the band: a product cut by the photo's edge ends there.
    if toward_start and lo <= 1:
        return 0.0
    if not toward_start and hi >= limit - 1:
        return float(limit)
    return position


def snap_box(box: Sequence[float], edges: PhotoEdges, settings: LocateSettings) -> tuple[float, float, float, float]:
    """``box`` with each side moved to the border it nearly reaches (``LocateSettings.snap_band``).

    A window is square and on a fixed grid of positions; the product it shows rarely is. Where a
    product ends at a straight border (a pasted photo, a flyer cell, a package edge against the
    shelf), the colour step along that border is the most exact box there is: the best window is
    often a third of a half-photo product, and its IoU with the product is then 0.44."""
    if settings.snap_band is None:
        return tuple(float(v) for v in box)
    height, width = edges.across_rows.shape[0] + 2, edges.across_columns.shape[1] + 2
    x0, y0, x1, y1 = (float(v) / edges.factor for v in box)
    out_x, out_y = settings.snap_band * (x1 - x0), settings.snap_band * (y1 - y0)
    rows, columns = (max(0, round(y0)), min(height, round(y1))), (max(0, round(x0)), min(width, round(x1)))
    columns_steps, rows_steps = edges.across_columns, edges.across_rows.T
    new = (_snapped_side(columns_steps, x0, rows, out_x, width, True, settings),
           _snapped_side(rows_steps, y0, columns, out_y, height, True, settings),
           _snapped_side(columns_steps, x1, rows, out_x, width, False, settings),
           _snapped_side(rows_steps, y1, columns, out_y, height, False, settings))
    # A box that lost most of itself snapped to a border inside the product.
    if new[2] - new[0] < 0.5 * (x1 - x0) or new[3] - new[1] < 0.5 * (y1 - y0):
        return tuple(float(v) for v in box)
    return tuple(v * edges.factor for v in new)
