"""The ``text`` feature: the words printed on each image, read by OCR (``catalens.indexer.features.ocr``).

Its row is the words read, one detected line a line; the item store indexes them with the
item's other fields for text search (``ItemStore.search_text``), and fused search can compare
the words read on a query photo with them. Off by default: reading a 348-px photo costs ~0.2 s
of CPU, several times the other features together (``benchmarks/bench_text.py``).
``CATALENS_FEATURES=deep,colour,sift,text`` turns it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

from catalens.indexer.features import FeatureUnavailableError, register_feature
from catalens.indexer.features.ocr import OcrModelsMissingError, OcrOptions, TextReader

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

FEATURE_NAME = "text"


class TextPreparer:
    """RGB image to the words read on it; runs in decode workers (the reader compiles its models
    once in each process)."""

    def __init__(self, reader: TextReader):
        self.reader = reader

    def __call__(self, image: Image.Image) -> str:
        return self.reader(image)


class PrintedText:
    """The words read by OCR as a ``TextFeature``: one string per image."""

    name = FEATURE_NAME
    # Detection scales the photo to OcrOptions.detect_side itself; a larger draft gains nothing.
    draft_size = 768

    def __init__(self, options: OcrOptions | None = None):
        self.options = options or OcrOptions()
        self.preparer = TextPreparer(TextReader(self.options))

    def finish(self, prepared: list[Any]) -> list[str]:
        return [str(words) for words in prepared]

    def decode(self, blob: bytes) -> str:
        return bytes(blob).decode("utf-8")


def text_options(catalog: Catalog) -> OcrOptions:
    from catalens.indexer.features import options_of

    return options_of(catalog, FEATURE_NAME, OcrOptions)


# search_weight 0.05: the OCR mostly reads a brand, which sibling packs share, so only a light
# weight pays (docs/search-quality.md, "Search by words"). The query photo is read only where the
# weight is not 0.
@register_feature(FEATURE_NAME, "text", similarity="bm25", search_weight=0.05,
                  description="words printed on the image, read by OCR (PP-OCRv4 on OpenVINO)")
def build_text(catalog: Catalog) -> PrintedText:
    try:
        return PrintedText(text_options(catalog))
    except OcrModelsMissingError as error:
        raise FeatureUnavailableError(f"text: {error}") from None
