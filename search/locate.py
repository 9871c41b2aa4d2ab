"""Which catalog products a photo shows, and where: one box per product instance.

Two kinds of evidence, merged into one ranked, de-duplicated list:

- local (printed labels, logos): the photo's RootSIFT keypoints are matched to candidate items
  (the photo's best visual-word matches and the region step's best items); a similarity
  transform fitted by RANSAC maps the item's image rectangle into the photo, which is the box.
  The keypoints inside a found box are then set aside and the search repeats, so that several
  products, and several instances of one product, are found one after the other.
- regions (fruit, vegetables, anything with too little texture for keypoints): square windows
  at several scales over the photo are embedded in one batch by the global features (deep,
  colour) and scored against the catalog as fused search scores a photo; non-maximum
  suppression keeps the best window of each place, and the windows around it that show the
  same product almost as well refine its box (box voting).

Either kind of box then snaps to the product's borders: each side moves to a nearby straight
colour step that runs along most of it (a window is square and on a fixed grid; a transform
carries the whole catalog photo, shelf included, into the photo).

The catalog's classifier (the one behind ``classify``) then names each region from the crop of
its final box, and has a say among the items that agree on a verified box, overrules them
where it is sure of another product, and drops a verified box whose product it all but rules
out (a match on what the catalog photo shows around its product): it names a product photo
better than its nearest catalog photos do, and a sibling pack (same brand, other flavour)
better than their shared inliers do.

A verified local detection outranks every region detection (as in ``local_search``), and a
region that overlaps a verified box (IoU > 0.3) or lies mostly inside one is dropped, unless it
holds none of the box's inliers (the box reached over it). Scores: a local detection
``1 + min(inliers, cap) / cap``; a region the weighted cosine of its box's crop to the named
item (without the classifier: the mean over its product's best two catalog photos), in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from catalens.indexer.features import WindowEmbedder, embed, feature_spec, l2_normalise
from catalens.indexer.features.sift import LocalDescriptors, SiftPreparer
from catalens.indexer.imageio import (
    QUERY_DECODE_BUDGET,
    QUERY_MAX_DECODE_BYTES,
    ImageDecodeError,
    ImageSource,
    load_rgb,
)
from catalens.indexer.stores import stack_rows
from catalens.search.classify import FittedClassifier, fitted_classifier, weighted_features
from catalens.search.engine import SearchEngine
from catalens.search.retrieval import build_models, side_pool
from catalens.search.verification import match_descriptors

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class LocateSettings:
    """How ``locate`` looks; thresholds tuned on composites of grocery val, seeds 100+, against a
    fine-tuned iconic + train index (``benchmarks/bench_locate.py`` reports held-out seeds 0..)."""

    max_detections: int = 20
    # The photo is worked on at most this long a side (boxes are given in the original's pixels).
    work_side: int = 1280
    # Local evidence: keypoints per photo, candidates verified, inliers that make a detection.
    keypoints: int = 3000
    # Each candidate is matched against every keypoint: 30 -> 20 took twelve 3x3 grids from 1.24
    # to 1.16 s (median, in turn in one process); seeds 100-139 2x2 / 3x3 / clutter recall 89.4 /
    # 76.9 / 87.3 -> 89.4 / 76.7 / 87.3.
    word_candidates: int = 20
    min_inliers: int = 15
    inlier_cap: int = 30
    ratio: float = 0.8
    # Region evidence: window sides as fractions of the photo's shorter side, each at half-window stride.
    window_fractions: tuple[float, ...] = (1.0, 0.5, 1 / 3)
    # A feature that can (``deep_ft``, ``colour``: ``WindowEmbedder``) embeds the windows from one
    # pass over the photo per window side (network maps, a thumbnail), not one per window. On 2
    # cores, fresh composites (seeds 200-239): median 1.89 / 2.20 / 1.83 s a photo (2x2, 3x3,
    # clutter) with cropped windows, 1.18 / 1.44 / 1.12 s with maps (README: recall and precision
    # over three seed sets). False: every window cropped and embedded.
    window_maps: bool = True
    region_candidates: int = 20
    # Tuned with window maps on seeds 100-139: at 0.45 they found as many products as cropped
    # windows at 0.5 (2x2 86.9 / 81.8 both; at 0.5, maps gave 83.8 / 83.2). Cropped windows at
    # 0.45 found more at lower precision (2x2 88.8 / 79.8, clutter 83.1 / 79.0).
    min_region_score: float = 0.45
    nms_iou: float = 0.3
    # A region whose area lies this much inside a verified box is the same product, unless it
    # holds no more than ``core_overlap`` of the box's inliers' extent.
    covered: float = 0.5
    core_overlap: float = 0.0
    # Region candidates handed to local verification: each window's best items, this many.
    items_per_window: int = 2
    # A window's score for a product: the mean of its best this many photos of it.
    product_votes: int = 2
    # NMS ranks a window by score * (side / smallest side) ** size_prior.
    size_prior: float = 0.15
    # A part agrees with its window when it scores the window's product within this of its own best.
    part_tolerance: float = 0.05
    # A window is dropped where a part at least half its side shows another product clearly: it
    # scores that one ``min_region_score`` or more, and the window's product this much less.
    # A whole 2x2 grid otherwise passes as one product where the straddling windows side with the
    # whole. Seeds 100-139 (2x2 / 3x3 / clutter recall): none 86.9 / 74.2 / 87.3, 0.2 87.5 / 76.4 /
    # 87.3, 0.3 and 0.4 88.1 / 76.1 / 87.3; 2x2 precision 83.7 -> 82.9. None: no veto.
    part_veto: float | None = 0.3
    # Box voting: a kept window's box becomes the score-weighted mean of the windows that overlap
    # it (IoU >= vote_iou), prefer its product and score it within vote_tolerance of its own
    # score. None: the window as it is. Tuned on seeds 100-139 (0.03-0.2, mean or union).
    vote_tolerance: float | None = 0.1
    vote_iou: float = 0.3
    # NMS drops a window whose area lies more than this inside the windows already kept, taken
    # together: a window across the border of two products, or over a product's corner. Tuned on
    # seeds 100-139 (0.5-0.7). None: only the pairwise tests.
    union_covered: float | None = 0.6
    # Box snapping: each side of a detection's box moves to the strongest straight border within this
    # share of the box's side outward (half of it inward), where one runs along most of the side;
    # to the photo's edge where the band reaches it and no border does. None: boxes as voted.
    snap_band: float | None = 0.5
    # A border: a colour step (summed over R, G, B, two pixels apart) that most of the side
    # crosses, at least this large and this many times the band's median step.
    snap_min_step: float = 40.0
    snap_contrast: float = 3.0
    # The catalog's classifier names a region detection over its final box's crop (instead of the
    # kept window's nearest photos), and has a say among the products that agree on a verified
    # box: on the tuning grids' cells cut out exactly, the classifier (fine-tuned index) names
    # 91.2% (2x2) and 88.6% (3x3), fused search's top product 82.5% and 86.4%. False: neither.
    classify: bool = True
    # Sibling packs (same brand and layout, another flavour or fat content) share inliers enough
    # that the wrong one verifies; the classifier, over the snapped box's crop, renames a verified
    # box when it gives another leaf at least this probability. Tuned on seeds 100-139 and
    # 400-439 (2x2 recall 90.0 and 83.1 -> 90.0 and 83.8 at 0.5; 0.3 89.4 and 83.8; 0.7 unchanged).
    # None: the classifier only chooses among the items that verified there.
    overrule_verified: float | None = 0.5
    # The boxes named (a handful a photo, not the ~50 windows) go through the network with their
    # mirror image, as catalog rows were made. Seeds 100-139 and 400-439 (2x2 / 3x3 / clutter
    # recall): one view 90.0 and 83.8 / 75.0 and 76.4 / 86.4 and 82.2, both 88.8 and 85.0 / 75.8
    # and 77.8 / 86.4 and 83.1, at the same median time.
    name_with_mirror: bool = True
    # A verified box whose own product gets less than this from the classifier over its snapped
    # crop matched what the catalog photo shows around its product (other packs on the shelf, a
    # price label), not the product: it is dropped and the windows there stand. Seeds 100-139 and
    # 400-439 (2x2 recall): none 88.8 and 85.0, 0.02 90.0 and 85.6, 0.05 90.6 and 86.2, 0.1 90.6 and
    # 85.6 (clutter 86.4 -> 86.4 / 85.6 / 84.7 on 100-139). None: kept.
    disowned_verified: float | None = 0.05


@dataclass(frozen=True)
class Detection:
    id: str
    score: float
    category: str
    title: str
    box: Box
    evidence: str = "local"  # "local" (verified keypoints) or "region" (window similarity)
    key: int = field(default=-1, repr=False)
    # The calibrated probability that the box shows this item's category (what ``classify`` gives
    # that leaf for the box's crop); None where the catalog has no classifier or ``classify`` is off.
    confidence: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "score": round(float(self.score), 6), "category": self.category, "title": self.title,
               "box": [int(v) for v in self.box]}
        if self.confidence is not None:
            out["confidence"] = round(float(self.confidence), 4)
        return out


@dataclass
class LocateResult:
    query: str
    detections: list[Detection] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"query": self.query, "error": self.error}
        return {"query": self.query, "detections": [d.to_json() for d in self.detections or []]}


@dataclass(frozen=True)
class _Candidate:
    """One detection before the catalog record is looked up."""

    key: int
    score: float
    box: tuple[float, float, float, float]
    evidence: str
    confidence: float | None = None
    # A verified box's inlier keypoints' extent: where the product surely is.
    core: tuple[float, float, float, float] | None = None


# --- geometry


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inside_fraction(a: Sequence[float], b: Sequence[float]) -> float:
    """How much of ``a``'s area lies inside ``b``."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1])
    return inter / area if area > 0 else 0.0


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


