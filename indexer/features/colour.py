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

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from catalens.indexer.features import l2_normalise, register_feature

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

HUE_BINS, SATURATION_BINS, VALUE_BINS = 12, 4, 4
CENTRE_FRACTION = 0.55
# The histogram needs no detail: a 128-px copy gives the same bins as the full photo.
THUMBNAIL = 128


class ColourPreparer:
    """RGB image to its centre's square-rooted HSV histogram; runs in decode workers."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        scale = THUMBNAIL / min(width, height)
        small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR, reducing_gap=2.0)
        side = max(1, round(min(small.size) * CENTRE_FRACTION))
        left, top = (small.width - side) // 2, (small.height - side) // 2
        centre = np.ascontiguousarray(np.asarray(small.crop((left, top, left + side, top + side)), dtype=np.uint8))
        hsv = cv2.cvtColor(centre, cv2.COLOR_RGB2HSV)
        histogram = cv2.calcHist(
            [hsv], [0, 1, 2], None, [HUE_BINS, SATURATION_BINS, VALUE_BINS], [0, 180, 0, 256, 0, 256]
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


@register_feature("colour", "global", dim=ColourHistogram.dim, search_weight=0.3, classify_weight=0.6,
                  description="HSV histogram of the image's centre")
def build_colour(catalog: Catalog) -> ColourHistogram:
    return ColourHistogram()
