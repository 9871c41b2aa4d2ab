"""The ``sift`` local feature: RootSIFT keypoints per image, quantised into visual words.

Per-item keypoints and descriptors are rows of the item store (written by the indexing run).
What depends on the whole catalog, the visual vocabulary and each item's words, is kept in
line by ``refresh_words`` after every run, on either backend: the vocabulary (the ``VOCABULARY``
slot, ``indexer.fitted``) is fitted once and refitted when the catalog has outgrown it, and only
the items whose words are missing or from another vocabulary are quantised, so a run that adds
a few items quantises those alone and a run killed at any point is repaired by the next.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from catalens.indexer.estimator import ModelFileError
from catalens.indexer.features import FeatureUnavailableError, register_feature
from catalens.indexer.features.decode import in_decode_worker
from catalens.indexer.features.visual_vocabulary import VisualVocabulary, auto_vocab_size
from catalens.indexer.fitted import FittedSlot

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

log = logging.getLogger(__name__)

FEATURE_NAME = "sift"
# Blob layouts, read by version. 1 (catalens <= 0.3): float32 geometry, one uint8 a component.
# 2 (written now): half the bytes, 72 a keypoint instead of 144.
#  - Geometry as float16, positions and sizes as fractions of the image's longer side: 1/2048 of
#    the side at worst, against a RANSAC tolerance of 1/50 of it, and no overflow on big photos.
#  - Components as 4-bit codes of their square root (RootSIFT is already a square root, so this
#    spends the levels where the values are). On 50 val photos against a catalog photo of their
#    product, mean inliers were 5.0 with 4 bits, 5.0 with 8 and 5.1 unquantised; photos of other
#    products kept 1.5 in all three.
_BLOB_VERSION = 2
_V1_DESCRIPTOR_SCALE = 512.0  # v1: RootSIFT components in [0, ~0.5], ~0.002 steps
_V2_CODE_SCALE = 15.0 / np.sqrt(0.5)  # v2: code = rint(sqrt(component) * scale), 0..15
_V2_LEVELS = (np.arange(16, dtype=np.float32) / np.float32(_V2_CODE_SCALE)) ** 2
_V2_PAIRS = np.stack([_V2_LEVELS[np.arange(256) >> 4], _V2_LEVELS[np.arange(256) & 15]], axis=1)  # byte -> 2 components


@dataclass
class SiftOptions:
    """How RootSIFT is extracted and its vocabulary fitted; ``IndexConfig.feature_options["sift"]``."""

    max_keypoints: int = 400
    # Long side of the copy SIFT runs on: product photos are ~350 px; more pixels cost time
    # (SIFT upsamples 2x internally) without finding more of the printed label. New indexes
    # write it into their configuration, indexes from before it were built at 320 (the
    # registration's ``written_options`` and ``stored_options``; docs/speed.md).
    image_size: int = 256
    # 0 chooses from the catalog size (see ``auto_vocab_size``).
    vocab_size: int = 0
    sample_per_word: int = 24
    kmeans_iterations: int = 8
    # Refit the vocabulary once the catalog has this many times the images it was fitted on.
    refit_growth: float = 2.0
    seed: int = 1234

    @classmethod
    def from_catalog(cls, catalog: Any) -> SiftOptions:
        from catalens.indexer.features import options_of

        return options_of(catalog, FEATURE_NAME, cls)


# --- extraction


@dataclass
class LocalDescriptors:
    """Keypoints of one image, in the original image's pixel coordinates, with RootSIFT rows."""

    keypoints: np.ndarray  # (n, 4) float32: x, y, size, angle
    descriptors: np.ndarray  # (n, 128) float32, L2 norm 1
    image_size: tuple[int, int] = (0, 0)  # width, height of the original image

    def __len__(self) -> int:
        return len(self.keypoints)

    def to_bytes(self) -> bytes:
        width, height = self.image_size
        side = np.float32(max(width, height, 1))
        header = np.array([_BLOB_VERSION, len(self), width, height], np.uint32).tobytes()
        geometry = self.keypoints.astype(np.float32) / np.array([side, side, side, 1.0], np.float32)
        codes = np.clip(np.rint(np.sqrt(np.maximum(self.descriptors, 0.0)) * _V2_CODE_SCALE), 0, 15).astype(np.uint8)
        packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
        return header + geometry.astype(np.float16).tobytes() + packed.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalDescriptors:
        version, n, width, height = (int(value) for value in np.frombuffer(data, np.uint32, count=4))
        if version == 1:
            keypoints = np.frombuffer(data, np.float32, count=n * 4, offset=16).reshape(-1, 4).copy()
            quantised = np.frombuffer(data, np.uint8, count=n * 128, offset=16 + keypoints.nbytes).reshape(-1, 128)
            return cls(keypoints, quantised.astype(np.float32) / _V1_DESCRIPTOR_SCALE, (width, height))
        if version != 2:
            raise ValueError(f"local descriptor blob version {version}, expected 1 or 2")
        side = np.float32(max(width, height, 1))
        keypoints = np.frombuffer(data, np.float16, count=n * 4, offset=16).reshape(-1, 4).astype(np.float32)
        keypoints *= np.array([side, side, side, 1.0], np.float32)
        packed = np.frombuffer(data, np.uint8, count=n * 64, offset=16 + n * 8).reshape(-1, 64)
        # Each byte to its two components through one table (a query reads ~36 blobs).
        return cls(keypoints, np.take(_V2_PAIRS, packed, axis=0).reshape(n, 128), (width, height))


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """Hellinger-kernel SIFT (Arandjelovic & Zisserman 2012): L1-normalise, then square root."""
    descriptors = np.asarray(descriptors, np.float32)
    descriptors = descriptors / np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(descriptors)