# --- decoding


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


# --- local evidence


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


def photo_keypoints(image: Image.Image, settings: LocateSettings) -> LocalDescriptors:
    """The photo's RootSIFT keypoints, at most ``settings.keypoints``, at up to ``work_side``."""
    return SiftPreparer(settings.keypoints, min(max(image.size), settings.work_side))(image)


@dataclass(frozen=True)
class WordCandidates:
    """The photo's keypoints and the items its visual words find, decoded: the local step's part
    that needs no window, done on a side thread while the windows go through the network (3x3
    grids, seeds 0-39, 12 photos timed in turn: median 1.50 -> 1.45 s). Matching them there too
    saved nothing: BLAS and the network then share the two cores."""

    query: LocalDescriptors
    items: dict[int, LocalDescriptors]


def photo_word_candidates(engine: SearchEngine, image: Image.Image, settings: LocateSettings) -> WordCandidates | None:
    """The photo's keypoints and its best ``settings.word_candidates`` items by visual words; None
    where the catalog has no local feature."""
    features = engine.catalog.local_features()
    if not features:
        return None
    name = features[0]
    query = photo_keypoints(image, settings)
    if len(query) < settings.min_inliers:
        return WordCandidates(query, {})
    keys, _ = engine.catalog.words(name).search(engine.catalog.feature(name).quantise(query),
                                                settings.word_candidates, None)
    return WordCandidates(query, _decoded_items(engine, name, keys))


