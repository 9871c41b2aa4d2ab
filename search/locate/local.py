"""Local evidence: the photo's keypoints matched to candidate items, each verified match mapping
the item's image into the photo as a box, found one after another with the explained keypoints
set aside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from catalens.indexer.features import LocalFeature
from catalens.indexer.features.sift import LocalDescriptors
from catalens.search.engine import SearchEngine
from catalens.search.locate.boxes import PhotoEdges, _inside_fraction, iou, snap_box
from catalens.search.locate.crops import _embed_crops, _fused_cosines
from catalens.search.locate.naming import _closest_of_leaf, _leaf_probabilities, disowned, overruled
from catalens.search.locate.results import Box, _Candidate
from catalens.search.locate.settings import LocateSettings
from catalens.search.verification import match_descriptors


def _fit_box(query: LocalDescriptors, item: LocalDescriptors, pairs: np.ndarray, photo: tuple[int, int],
             min_inliers: int) -> tuple[int, tuple[float, float, float, float], np.ndarray] | None:
    """(inliers, box in the photo, inlier query keypoints) of the similarity mapping the item into
    the photo, or None when too few agree or the box is implausible."""
    # One item keypoint may absorb several query keypoints; keep one match each.
    _, first = np.unique(pairs[:, 1], return_index=True)
    pairs = pairs[np.sort(first)]
    if len(pairs) < min_inliers:
        return None
    source = item.keypoints[pairs[:, 1], :2].astype(np.float32)
    target = query.keypoints[pairs[:, 0], :2].astype(np.float32)
    item_side = max(max(item.image_size), 1)
    transform, mask = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, maxIters=500,
                                                  ransacReprojThreshold=0.02 * item_side * _scale_guess(source, target))
    if transform is None or mask is None or int(mask.sum()) < min_inliers:
        return None
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    width, height = item.image_size
    corners = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], np.float64) @ transform.T
    x0, y0 = corners.min(axis=0)
    x1, y1 = corners.max(axis=0)
    # Too small to be seen, or larger than the photo: a chance alignment.
    if scale * item_side < 24 or (x1 - x0) * (y1 - y0) > 2.0 * photo[0] * photo[1]:
        return None
    box = (max(0.0, x0), max(0.0, y0), min(float(photo[0]), x1), min(float(photo[1]), y1))
    if box[2] - box[0] < 12 or box[3] - box[1] < 12:
        return None
    inliers = mask.ravel().astype(bool)
    return int(inliers.sum()), box, pairs[inliers, 0]


def _scale_guess(source: np.ndarray, target: np.ndarray) -> float:
    """Rough photo/item scale from the spread of the matched points: the RANSAC tolerance is a
    fraction of the item as it appears in the photo."""
    spread = np.std(source, axis=0).sum()
    return float(np.clip(np.std(target, axis=0).sum() / spread, 0.25, 4.0)) if spread > 1 else 1.0


def photo_keypoints(local: LocalFeature, image: Image.Image, settings: LocateSettings) -> LocalDescriptors:
    """The photo's keypoints under the catalog's local feature, at most ``settings.keypoints``, at up
    to ``work_side``."""
    return local.describe_scene(image, settings.keypoints, min(max(image.size), settings.work_side))


@dataclass(frozen=True)
class WordCandidates:
    """The photo's keypoints and the items its visual words find, decoded: the local step's part
    that needs no window, done on a side thread while the windows go through the network. Matching
    them there too saved nothing: BLAS and the network then share the two cores (docs/locate.md)."""

    query: LocalDescriptors
    items: dict[int, LocalDescriptors]


def photo_word_candidates(engine: SearchEngine, image: Image.Image, settings: LocateSettings) -> WordCandidates | None:
    """The photo's keypoints and its best ``settings.word_candidates`` items by visual words; None
    where the catalog has no local feature."""
    features = engine.catalog.local_features()
    if not features:
        return None
    name = features[0]
    query = photo_keypoints(engine.catalog.feature(name), image, settings)
    if len(query) < settings.detection_inliers:
        return WordCandidates(query, {})
    keys, _ = engine.catalog.words(name).search(engine.catalog.feature(name).quantise(query),
                                                settings.word_candidates, None)
    return WordCandidates(query, engine.catalog.stored_descriptors(name, keys))


def _matched(query: LocalDescriptors, items: dict[int, LocalDescriptors], rows: np.ndarray,
             settings: LocateSettings) -> dict[int, np.ndarray]:
    """Each item's ratio-test matches from the query keypoints ``rows``, where there are enough."""
    pairs = {}
    for key, item in items.items():
        # Query to item, so that several instances of one product in the photo all keep their matches.
        found = match_descriptors(query.descriptors[rows], item.descriptors, settings.ratio)
        if len(found) >= settings.detection_inliers:
            found[:, 0] = rows[found[:, 0]]
            pairs[key] = found
    return pairs