# The decode worker process that has told OpenCV to run sequentially.
_sequential_in: int | None = None


class SiftPreparer:
    """RGB image to its strongest ``max_keypoints`` RootSIFT keypoints; runs in decode workers."""

    def __init__(self, max_keypoints: int, image_size: int):
        self.max_keypoints, self.image_size = max_keypoints, image_size
        # One detector per thread (server threads search side by side) and per worker process.
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        # cv2 objects do not pickle; each worker makes its own detector.
        return {"max_keypoints": self.max_keypoints, "image_size": self.image_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _detector(self):
        global _sequential_in
        if _sequential_in != os.getpid() and in_decode_worker():
            # A decode worker (forked by ``iter_prepared``) shares the machine with the network
            # in the main process. Checked per process, not per detector: a worker inherits the
            # detector of the thread that forked it when that thread ran SIFT before (a search).
            # 0 (run sequentially), not 1: resizing the thread pool a forked child inherited
            # from a parent that already ran SIFT hangs forever; 0 leaves the pool alone.
            cv2.setNumThreads(0)
            _sequential_in = os.getpid()
        sift = getattr(self._local, "sift", None)
        if sift is None:
            sift = self._local.sift = cv2.SIFT_create(nfeatures=self.max_keypoints)
        return sift

    def __call__(self, image: Image.Image) -> LocalDescriptors:
        sift = self._detector()
        width, height = image.size
        scale = self.image_size / max(width, height)
        gray = image.convert("L")
        if abs(scale - 1.0) > 0.02:
            gray = gray.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR, reducing_gap=2.0)
        else:
            scale = 1.0
        keypoints, descriptors = sift.detectAndCompute(np.asarray(gray), None)
        if descriptors is None or not keypoints:
            return LocalDescriptors(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.float32), (width, height))
        # nfeatures keeps ties at the cut, so a few extra may come back.
        keypoints, descriptors = keypoints[: self.max_keypoints], descriptors[: self.max_keypoints]
        geometry = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in keypoints], np.float32)
        geometry[:, :3] /= scale
        return LocalDescriptors(geometry, root_sift(descriptors), (width, height))


class SiftFeature:
    """RootSIFT as a ``LocalFeature``: one serialised ``LocalDescriptors`` blob per image."""

    name = FEATURE_NAME

    def __init__(self, options: SiftOptions | None = None, catalog: Any = None):
        self.options = options or SiftOptions()
        self.preparer = SiftPreparer(self.options.max_keypoints, self.options.image_size)
        self.draft_size = self.options.image_size
        self.catalog = catalog

    def finish(self, prepared: list[LocalDescriptors]) -> list[bytes]:
        return [descriptors.to_bytes() for descriptors in prepared]

    def decode(self, blob: bytes) -> LocalDescriptors:
        return LocalDescriptors.from_bytes(blob)

    def quantise(self, descriptors: LocalDescriptors) -> np.ndarray:
        missing = FeatureUnavailableError(
            f"{getattr(self.catalog, 'location', 'this index')}: no visual vocabulary yet (run 'catalens index')")
        if self.catalog is None:
            raise missing
        # The vocabulary the stored words came from, fresh or not: judging it would read the catalog.
        return VOCABULARY.require(self.catalog, missing).transform(descriptors.descriptors)

    def describe_scene(self, image: Image.Image, max_keypoints: int, image_size: int) -> LocalDescriptors:
        return SiftPreparer(max_keypoints, image_size)(image)


# --- the vocabulary and the words, kept in line with the catalog


def _images_with_keypoints(catalog: Any) -> list[int]:
    """Keys of the items that hold keypoints, sorted."""
    return sorted(catalog.items.row_keys(FEATURE_NAME))


def _load_vocabulary(catalog: Any, path: Path) -> VisualVocabulary:
    try:
        return VisualVocabulary.load(path)
    except ModelFileError as error:
        # Fitted on the stored keypoints, so it can always be fitted again.
        raise ModelFileError(f"{error.args[0].split(';')[0]}; run 'catalens check --index "
                             f"{getattr(catalog, 'location', 'DIR')}' to fit it again") from None