def _decoded_items(engine: SearchEngine, name: str, keys: Collection[int]) -> dict[int, LocalDescriptors]:
    local = engine.catalog.feature(name)
    return {key: local.decode(blob) for key, blob in engine.catalog.items.rows(name, [int(k) for k in keys]).items()}


def _matched(query: LocalDescriptors, items: dict[int, LocalDescriptors], rows: np.ndarray,
             settings: LocateSettings) -> dict[int, np.ndarray]:
    """Each item's ratio-test matches from the query keypoints ``rows``, where there are enough."""
    pairs = {}
    for key, item in items.items():
        # Query to item, so that several instances of one product in the photo all keep their matches.
        found = match_descriptors(query.descriptors[rows], item.descriptors, settings.ratio)
        if len(found) >= settings.min_inliers:
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
    if words is None or len(words.query) < settings.min_inliers:
        return []
    name = engine.catalog.local_features()[0]
    query = words.query
    xy = query.keypoints[:, :2]
    items = dict(words.items)
    pairs = _matched(query, items, np.arange(len(query)), settings)
    for key, item in _decoded_items(engine, name, [k for k in region_items if k not in items]).items():
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
            fits[key] = _fit_box(query, items[key], usable, image.size, settings.min_inliers) \
                if len(usable) >= settings.min_inliers else None
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
    # frame carried over the next product (seeds 100-139 and 400-439, 2x2 recall 90.0 and 81.2 ->
    # 90.0 and 83.1).
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