def local_detections(engine: SearchEngine, image: Image.Image, region_items: dict[int, Box],
                     settings: LocateSettings, words: WordCandidates | None = None,
                     edges: PhotoEdges | None = None) -> list[_Candidate]:
    """Verified boxes, found one after another with the explained keypoints set aside.

    Candidates are the photo's best visual-word matches (``words``, where already found), matched
    against every keypoint, and ``region_items``, each matched only against the keypoints of its
    region (cheaper, and a window's item has nothing to explain elsewhere)."""
    if words is None:
        words = photo_word_candidates(engine, image, settings)
    if words is None or len(words.query) < settings.detection_inliers:
        return []
    name = engine.catalog.local_features()[0]
    query = words.query
    xy = query.keypoints[:, :2]
    items = dict(words.items)
    pairs = _matched(query, items, np.arange(len(query)), settings)
    for key, item in engine.catalog.stored_descriptors(name, [k for k in region_items if k not in items]).items():
        x0, y0, x1, y1 = region_items[key]
        inside = np.nonzero((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1))[0]
        items[key] = item
        pairs.update(_matched(query, {key: item}, inside, settings))

    active = np.ones(len(query), bool)
    fits: dict[int, Any] = {}
    stale = set(pairs)
    chosen: list[tuple[int, Any, dict[int, Any]]] = []
    while pairs and len(chosen) < settings.max_detections:
        for key in stale:
            usable = pairs[key][active[pairs[key][:, 0]]]
            fits[key] = _fit_box(query, items[key], usable, image.size, settings.detection_inliers) \
                if len(usable) >= settings.detection_inliers else None
        fits = {key: fit for key, fit in fits.items() if fit is not None}
        if not fits:
            break
        best = max(fits, key=lambda key: fits[key][0])
        box = fits[best][1]
        if any(iou(box, earlier) > 0.3 or _inside_fraction(box, earlier) > 0.5 for _, earlier, _ in chosen):
            # What is left of a product already found (its box fell short of the whole).
            pairs.pop(best)
            fits.pop(best)
            stale = set()
            continue
        # The items that agree on this place: a sibling product (same brand, other flavour)
        # can win on inliers alone; the crop's global similarity decides between them.
        rivals = {key: fit for key, fit in fits.items() if iou(fit[1], box) > 0.5}
        chosen.append((best, box, rivals))
        # Every keypoint inside the box is this product's: set aside, and refit whoever used them.
        explained = active & (xy[:, 0] >= box[0]) & (xy[:, 0] <= box[2]) & (xy[:, 1] >= box[1]) & (xy[:, 1] <= box[3])
        active &= ~explained
        stale = {key for key in fits if explained[pairs[key][:, 0]].any()}
        pairs = {key: p for key, p in pairs.items() if key in fits}
    if not chosen:
        return []
    # Snapped first, so that the crop that names a box is the product, not the catalog photo's
    # frame carried over the next product (docs/locate.md, box snapping).
    kept: list[tuple[int, tuple[float, float, float, float], dict[int, Any]]] = []
    for best, box, rivals in chosen:
        if edges is not None:
            # The item's image rectangle carried into the photo holds whatever the catalog photo
            # shows around the product (a shelf, other packs); the product's own borders do not.
            box = snap_box(box, edges, settings)
            # Two transforms of one product that snapped to the same borders: one detection.
            if any(iou(box, earlier) > settings.nms_iou for _, earlier, _ in kept):
                continue
        kept.append((best, box, rivals))
    images = [image.crop(tuple(round(v) for v in box)) for _, box, _ in kept]
    one_view = not settings.name_with_mirror
    crops = _embed_crops(engine, images, one_view)
    classifier = _leaf_probabilities(engine, images, crops, one_view) if settings.classify else None
    records = engine.catalog.items.items({key for _, _, rivals in kept for key in rivals}) if classifier else {}
    leaves = {str(leaf): i for i, leaf in enumerate(classifier[0].classifier.leaves_)} if classifier else {}
    found: list[_Candidate] = []
    for row, (best, box, rivals) in enumerate(kept):
        keys = list(rivals)
        vectors = {name: v[row : row + 1] for name, v in crops.items()}
        similarity = _fused_cosines(engine, vectors, np.array(keys))[0]
        evidence = [min(rivals[key][0], settings.inlier_cap) / settings.inlier_cap for key in keys]
        agreement = np.add(evidence, similarity)
        leaf = -1
        if classifier is not None:
            fitted, computed = classifier
            leaf_of = [leaves.get(records[key].category, -1) if key in records else -1 for key in keys]
            agreement += [computed[0][row, of] if of >= 0 else 0.0 for of in leaf_of]
        pick = int(np.argmax(agreement))
        key = keys[pick]
        if classifier is not None:
            leaf = leaf_of[pick]
            if disowned(leaf, computed[0][row], settings.disowned_verified):
                continue
            overruling = overruled(leaf, computed[0][row], settings.overrule_verified)
            closest = None if overruling is None else _closest_of_leaf(engine, fitted, overruling, vectors)
            if closest is not None:
                key, leaf = closest[0], overruling
        confidence = None
        if leaf >= 0:
            confidence = float(fitted.classifier.leaf_confidence(tuple(a[row : row + 1] for a in computed), [leaf])[0])
        inliers = xy[rivals[best][2]]
        (x0, y0), (x1, y1) = inliers.min(axis=0), inliers.max(axis=0)
        found.append(_Candidate(key, 1.0 + evidence[pick], box, "local", confidence,
                                (float(x0), float(y0), float(x1), float(y1))))
    return found