def _sample_and_fit(catalog: Any, keys: list[int], n_words: int, options: SiftOptions) -> VisualVocabulary:
    rng = np.random.default_rng(options.seed)
    wanted = n_words * options.sample_per_word
    per_image = max(1, options.max_keypoints // 2)
    sample_keys = rng.permutation(keys)[: max(1, -(-wanted // per_image))]
    rows = []
    for start in range(0, len(sample_keys), 512):
        for blob in catalog.items.rows(FEATURE_NAME, sample_keys[start : start + 512]).values():
            descriptors = LocalDescriptors.from_bytes(blob)
            if len(descriptors):
                rows.append(descriptors.descriptors[rng.permutation(len(descriptors))[:per_image]])
    sample = np.concatenate(rows) if rows else np.zeros((0, 128), np.float32)
    if len(sample) == 0:
        raise ValueError("no local descriptors to fit a vocabulary on")
    return VisualVocabulary(min(n_words, len(sample)), options.kmeans_iterations, options.seed).fit(sample, fitted_on=len(keys))


def fit_vocabulary(catalog: Any, progress: bool = False) -> VisualVocabulary | None:
    """A vocabulary fitted on the items' keypoints, or None where no item holds any."""
    keys = _images_with_keypoints(catalog)
    if not keys:
        return None
    options = SiftOptions.from_catalog(catalog)
    vocabulary = _sample_and_fit(catalog, keys, options.vocab_size or auto_vocab_size(len(keys)), options)
    log.info("fitted a %d-word visual vocabulary on %d images", vocabulary.size, len(keys))
    return vocabulary


def vocabulary_freshness(vocabulary: VisualVocabulary, catalog: Any) -> str | None:
    """None while the vocabulary serves the catalog; stale once the catalog has ``refit_growth``
    times the images it was fitted on, or its configured size changed."""
    images = len(_images_with_keypoints(catalog))
    if not images:
        return "no item holds keypoints"
    options = SiftOptions.from_catalog(catalog)
    if images >= options.refit_growth * max(vocabulary.fitted_on_, 1):
        return (f"the catalog has {images} images with keypoints, {options.refit_growth:g} times or more the "
                f"{vocabulary.fitted_on_} the visual vocabulary was fitted on")
    if options.vocab_size and vocabulary.size != options.vocab_size:
        return f"the visual vocabulary has {vocabulary.size} words, the configuration asks {options.vocab_size}"
    return None


VOCABULARY = FittedSlot(
    name="visual vocabulary", model_file=f"{FEATURE_NAME}_vocabulary.pt", load=_load_vocabulary,
    fit=lambda catalog, progress: fit_vocabulary(catalog, progress), fresh=vocabulary_freshness)


def refresh_words(catalog: Catalog, changed_keys: Collection[int], removed_keys: Collection[int]) -> int:
    """Fit the vocabulary where stale, then quantise the items whose words are stale; returns how many."""
    started = time.perf_counter()
    before = VOCABULARY.status(catalog, judge=False)
    if before.unreadable:
        log.warning("%s; fitting it again", before.reason.split(";")[0])
    state = VOCABULARY.refit(catalog)
    vocabulary = state.model
    if vocabulary is None:
        if _images_with_keypoints(catalog):  # keypoints, but none to fit on
            raise ValueError(state.reason)
        return 0
    words_index = catalog.words(FEATURE_NAME)
    todo = words_index.stale(vocabulary.id_, {int(key) for key in changed_keys})
    for start in range(0, len(todo), 512):
        blobs = catalog.items.rows(FEATURE_NAME, todo[start : start + 512])
        described = {key: LocalDescriptors.from_bytes(blob) for key, blob in blobs.items()}
        if not described:
            continue
        # One call per chunk: per-image calls pay faiss's thread start-up ~500 times over.
        assigned = vocabulary.transform(np.concatenate([d.descriptors for d in described.values()]))
        bounds = np.cumsum([0] + [len(d) for d in described.values()])
        words_index.put({key: assigned[a:b] for key, a, b in zip(described, bounds[:-1], bounds[1:], strict=True)},
                        vocabulary.id_)
    log.info("visual words: %d items quantised in %.1fs", len(todo), time.perf_counter() - started)
    return len(todo)


# In a catalog of packshots a shop photo's descriptor is further from its product's one image
# than from a product's many photos, and a verified label match must outweigh more of it: on the
# grocery packshots, train's five shooting-session folds gained 1.3-2.9 points at 0.5 (val -0.3),
# all of it on packages (docs/search-quality.md).
@register_feature("sift", "local", similarity="inliers", refresh=refresh_words, fitted=(VOCABULARY,),
                  search_weight=0.2, packshot_search_weight=0.5, written_options={"image_size": SiftOptions.image_size},
                  stored_options={"image_size": 320}, legacy_switch="local_features", legacy_options="local",
                  description="RootSIFT keypoints, visual words, geometric verification")
def build_sift(catalog: Catalog) -> SiftFeature:
    return SiftFeature(SiftOptions.from_catalog(catalog), catalog)
