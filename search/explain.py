"""Why did this match? One image per result: query and item side by side, inlier matches drawn."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from catalens.indexer.features import FeatureUnavailableError
from catalens.indexer.imageio import ImageDecodeError, load_query, load_rgb
from catalens.search.engine import Query, QueryResult, SearchEngine
from catalens.search.verification import Verifier

log = logging.getLogger(__name__)

_HEIGHT = 360  # both panels are scaled to this height so small catalog shots stay readable
# A wide photo (up to 64:1, imageio.MAX_ASPECT_RATIO) would make a panel of 23,000 px at that height.
_MAX_WIDTH = 4 * _HEIGHT


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:] or "query"


def _panel(image: Image.Image) -> tuple[np.ndarray, float]:
    scale = min(_HEIGHT / image.height, _MAX_WIDTH / image.width)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    return cv2.cvtColor(np.asarray(resized), cv2.COLOR_RGB2BGR), scale


def draw_matches(query_image: Image.Image, item_image: Image.Image, query_points: np.ndarray, item_points: np.ndarray, caption: str) -> np.ndarray:
    """BGR canvas: query left, item right, a line per matched point pair."""
    left, left_scale = _panel(query_image)
    right, right_scale = _panel(item_image)
    canvas = np.full((_HEIGHT + 28, left.shape[1] + right.shape[1], 3), 255, np.uint8)
    canvas[28 : 28 + left.shape[0], : left.shape[1]] = left
    canvas[28 : 28 + right.shape[0], left.shape[1] :] = right
    rng = np.random.default_rng(0)
    for (qx, qy), (ix, iy) in zip(query_points, item_points, strict=True):
        colour = tuple(int(c) for c in rng.integers(40, 255, 3))
        start = (round(qx * left_scale), round(qy * left_scale) + 28)
        end = (round(ix * right_scale) + left.shape[1], round(iy * right_scale) + 28)
        cv2.line(canvas, start, end, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, start, 3, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, end, 3, colour, 1, cv2.LINE_AA)
    cv2.putText(canvas, caption[:110], (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def write_explanations(engine: SearchEngine, result: QueryResult, out_dir: Path,
                       query_image: Image.Image | None = None) -> list[Path]:
    """Write ``<query>/<rank>_<item>.jpg`` for each result of ``result``; returns the paths.

    ``query_image`` is the query as it was searched (decoded again from ``result.query`` if not
    given: a server passes the upload it decoded, which saves a decode of up to 0.7 s of CPU)."""
    if result.error is not None or not result.results:
        return []
    if query_image is None:
        try:
            query_image = load_query(result.query, engine.catalog.config.max_pixels)
        except ImageDecodeError as error:
            log.warning("cannot explain %s: %s", result.query, error)
            return []
    folder = Path(out_dir) / _slug(Path(result.query).stem)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, canvas in draw_explanations(engine, result, query_image):
        path = folder / name
        cv2.imwrite(str(path), canvas)
        written.append(path)
    return written


def jpeg_bytes(canvas: np.ndarray) -> bytes:
    """A drawn explanation as a JPEG file's bytes (as ``write_explanations`` writes it)."""
    return cv2.imencode(".jpg", canvas)[1].tobytes()


def draw_explanations(engine: SearchEngine, result: QueryResult, query_image: Image.Image) -> list[tuple[str, np.ndarray]]:
    """(file name ``<rank>_<item>.jpg``, BGR canvas) for each result of ``result`` whose image can be
    read, drawn in memory; ``query_image`` is the query as it was searched."""
    if result.error is not None or not result.results:
        return []
    query = Query(query_image, result.query)
    keys = np.array([hit.key for hit in result.results], np.int64)
    local = engine.catalog.local_features()
    checks, items, query_points = {}, {}, np.zeros((0, 4), np.float32)
    if local:  # the first local feature's matches; an index without one draws the pairs without lines
        try:
            checks = query.verified(engine.catalog, local[0], keys, Verifier.from_settings(engine.settings))
            query_points = query.descriptors(engine.catalog, local[0]).keypoints
            items = engine.catalog.stored_descriptors(local[0], keys)
        except FeatureUnavailableError as error:
            log.info("no local features to explain with (%s)", error)
    drawn = []
    min_inliers = engine.settings.min_inliers
    for rank, hit in enumerate(result.results, start=1):
        record = engine.catalog.items.item_by_id(hit.id)
        try:
            # Reduced like a query, within the shared decode budget: a catalog photo of 5790 px
            # a side would otherwise be decoded, converted and drawn at full size.
            item_image = load_rgb(record.image, engine.catalog.config.max_pixels)
        except (ImageDecodeError, AttributeError) as error:
            log.warning("cannot explain result %s: %s", hit.id, error)
            continue
        check = checks.get(hit.key)
        pairs = check.pairs if check is not None else np.zeros((0, 2), np.int32)
        item = items.get(hit.key)
        item_points = np.zeros((0, 2))
        if item is not None and len(pairs):
            # Keypoints are in the pixels of the image they were found in (indexing decodes a
            # JPEG at a reduced scale too): scale them to the image drawn here.
            found_in = item.image_size[0] or item_image.width
            item_points = item.keypoints[pairs[:, 1], :2] * (item_image.width / found_in)
        inliers = check.inliers if check is not None else 0
        verdict = "verified" if inliers >= min_inliers else "not verified"
        caption = f"#{rank} {hit.title}  score {hit.score:.3f}  {inliers} inliers ({verdict})"
        canvas = draw_matches(query_image, item_image, query_points[pairs[:, 0], :2] if len(pairs) else np.zeros((0, 2)), item_points, caption)
        drawn.append((f"{rank:02d}_{_slug(hit.id)}.jpg", canvas))
    return drawn
