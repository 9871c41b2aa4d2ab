"""The ``colour`` global feature: a hue-saturation-value histogram of the product's centre.

ImageNet features are trained to ignore colour (colour jitter is part of their augmentation), yet
in a grocery catalog colour is often all that tells leaves apart: Golden Delicious from Granny
Smith, red from yellow peppers, one milk carton from the next. A 12 x 4 x 4 HSV histogram of the
central square (55% of the shorter side, where a product photo puts the product) is 192 numbers
and costs well under a millisecond per image. Crop, bins and grid were chosen on few-shot
classification (``benchmarks/bench_classify.py`` prints the comparison).

Rows are square-rooted (Hellinger) and L2-normalised, so a dot product is the Bhattacharyya
coefficient of two histograms and the feature drops into the same cosine machinery as ``deep``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from catalens.indexer.features import Window, l2_normalise, register_feature, windows_by_side

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

HUE_BINS, SATURATION_BINS, VALUE_BINS = 12, 4, 4
CENTRE_FRACTION = 0.55
# The histogram needs no detail: a 128-px copy gives the same bins as the full photo.
THUMBNAIL = 128


class ColourPreparer:
    """RGB image to its centre's square-rooted HSV histogram; runs in decode workers."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        small = _thumbnail(image, THUMBNAIL / min(image.size))
        side = max(1, round(min(small.size) * CENTRE_FRACTION))
        left, top = (small.width - side) // 2, (small.height - side) // 2
        return _histogram(_hsv(small.crop((left, top, left + side, top + side))))


def _thumbnail(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR,
                        reducing_gap=2.0)


def _hsv(image: Image.Image) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), cv2.COLOR_RGB2HSV)


def _histogram(hsv: np.ndarray) -> np.ndarray:
    """The square-rooted, sum-normalised HSV histogram of ``hsv`` pixels."""
    histogram = cv2.calcHist(
        [np.ascontiguousarray(hsv)], [0, 1, 2], None, [HUE_BINS, SATURATION_BINS, VALUE_BINS], [0, 180, 0, 256, 0, 256]
    ).ravel()
    return np.sqrt(histogram / max(float(histogram.sum()), 1.0)).astype(np.float32)


class ColourHistogram:
    """The colour histogram as a ``GlobalFeature``: images in, L2-normalised (n, 192) rows out."""

    name = "colour"
    dim = HUE_BINS * SATURATION_BINS * VALUE_BINS
    draft_size = THUMBNAIL * 2

    def __init__(self) -> None:
        self.preparer = ColourPreparer()

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(np.stack(prepared))

    def window_rows(self, image: Image.Image, windows: Sequence[Window]) -> np.ndarray:
        """Each window's row from one thumbnail of the photo per window side (a window becomes
        ``THUMBNAIL`` pixels, as its crop would), converted to HSV once."""
        rows = np.zeros((len(windows), self.dim), np.float32)
        centre = max(1, round(THUMBNAIL * CENTRE_FRACTION))
        for side, members in windows_by_side(windows).items():
            scale = THUMBNAIL / side
            hsv = _hsv(_thumbnail(image, scale))
            for i in members:
                left = min(max(round(windows[i][0] * scale) + (THUMBNAIL - centre) // 2, 0), max(hsv.shape[1] - centre, 0))
                top = min(max(round(windows[i][1] * scale) + (THUMBNAIL - centre) // 2, 0), max(hsv.shape[0] - centre, 0))
                rows[i] = _histogram(hsv[top : top + centre, left : left + centre])
        return l2_normalise(rows)


@register_feature("colour", "global", dim=ColourHistogram.dim, search_weight=0.3, classify_weight=0.6,
                  legacy_switch="colour_features", histogram=True,
                  description="HSV histogram of the image's centre")
def build_colour(catalog: Catalog) -> ColourHistogram:
    return ColourHistogram()
