"""Region evidence: square windows over the photo scored against the catalog, non-maximum
suppression keeping the best window of each place, and box voting refining its box."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from catalens.indexer.features import WindowEmbedder, embed
from catalens.search.engine import SearchEngine
from catalens.search.locate.boxes import PhotoEdges, _inside_fraction, iou, snap_box
from catalens.search.locate.crops import _fused_cosines, _global_weights
from catalens.search.locate.results import Box, _Candidate
from catalens.search.locate.settings import LocateSettings


def windows(size: tuple[int, int], fractions: Sequence[float]) -> list[tuple[int, int, int, int]]:
    """Square windows, each side a fraction of the shorter side, at half-window stride, edges included."""
    width, height = size
    boxes = []
    for fraction in fractions:
        side = max(16, round(min(width, height) * fraction))
        stride = max(1, side // 2)
        xs = sorted({*range(0, max(1, width - side + 1), stride), max(0, width - side)})
        ys = sorted({*range(0, max(1, height - side + 1), stride), max(0, height - side)})
        boxes += [(x, y, min(width, x + side), min(height, y + side)) for y in ys for x in xs]
    return list(dict.fromkeys(boxes))


def _embed_windows(engine: SearchEngine, image: Image.Image, boxes: Sequence[Box],
                   settings: LocateSettings) -> dict[str, np.ndarray]:
    """``_embed_crops`` of the windows ``boxes``, but through ``window_rows`` for every feature that has
    it (``settings.window_maps``): shared trunk maps, one thumbnail a window side."""
    features = {name: engine.catalog.feature(name) for name in _global_weights(engine)}
    shared = {name for name, feature in features.items() if settings.window_maps and isinstance(feature, WindowEmbedder)}
    crops = [image.crop(box) for box in boxes] if len(shared) < len(features) else []
    return {name: feature.window_rows(image, boxes) if name in shared else embed(feature, crops, one_view=True)
            for name, feature in features.items()}


def region_detections(engine: SearchEngine, image: Image.Image, settings: LocateSettings,
                      edges: PhotoEdges | None = None) -> tuple[list[_Candidate], dict[int, Box]]:
    """(the best window of each place after NMS, above ``min_region_score``; the best items of
    every place NMS kept, with their window, for local verification)."""
    weights = _global_weights(engine)
    if not weights:
        return [], {}
    boxes = windows(image.size, settings.window_fractions)
    vectors = _embed_windows(engine, image, boxes, settings)
    candidate_keys = []
    for name in weights:
        _, keys = engine.catalog.vectors(name).search(vectors[name], settings.region_candidates)
        candidate_keys.append(keys)
    union = np.unique(np.concatenate([keys[keys >= 0] for keys in candidate_keys]))
    if not len(union):
        return [], {}
    total = _fused_cosines(engine, vectors, union)
    # Only each window's own candidates count (a key another window found is not its evidence).
    own = np.zeros_like(total, bool)
    for keys in candidate_keys:
        for row, window_keys in enumerate(keys):
            own[row, np.searchsorted(union, window_keys[window_keys >= 0])] = True
    total = np.where(own, total, -1.0)
    # Each window's score for each product: the mean of its best ``photos_per_product`` items (a
    # window not among an item's neighbours gives it 0), so one lucky look-alike photo counts
    # less than several photos of the same product.
    records = engine.catalog.items.items(union.tolist())
    products, product_of = np.unique([records[int(key)].category if int(key) in records else "" for key in union],
                                     return_inverse=True)
    votes = max(1, settings.photos_per_product)
    by_product = np.zeros((len(boxes), len(products)), np.float32)
    best_item = np.zeros((len(boxes), len(products)), np.int64)
    floored = np.maximum(total, 0.0)
    for product in range(len(products)):
        columns = np.nonzero(product_of == product)[0]
        ranked = np.argsort(-floored[:, columns], axis=1)
        best_item[:, product] = columns[ranked[:, 0]]
        top = np.take_along_axis(floored[:, columns], ranked[:, :votes], axis=1)
        by_product[:, product] = top.sum(axis=1) / votes
    best_product = by_product.argmax(axis=1)
    best_scores = by_product[np.arange(len(boxes)), best_product]
    best = best_item[np.arange(len(boxes)), best_product]
    kept = suppress(boxes, by_product, image.size, settings)
    items: dict[int, Box] = {}
    for index in kept:
        x0, y0, x1, y1 = boxes[index]
        margin = (x1 - x0) // 4
        roi = (x0 - margin, y0 - margin, x1 + margin, y1 + margin)
        for column in np.argsort(-total[index])[: settings.items_per_window]:
            items.setdefault(int(union[column]), roi)
    regions: list[_Candidate] = []
    for i in kept:
        if best_scores[i] < settings.min_region_score:
            continue
        box = voted_box(i, boxes, best_product, by_product, settings)
        if edges is not None:
            box = snap_box(box, edges, settings)
            # Two windows of one product that snapped to the same borders: one detection.
            if any(iou(box, other.box) > settings.nms_iou for other in regions):
                continue
        regions.append(_Candidate(int(union[best[i]]), float(best_scores[i]), box, "region"))
    return regions, items


def suppress(boxes: Sequence[Box], by_product: np.ndarray, size: tuple[int, int], settings: LocateSettings) -> list[int]:
    """Non-maximum suppression over the windows: the indices kept, best first.

    ``by_product[i, p]`` is window i's score for product p; each window stands for its best product."""
    best_product = by_product.argmax(axis=1)
    best_scores = by_product[np.arange(len(boxes)), best_product]
    # Part of a product resembles other products more often than the whole does: at equal
    # score, the larger window is the product.
    sides = np.array([box[2] - box[0] for box in boxes], np.float32)
    priority = best_scores * (sides / sides.min()) ** settings.size_prior
    # Kept windows as a mask at a quarter of the photo's resolution, for the union test.
    covered = np.zeros((size[1] // 4 + 1, size[0] // 4 + 1), bool)
    kept: list[int] = []
    for index in np.argsort(-priority, kind="stable"):
        box = boxes[index]
        if any(iou(box, boxes[other]) > settings.nms_iou or _inside_fraction(box, boxes[other]) > 0.7
               or _inside_fraction(boxes[other], box) > 0.7 for other in kept):
            continue
        # Mostly inside the kept windows together, though inside none of them alone: it straddles
        # products already found (at the smallest scale no part test below can tell).
        x0, y0, x1, y1 = (v // 4 for v in box)
        if settings.union_covered is not None and covered[y0:y1, x0:x1].mean() > settings.union_covered:
            continue
        # Touching a window of the same product: another view of that one instance.
        if any(best_product[other] == best_product[index] and iou(box, boxes[other]) > 0.0 for other in kept):
            continue
        # A window over several products: most of its parts prefer other products clearly.
        parts = [i for i in range(len(boxes)) if sides[i] < sides[index] and _inside_fraction(boxes[i], box) > 0.9]
        if parts:
            product = best_product[index]
            agree = np.mean([by_product[i, product] >= best_scores[i] - settings.part_tolerance for i in parts])
            if agree < 0.5:
                continue
            if settings.part_veto is not None and any(
                    2 * sides[i] >= sides[index] and best_scores[i] >= settings.min_region_score
                    and by_product[i, product] <= best_scores[i] - settings.part_veto for i in parts):
                continue
        kept.append(int(index))
        covered[y0:y1, x0:x1] = True
        if len(kept) >= settings.max_detections:
            break
    return kept


def voted_box(index: int, boxes: Sequence[Box], best_product: np.ndarray, by_product: np.ndarray,
               settings: LocateSettings) -> tuple[float, float, float, float]:
    """The kept window's box refined by the windows that agree with it (box voting).

    Windows at one scale see a product through a fixed frame; the best-scoring one is often a
    part of the product (a third of a cell where the cell is half the photo). The windows
    around it that show the same product almost as well outline it better together."""
    own = tuple(float(v) for v in boxes[index])
    if settings.vote_tolerance is None:
        return own
    product = best_product[index]
    floor = by_product[index, product] - settings.vote_tolerance
    voters = [j for j in range(len(boxes)) if best_product[j] == product and by_product[j, product] >= floor
              and iou(boxes[j], boxes[index]) >= settings.vote_iou]
    weights = np.array([by_product[j, product] for j in voters], np.float64)
    coords = np.array([boxes[j] for j in voters], np.float64)
    return tuple(float(v) for v in weights @ coords / weights.sum())