# --- region evidence


def _global_weights(engine: SearchEngine) -> dict[str, float]:
    return {name: weight for name, weight in engine.weights().items() if feature_spec(name).kind == "global"}


def _embed_crops(engine: SearchEngine, crops: Sequence[Image.Image], one_view: bool = True) -> dict[str, np.ndarray]:
    """Every weighted global feature of every crop, in one batch a feature; ``one_view``: the crop
    alone, else with its mirror image as catalog rows are made (for the few boxes named).

    One view (``embed``): a photo's ~50 crops take half the network passes of ``deep_ft`` (the
    region step was 1.54 s of a 2x2 grid's 1.98 s). Recall on the tuning composites (seeds
    100-139) was no lower: 2x2 77.5 against 76.9, 3x3 79.2 against 79.2, clutter 76.3 against
    72.9; on the held-out seeds 0.3-1.7 points lower, one or two products of 120-360.
    """
    return {name: embed(engine.catalog.feature(name), crops, one_view=one_view) for name in _global_weights(engine)}


def _embed_windows(engine: SearchEngine, image: Image.Image, boxes: Sequence[Box],
                   settings: LocateSettings) -> dict[str, np.ndarray]:
    """``_embed_crops`` of the windows ``boxes``, but through ``window_rows`` for every feature that has
    it (``settings.window_maps``): shared trunk maps, one thumbnail a window side."""
    features = {name: engine.catalog.feature(name) for name in _global_weights(engine)}
    shared = {name for name, feature in features.items() if settings.window_maps and isinstance(feature, WindowEmbedder)}
    crops = [image.crop(box) for box in boxes] if len(shared) < len(features) else []
    return {name: feature.window_rows(image, boxes) if name in shared else embed(feature, crops, one_view=True)
            for name, feature in features.items()}


def _fused_cosines(engine: SearchEngine, vectors: dict[str, np.ndarray], keys: np.ndarray) -> np.ndarray:
    """(crops, keys) weighted cosine sums, divided by the weights' sum (in [0, 1] for photos)."""
    weights = _global_weights(engine)
    total = np.zeros((len(next(iter(vectors.values()))), len(keys)), np.float32)
    order = np.argsort(keys)
    for name, weight in weights.items():
        found, rows = stack_rows(engine.catalog.items.rows(name, keys.tolist()), engine.catalog.dims()[name])
        cosines = np.zeros_like(total)
        cosines[:, order[np.searchsorted(keys[order], found)]] = vectors[name] @ l2_normalise(rows).T
        total += weight * cosines
    return total / max(sum(weights.values()), 1e-9)


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
    # Each window's score for each product: the mean of its best ``product_votes`` items (a
    # window not among an item's neighbours gives it 0), so one lucky look-alike photo counts
    # less than several photos of the same product.
    records = engine.catalog.items.items(union.tolist())
    products, product_of = np.unique([records[int(key)].category if int(key) in records else "" for key in union],
                                     return_inverse=True)
    votes = max(1, settings.product_votes)
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


# --- box snapping


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


