"""How ``locate`` looks: one typed object of thresholds, each with why it is there.

The measurements behind each value are in the docs, under "How the settings were tuned" in
``docs/locate.md``."""

from __future__ import annotations

from dataclasses import dataclass

from catalens.search.settings import INLIER_CAP, RATIO


@dataclass(frozen=True)
class LocateSettings:
    """How ``locate`` looks; thresholds tuned on composites of grocery val, seeds 100+, against a
    fine-tuned iconic + train index (``benchmarks/bench_locate.py`` reports held-out seeds 0..)."""

    max_detections: int = 20
    # The photo is worked on at most this long a side (boxes are given in the original's pixels).
    work_side: int = 1280
    # Local evidence: keypoints per photo, candidates verified, inliers that make a detection.
    keypoints: int = 3000
    # Items the visual words find, as search's ``word_candidates`` (40), but each is matched against
    # every keypoint: fewer is faster at the same recall.
    word_candidates: int = 20
    # Inliers a verified box needs (and the query words and matches a candidate needs to be tried):
    # a detection among a shelf's many packs, stricter than search's ``min_inliers`` of 8.
    detection_inliers: int = 15
    inlier_cap: int = INLIER_CAP
    ratio: float = RATIO
    # Region evidence: window sides as fractions of the photo's shorter side, each at half-window stride.
    window_fractions: tuple[float, ...] = (1.0, 0.5, 1 / 3)
    # A feature that can (``deep_ft``, ``colour``: ``WindowEmbedder``) embeds the windows from one
    # pass over the photo per window side (network maps, a thumbnail), not one per window: faster
    # at about the same recall. False: every window cropped and embedded.
    window_maps: bool = True
    region_candidates: int = 20
    # With window maps, 0.45 finds as many products as cropped windows did at 0.5.
    min_region_score: float = 0.45
    nms_iou: float = 0.3
    # A region whose area lies this much inside a verified box is the same product, unless it
    # holds no more than ``core_overlap`` of the box's inliers' extent.
    covered: float = 0.5
    core_overlap: float = 0.0
    # Region candidates handed to local verification: each window's best items, this many.
    items_per_window: int = 2
    # A window's score for a product: the mean of its best this many photos of it (search's
    # ``product_votes`` is another rule: an item's own score plus its product's other photos').
    photos_per_product: int = 2
    # NMS ranks a window by score * (side / smallest side) ** size_prior.
    size_prior: float = 0.15
    # A part agrees with its window when it scores the window's product within this of its own best.
    part_tolerance: float = 0.05
    # A window is dropped where a part at least half its side shows another product clearly: it
    # scores that one ``min_region_score`` or more, and the window's product this much less; else a
    # whole 2x2 grid passes as one product where the straddling windows side with the whole.
    # None: no veto.
    part_veto: float | None = 0.3
    # Box voting: a kept window's box becomes the score-weighted mean of the windows that overlap
    # it (IoU >= vote_iou), prefer its product and score it within vote_tolerance of its own
    # score. None: the window as it is.
    vote_tolerance: float | None = 0.1
    vote_iou: float = 0.3
    # NMS drops a window whose area lies more than this inside the windows already kept, taken
    # together: a window across the border of two products, or over a product's corner. None:
    # only the pairwise tests.
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
    # box: it names a product's crop more often right than fused search does. False: neither.
    classify: bool = True
    # Sibling packs (same brand and layout, another flavour or fat content) share inliers enough
    # that the wrong one verifies; the classifier, over the snapped box's crop, renames a verified
    # box when it gives another leaf at least this probability. None: the classifier only chooses
    # among the items that verified there.
    overrule_verified: float | None = 0.5
    # The boxes named (a handful a photo, not the ~50 windows) go through the network with their
    # mirror image, as catalog rows were made: the crop then looks as the catalog rows do.
    name_with_mirror: bool = True
    # A verified box whose own product gets less than this from the classifier over its snapped
    # crop matched what the catalog photo shows around its product (other packs on the shelf, a
    # price label), not the product: it is dropped and the windows there stand. None: kept.
    disowned_verified: float | None = 0.05
