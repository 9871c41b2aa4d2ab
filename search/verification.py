"""Geometric verification: do two images' keypoints agree on one transform of the page?

Descriptor matches (mutual ratio test) are fitted by RANSAC; the inliers are the matches the
transform explains. A printed label seen in another photo keeps many inliers; texture that
merely looks alike (fruit skin, carton ridges) keeps few.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from catalens.indexer.features.sift import LocalDescriptors


@dataclass(frozen=True)
class Verification:
    inliers: int
    matches: int
    # (m, 2) indices (query keypoint, item keypoint) of the inlier matches, for drawing.
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32), repr=False)


_EMPTY = Verification(0, 0)


def match_descriptors(query: np.ndarray, item: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    """(m, 2) index pairs passing Lowe's ratio test."""
    if len(query) < 2 or len(item) < 2:
        return np.zeros((0, 2), np.int32)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    knn = matcher.knnMatch(np.ascontiguousarray(query, np.float32), np.ascontiguousarray(item, np.float32), k=2)
    pairs = [(m.queryIdx, m.trainIdx) for m, n in (p for p in knn if len(p) == 2) if m.distance < ratio * n.distance]
    return np.array(pairs, np.int32).reshape(-1, 2)


def verify(
    query: LocalDescriptors,
    item: LocalDescriptors,
    model: str = "similarity",
    ratio: float = 0.8,
    threshold: float = 0.02,
) -> Verification:
    """Inliers of the best ``model`` (similarity | affine | homography) mapping query onto item.

    ``threshold`` is the RANSAC reprojection tolerance as a fraction of the item's longer side,
    so it means the same for a 200 px catalog shot and a 4000 px upload.
    """
    pairs = match_descriptors(query.descriptors, item.descriptors, ratio)
    if len(pairs) < 4:
        return Verification(0, len(pairs))
    # One item keypoint may absorb several query keypoints; keep one match each (the first).
    _, first = np.unique(pairs[:, 1], return_index=True)
    pairs = pairs[np.sort(first)]
    if len(pairs) < 4:
        return Verification(0, len(pairs))
    source = query.keypoints[pairs[:, 0], :2].astype(np.float32)
    target = item.keypoints[pairs[:, 1], :2].astype(np.float32)
    tolerance = threshold * max(max(item.image_size), 1)
    if model == "homography":
        _, mask = cv2.findHomography(source, target, cv2.RANSAC, tolerance, maxIters=500)
    elif model == "affine":
        _, mask = cv2.estimateAffine2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=tolerance, maxIters=500)
    elif model == "similarity":
        _, mask = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=tolerance, maxIters=500)
    else:
        raise ValueError(f"unknown geometric model {model!r}: similarity | affine | homography")
    if mask is None:
        return Verification(0, len(pairs))
    inlier = mask.ravel().astype(bool)
    return Verification(int(inlier.sum()), len(pairs), pairs[inlier])