def _leaf_probabilities(engine: SearchEngine, crops: Sequence[Image.Image], vectors: dict[str, np.ndarray],
                        one_view: bool = True) -> tuple[FittedClassifier, tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """(the catalog's classifier, its ``leaf_proba`` answer for the crops: leaf probabilities first),
    or None where the index has nothing to classify with. ``vectors``: the crops' global features,
    where already embedded."""
    try:
        fitted = fitted_classifier(engine.catalog)
    except ValueError:
        return None
    missing = [name for name in fitted.weights if name not in vectors]
    vectors = {**vectors, **{name: embed(engine.catalog.feature(name), crops, one_view=one_view) for name in missing}}
    return fitted, fitted.classifier.leaf_proba(weighted_features(vectors, fitted.weights))


def classified(engine: SearchEngine, image: Image.Image, regions: Sequence[_Candidate],
               mirror: bool = True) -> list[_Candidate]:
    """``regions`` renamed by the catalog's classifier over the crop of each box: the leaf it finds
    likeliest, as its catalog photo closest to the crop (weighted cosine, the new score); each crop
    embedded with its mirror image (``LocateSettings.name_with_mirror``) unless ``mirror`` is False.

    A window is a part of its product, and its box grew by voting and snapping since it was
    scored; the classifier (prototypes, neighbours and a linear model over the whole catalog)
    names a product photo better than its nearest photos do."""
    if not regions:
        return []
    crops = [image.crop(tuple(round(v) for v in region.box)) for region in regions]
    vectors = _embed_crops(engine, crops, not mirror)
    classified_ = _leaf_probabilities(engine, crops, vectors, not mirror)
    if classified_ is None:  # nothing to classify with: the windows' own names stand
        return list(regions)
    fitted, computed = classified_
    best = computed[0].argmax(axis=1)
    confidence = fitted.classifier.leaf_confidence(computed, best)
    out = []
    for row, region in enumerate(regions):
        closest = _closest_of_leaf(engine, fitted, int(best[row]), {name: v[row : row + 1] for name, v in vectors.items()})
        if closest is None:
            out.append(region)
            continue
        out.append(_Candidate(closest[0], closest[1], region.box, region.evidence, float(confidence[row])))
    return out


def _closest_of_leaf(engine: SearchEngine, fitted: FittedClassifier, leaf: int, vectors: dict[str, np.ndarray]
                     ) -> tuple[int, float] | None:
    """(key, weighted cosine) of the catalog item of classifier leaf ``leaf`` closest to one crop's
    ``vectors``; None where the leaf holds no item."""
    keys = np.asarray(fitted.keys)[fitted.classifier.support_leaf_ == leaf].astype(np.int64)
    if not len(keys):
        return None
    similarity = _fused_cosines(engine, vectors, keys)[0]
    pick = int(np.argmax(similarity))
    return int(keys[pick]), float(similarity[pick])


def disowned(leaf: int, probabilities: np.ndarray, threshold: float | None) -> bool:
    """Whether the classifier gives a verified box's leaf less than ``threshold`` (None: never); a
    leaf it does not know (-1) is never disowned."""
    return threshold is not None and leaf >= 0 and float(probabilities[leaf]) < threshold


def overruled(leaf: int, probabilities: np.ndarray, threshold: float | None) -> int | None:
    """The classifier's own leaf where it overrules ``leaf`` (a verified box's name): it gives
    another leaf at least ``threshold`` probability. None where it does not (or ``threshold`` is None)."""
    if threshold is None:
        return None
    top = int(np.argmax(probabilities))
    return top if top != leaf and probabilities[top] >= threshold else None


# --- both, merged


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
    build_models(engine, (*engine.catalog.global_features(), *local_features))
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


def draw_detections(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of ``image`` with each detection's box and label (rank, title, confidence or else score)."""
    from PIL import ImageDraw

    drawn = ImageOps.exif_transpose(image).convert("RGB")
    draw = ImageDraw.Draw(drawn)
    width = max(2, round(max(drawn.size) / 400))
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
    for rank, detection in enumerate(detections, 1):
        colour = palette[(rank - 1) % len(palette)]
        x0, y0, x1, y1 = detection.box
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        label = f"{rank}. {detection.title} " + (f"{100 * detection.confidence:.0f}%" if detection.confidence is not None
                                                  else f"{detection.score:.2f}")
        left, top, right, bottom = draw.textbbox((x0 + width, y0 + width), label)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=colour)
        draw.text((x0 + width, y0 + width), label, fill=(255, 255, 255))
    return drawn


def write_drawing(result: LocateResult, folder: Path) -> Path:
    """``result``'s photo (``result.query`` is its path) drawn with its boxes, as
    ``folder/<photo name>.boxes.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(result.query)
    with Image.open(source) as photo:
        drawn = draw_detections(photo, result.detections or [])
    out = folder / f"{source.stem}.boxes.png"
    drawn.save(out)
    return out
