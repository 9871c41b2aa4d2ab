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

The package's rooms: ``settings`` (``LocateSettings``), ``results`` (what it answers), ``local``
(verified boxes), ``regions`` (windows, suppression, box voting), ``crops`` (crops through the
global features), ``boxes`` (geometry, snapping), ``naming`` (the classifier's say), ``pipeline``
(a photo from source to detections) and ``drawing``.
"""

from catalens.search.locate.boxes import PhotoEdges, iou, snap_box
from catalens.search.locate.drawing import draw_detections, write_drawing
from catalens.search.locate.local import (
    WordCandidates,
    local_detections,
    photo_keypoints,
    photo_word_candidates,
)
from catalens.search.locate.naming import classified, disowned, overruled
from catalens.search.locate.pipeline import locate, locate_image, merge
from catalens.search.locate.regions import region_detections, suppress, voted_box, windows
from catalens.search.locate.results import Box, Detection, LocateResult
from catalens.search.locate.results import _Candidate as _Candidate  # for tests of the merge
from catalens.search.locate.settings import LocateSettings

__all__ = [
    "Box", "Detection", "LocateResult", "LocateSettings", "PhotoEdges", "WordCandidates",
    "classified", "disowned", "draw_detections", "iou", "local_detections", "locate", "locate_image", "merge",
    "overruled", "photo_keypoints", "photo_word_candidates", "region_detections", "snap_box", "suppress",
    "voted_box", "windows", "write_drawing",
]
