"""Why did this match? One image per result: query and item side by side, inlier matches drawn."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from indexer.imageio import ImageDecodeError, load_rgb
from search.engine import Query, QueryResult, SearchEngine
from search.local import query_descriptors, search_config, verified

log = logging.getLogger(__name__)

_HEIGHT = 360  # both panels are scaled to this height so small catalog shots stay readable


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:] or "query"


def _panel(image: Image.Image) -> tuple[np.ndarray, float]:
    scale = _HEIGHT / image.height
    resized = image.resize((max(1, round(image.width * scale)), _HEIGHT), Image.BILINEAR)
    return cv2.cvtColor(np.asarray(resized), cv2.COLOR_RGB2BGR), scale


def draw_matches(query_image: Image.Image, item_image: Image.Image, query_points: np.ndarray, item_points: np.ndarray, caption: str) -> np.ndarray:
    """BGR canvas: query left, item right, a line per matched point pair."""
    left, left_scale = _panel(query_image)
    right, right_scale = _panel(item_image)
    canvas = np.full((_HEIGHT + 28, left.shape[1] + right.shape[1], 3), 255, np.uint8)
    canvas[28:, : left.shape[1]] = left
    canvas[28:, left.shape[1] :] = right
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


def write_explanations(engine: SearchEngine, result: QueryResult, out_dir: Path) -> list[Path]:
    """Write ``<query>/<rank>_<item>.jpg`` for each result of ``result``; returns the paths."""
    if result.error is not None or not result.results:
        return []
    try:
        query_image = load_rgb(result.query, engine.index.config.max_pixels)
    except ImageDecodeError as error:
        log.warning("cannot explain %s: %s", result.query, error)
        return []
    query = Query(query_image, result.query)
    keys = np.array([hit.key for hit in result.results], np.int64)
    try:
        checks = verified(engine, query, keys)
        query_points = query_descriptors(engine, query).keypoints
        from indexer.local import item_descriptors

        items = item_descriptors(engine.index, keys)
    except ValueError as error:  # an index without local features: draw the pairs without lines
        log.info("no local features to explain with (%s)", error)
        checks, items, query_points = {}, {}, np.zeros((0, 4), np.float32)
    folder = Path(out_dir) / _slug(Path(result.query).stem)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    min_inliers = search_config(engine).min_inliers
    for rank, hit in enumerate(result.results, start=1):
        record = engine.index.store.item_by_id(hit.id)
        try:
            item_image = load_rgb(record.image, engine.index.config.max_pixels)
        except (ImageDecodeError, AttributeError) as error:
            log.warning("cannot explain result %s: %s", hit.id, error)
            continue
        check = checks.get(hit.key)
        pairs = check.pairs if check is not None else np.zeros((0, 2), np.int32)
        item = items.get(hit.key)
        item_points = item.keypoints[pairs[:, 1], :2] if item is not None and len(pairs) else np.zeros((0, 2))
        inliers = check.inliers if check is not None else 0
        verdict = "verified" if inliers >= min_inliers else "not verified"
        caption = f"#{rank} {hit.title}  score {hit.score:.3f}  {inliers} inliers ({verdict})"
        canvas = draw_matches(query_image, item_image, query_points[pairs[:, 0], :2] if len(pairs) else np.zeros((0, 2)), item_points, caption)
        path = folder / f"{rank:02d}_{_slug(hit.id)}.jpg"
        cv2.imwrite(str(path), canvas)
        written.append(path)
    return written
