"""A photo from source to detections: decoding it, gathering both kinds of evidence, merging them
and naming what the classifier names."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from catalens.indexer.imageio import (
    QUERY_DECODE_BUDGET,
    QUERY_MAX_DECODE_BYTES,
    ImageDecodeError,
    ImageSource,
    load_rgb,
)
from catalens.search.engine import SearchEngine
from catalens.search.locate.boxes import PhotoEdges, _inside_fraction, iou
from catalens.search.locate.local import local_detections, photo_word_candidates
from catalens.search.locate.naming import classified
from catalens.search.locate.regions import region_detections
from catalens.search.locate.results import Detection, LocateResult, _Candidate
from catalens.search.locate.settings import LocateSettings
from catalens.search.retrieval import build_models, side_pool


def _decode(source: ImageSource | Image.Image, max_pixels: int, work_side: int) -> tuple[Image.Image, float]:
    """The photo at most ``work_side`` a side, and the factor from its pixels to the original's."""
    if isinstance(source, Image.Image):
        image, original = source.convert("RGB"), source.size
    else:
        image = load_rgb(source, max_pixels, max_side=2 * work_side, max_bytes=QUERY_MAX_DECODE_BYTES,
                         budget=QUERY_DECODE_BUDGET)
        original = _original_size(source, image.size)
    if max(image.size) > work_side:
        scale = work_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    return image, original[0] / image.width


def _original_size(source: ImageSource, decoded: tuple[int, int]) -> tuple[int, int]:
    """The upright size of the file (decoding may have reduced it)."""
    import io

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as header:
            width, height = header.size
            transposed = header.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - it decoded a moment ago; keep the decoded size
        return decoded
    return (height, width) if transposed else (width, height)


def merge(local: Sequence[_Candidate], regions: Sequence[_Candidate], settings: LocateSettings) -> list[_Candidate]:
    """Verified detections first, then the regions that no verified box explains."""
    merged = list(local)
    for region in regions:
        # A verified box can be far larger than its product (the catalog photo's frame, shelf
        # included) and reach over the next product: a region clear of its inliers is another.
        if any((iou(region.box, other.box) > settings.nms_iou or _inside_fraction(region.box, other.box) > settings.covered)
               and (other.core is None or _inside_fraction(other.core, region.box) > settings.core_overlap)
               for other in local):
            continue
        merged.append(region)
    return sorted(merged, key=lambda c: -c.score)[: settings.max_detections]


def locate_image(engine: SearchEngine, image: Image.Image, settings: LocateSettings | None = None,
                 scale: float = 1.0) -> list[Detection]:
    """Detections in ``image`` (already decoded), best first; boxes multiplied by ``scale``."""
    settings = settings or LocateSettings()
    # The keypoints (OpenCV) and their visual words (FAISS) on a side thread while the windows go
    # through the network (OpenVINO): all three release the GIL.
    local_features = engine.catalog.local_features()
    build_models(engine.catalog, (*engine.catalog.global_features(), *local_features))
    words = side_pool().submit(photo_word_candidates, engine, image, settings) if local_features else None
    edges = PhotoEdges.of(image) if settings.snap_band is not None else None
    regions, region_items = region_detections(engine, image, settings, edges)
    local = local_detections(engine, image, region_items, settings, words.result() if words else None, edges)
    merged = merge(local, regions, settings)
    if settings.classify:  # after merging: no network pass for a region a verified box explains
        renamed = iter(classified(engine, image, [c for c in merged if c.evidence == "region"],
                                  settings.name_with_mirror))
        merged = sorted((next(renamed) if c.evidence == "region" else c for c in merged), key=lambda c: -c.score)
    records = engine.catalog.items.items(c.key for c in merged)
    detections = []
    for candidate in merged:
        record = records.get(candidate.key)
        if record is None:
            continue
        x0, y0, x1, y1 = (v * scale for v in candidate.box)
        detections.append(Detection(record.id, candidate.score, record.category, record.title,
                                    (round(x0), round(y0), round(x1), round(y1)), candidate.evidence, candidate.key,
                                    candidate.confidence))
    return detections


def locate(engine: SearchEngine, sources: Sequence[ImageSource | Image.Image], names: Sequence[str] | None = None,
           settings: LocateSettings | None = None) -> list[LocateResult]:
    """One result per source, in order; an unreadable source gives a result with ``error``."""
    settings = settings or LocateSettings()
    results = []
    for position, source in enumerate(sources):
        if names:
            name = names[position]
        else:
            name = "<image>" if isinstance(source, (bytes, Image.Image)) else str(source)
        try:
            image, scale = _decode(source, engine.catalog.config.max_pixels, settings.work_side)
        except ImageDecodeError as error:
            results.append(LocateResult(name, error=str(error)))
            continue
        results.append(LocateResult(name, locate_image(engine, image, settings, scale)))
    return results
