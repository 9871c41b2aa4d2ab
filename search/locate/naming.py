"""Naming boxes with the catalog's classifier: a region from its box's crop, and the classifier's say
over a verified box (overruling it, or disowning it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from catalens.indexer.features import embed
from catalens.search.classifier import weighted_features
from catalens.search.classify import FittedClassifier, fitted_classifier
from catalens.search.engine import SearchEngine
from catalens.search.locate.crops import _embed_crops, _fused_cosines
from catalens.search.locate.results import _Candidate


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
