"""Local descriptors: RootSIFT keypoints per image, a visual vocabulary, a tf-idf inverted index.

Per-item keypoints and descriptors are blobs in SQLite (the truth, written by the indexing run).
What depends on the whole catalog (the vocabulary, each item's visual words, the inverted
index) is derived from them in ``after_update`` and kept under ``models/``; every derived file
is written atomically and checked against the items' fingerprints, so a run killed at any point
is repaired by the next one, and a run that adds a few items only quantises those.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import faiss
import numpy as np
from PIL import Image
from scipy import sparse

from indexer.features import register_extension

log = logging.getLogger(__name__)

FEATURE_NAME = "sift"
_BLOB_VERSION = 1
# RootSIFT components lie in [0, ~0.5]; this scale keeps them in a uint8 with ~0.002 steps.
_DESCRIPTOR_SCALE = 512.0
VOCAB_FILE = "local_vocab.npz"
WORDS_FILE = "local_words.npz"


@dataclass
class LocalConfig:
    """How local features are extracted and indexed; overrides come from ``config.extra["local"]``."""

    max_keypoints: int = 400
    # Long side of the copy SIFT runs on: product photos are ~350 px; more pixels cost time
    # (SIFT upsamples 2x internally) without finding more of the printed label.
    image_size: int = 320
    # 0 chooses from the catalog size (see ``auto_vocab_size``).
    vocab_size: int = 0
    sample_per_word: int = 24
    kmeans_iterations: int = 8
    # Refit the vocabulary once the catalog has this many times the images it was fitted on.
    refit_growth: float = 2.0
    seed: int = 1234

    @classmethod
    def from_index(cls, index: Any) -> LocalConfig:
        overrides = dict(index.config.extra.get("local", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown local feature settings: {', '.join(sorted(unknown))}")
        return cls(**overrides)


def auto_vocab_size(n_images: int) -> int:
    """A power of two near 64 * sqrt(n): 2k words for 1k images, 4k for 3k, 64k for 1M."""
    target = 64.0 * np.sqrt(max(n_images, 1))
    return int(2 ** int(np.clip(round(np.log2(target)), 10, 16)))


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
        header = np.array([_BLOB_VERSION, len(self), *self.image_size], np.uint32).tobytes()
        quantised = np.clip(np.rint(self.descriptors * _DESCRIPTOR_SCALE), 0, 255).astype(np.uint8)
        return header + self.keypoints.astype(np.float32).tobytes() + quantised.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalDescriptors:
        version, n, width, height = np.frombuffer(data, np.uint32, count=4)
        if version != _BLOB_VERSION:
            raise ValueError(f"local descriptor blob version {version}, expected {_BLOB_VERSION}")
        offset = 16
        keypoints = np.frombuffer(data, np.float32, count=int(n) * 4, offset=offset).reshape(-1, 4)
        offset += keypoints.nbytes
        quantised = np.frombuffer(data, np.uint8, count=int(n) * 128, offset=offset).reshape(-1, 128)
        return cls(keypoints.copy(), quantised.astype(np.float32) / _DESCRIPTOR_SCALE, (int(width), int(height)))


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """Hellinger-kernel SIFT (Arandjelovic & Zisserman 2012): L1-normalise, then square root."""
    descriptors = np.asarray(descriptors, np.float32)
    descriptors = descriptors / np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(descriptors)


class SiftPreparer:
    """RGB image to its strongest ``max_keypoints`` RootSIFT keypoints; runs in decode workers."""

    def __init__(self, max_keypoints: int, image_size: int):
        self.max_keypoints, self.image_size = max_keypoints, image_size
        self._sift = None

    def __getstate__(self) -> dict[str, Any]:
        # cv2 objects do not pickle; each worker makes its own detector.
        return {"max_keypoints": self.max_keypoints, "image_size": self.image_size, "_sift": None}

    def __call__(self, image: Image.Image) -> LocalDescriptors:
        if self._sift is None:
            from torch.utils.data import get_worker_info

            if get_worker_info() is not None:
                # A decode worker shares the machine with the network in the main process.
                # 0 (run sequentially), not 1: resizing the thread pool a forked child inherited
                # from a parent that already ran SIFT hangs forever; 0 leaves the pool alone.
                cv2.setNumThreads(0)
            self._sift = cv2.SIFT_create(nfeatures=self.max_keypoints)
        width, height = image.size
        scale = self.image_size / max(width, height)
        gray = image.convert("L")
        if abs(scale - 1.0) > 0.02:
            gray = gray.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR, reducing_gap=2.0)
        else:
            scale = 1.0
        keypoints, descriptors = self._sift.detectAndCompute(np.asarray(gray), None)
        if descriptors is None or not keypoints:
            return LocalDescriptors(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.float32), (width, height))
        # nfeatures keeps ties at the cut, so a few extra may come back.
        keypoints, descriptors = keypoints[: self.max_keypoints], descriptors[: self.max_keypoints]
        geometry = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in keypoints], np.float32)
        geometry[:, :3] /= scale
        return LocalDescriptors(geometry, root_sift(descriptors), (width, height))


class SiftFeature:
    """RootSIFT as a ``LocalFeature``: one serialised ``LocalDescriptors`` blob per image."""

    def __init__(self, config: LocalConfig | None = None):
        self.config = config or LocalConfig()
        self.name = FEATURE_NAME
        self.preparer = SiftPreparer(self.config.max_keypoints, self.config.image_size)
        self.draft_size = self.config.image_size

    def finish(self, prepared: list[LocalDescriptors]) -> list[bytes]:
        return [descriptors.to_bytes() for descriptors in prepared]

    def transform_image(self, image: Image.Image) -> LocalDescriptors:
        return self.preparer(image)


# --- the vocabulary


class NotFittedError(RuntimeError):
    """A learned model used before ``fit``."""


class VisualVocabulary:
    """k-means visual words over RootSIFT descriptors (faiss), sklearn-style."""

    def __init__(self, n_words: int = 4096, iterations: int = 12, seed: int = 1234, restarts: int = 1):
        self.n_words, self.iterations, self.seed, self.restarts = n_words, iterations, seed, restarts

    def fit(self, descriptors: np.ndarray) -> VisualVocabulary:
        descriptors = np.ascontiguousarray(descriptors, np.float32)
        n_words = min(self.n_words, len(descriptors))
        kmeans = faiss.Kmeans(
            descriptors.shape[1], n_words, niter=self.iterations, seed=self.seed, nredo=self.restarts,
            max_points_per_centroid=10_000, min_points_per_centroid=1, verbose=False,
        )
        kmeans.train(descriptors)
        self.cluster_centers_ = np.ascontiguousarray(kmeans.centroids, np.float32)
        self.id_ = uuid.uuid4().hex
        self._searcher = None
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise NotFittedError("this VisualVocabulary is not fitted yet; call fit() first")

    @property
    def size(self) -> int:
        self._check_fitted()
        return len(self.cluster_centers_)

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        """The nearest word of each descriptor, int32."""
        self._check_fitted()
        if len(descriptors) == 0:
            return np.zeros(0, np.int32)
        if getattr(self, "_searcher", None) is None:
            dim = self.cluster_centers_.shape[1]
            if len(self.cluster_centers_) >= 16384:
                # A graph over the words: 99.8% the same word as brute force on grocery RootSIFT;
                # at 4k words brute force was as fast (2 cores), beyond 16k it falls behind.
                self._searcher = faiss.IndexHNSWFlat(dim, 32)
                self._searcher.hnsw.efConstruction = 40
                self._searcher.add(self.cluster_centers_)
                self._searcher.hnsw.efSearch = 32
            else:
                self._searcher = faiss.IndexFlatL2(dim)
                self._searcher.add(self.cluster_centers_)
        _, words = self._searcher.search(np.ascontiguousarray(descriptors, np.float32), 1)
        return words[:, 0].astype(np.int32)

    def save(self, path: Path, **extra: Any) -> None:
        self._check_fitted()
        _save_npz_atomic(path, cluster_centers=self.cluster_centers_, id=np.array(self.id_), **extra)

    @classmethod
    def load(cls, path: Path) -> tuple[VisualVocabulary, dict[str, np.ndarray]]:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        vocabulary = cls(n_words=len(arrays["cluster_centers"]))
        vocabulary.cluster_centers_ = arrays.pop("cluster_centers")
        vocabulary.id_ = str(arrays.pop("id"))
        vocabulary._searcher = None
        return vocabulary, arrays


def _save_npz_atomic(path: Path, **arrays: Any) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# --- the inverted index


@dataclass
class BagOfWords:
    """tf-idf bags of visual words as an inverted file: a (words x items) sparse matrix.

    A query's words select rows, so scoring touches only the items sharing a word with it.
    """

    keys: np.ndarray  # (n_items,) int64, column order
    inverted: sparse.csr_matrix  # (n_words, n_items), columns L2-normalised tf-idf
    idf: np.ndarray  # (n_words,) float32

    @classmethod
    def build(cls, keys: np.ndarray, words: list[np.ndarray], n_words: int) -> BagOfWords:
        lengths = np.array([len(w) for w in words], np.int64)
        columns = np.repeat(np.arange(len(words)), lengths)
        rows = np.concatenate(words).astype(np.int64) if len(words) else np.zeros(0, np.int64)
        counts = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, columns)), shape=(n_words, len(words)))
        counts.sum_duplicates()
        document_frequency = np.diff(counts.indptr).astype(np.float32)
        idf = np.log((len(words) + 1) / (document_frequency + 1)).astype(np.float32)
        weighted = sparse.diags(idf) @ counts
        norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(axis=0)).ravel())
        weighted = (weighted @ sparse.diags(1.0 / np.maximum(norms, 1e-12))).tocsr().astype(np.float32)
        return cls(np.asarray(keys, np.int64), weighted, idf)

    def query_vector(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unique, counts = np.unique(words, return_counts=True)
        weights = counts.astype(np.float32) * self.idf[unique]
        return unique, weights / max(float(np.linalg.norm(weights)), 1e-12)

    def search(self, words: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, cosine scores) of the ``k`` best items, best first."""
        if len(words) == 0 or len(self.keys) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        unique, weights = self.query_vector(words)
        scores = np.asarray(self.inverted[unique].T @ weights).ravel()
        if allowed is not None:
            scores = np.where(np.isin(self.keys, allowed), scores, -1.0)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        top = top[scores[top] > 0]
        return self.keys[top], scores[top].astype(np.float32)


@dataclass
class LocalIndex:
    """What search needs from the local side of an index."""

    vocabulary: VisualVocabulary
    bow: BagOfWords
    config: LocalConfig


def load_local_index(index: Any) -> LocalIndex | None:
    """The vocabulary and inverted index of ``index`` (cached per store generation), or None."""

    def build() -> LocalIndex | None:
        vocab_path, words_path = index.models_dir / VOCAB_FILE, index.models_dir / WORDS_FILE
        if not (vocab_path.is_file() and words_path.is_file()):
            return None
        vocabulary, _ = VisualVocabulary.load(vocab_path)
        table = _WordTable.load(words_path)
        if table.vocab_id != vocabulary.id_:
            log.warning("%s: visual words do not match the vocabulary; re-run indexing", index.root)
            return None
        bow = BagOfWords.build(table.keys, table.split(), vocabulary.size)
        return LocalIndex(vocabulary, bow, LocalConfig.from_index(index))

    return index.cached("local_index", build)


def item_descriptors(index: Any, keys: np.ndarray) -> dict[int, LocalDescriptors]:
    blobs = index.store.feature_blobs(FEATURE_NAME, [int(k) for k in keys])
    return {key: LocalDescriptors.from_bytes(blob) for key, blob in blobs.items()}


@dataclass
class _WordTable:
    """Each item's visual words, with the fingerprint of the image they came from."""

    keys: np.ndarray
    fingerprints: np.ndarray
    offsets: np.ndarray  # len(keys) + 1
    words: np.ndarray
    vocab_id: str

    @classmethod
    def empty(cls, vocab_id: str) -> _WordTable:
        return cls(np.zeros(0, np.int64), np.zeros(0, "<U1"), np.zeros(1, np.int64), np.zeros(0, np.int32), vocab_id)

    @classmethod
    def from_dict(cls, words: dict[int, tuple[str, np.ndarray]], vocab_id: str) -> _WordTable:
        keys = np.array(sorted(words), np.int64)
        lists = [words[int(k)][1] for k in keys]
        offsets = np.concatenate([[0], np.cumsum([len(w) for w in lists])]).astype(np.int64)
        flat = np.concatenate(lists).astype(np.int32) if lists else np.zeros(0, np.int32)
        fingerprints = np.array([words[int(k)][0] for k in keys]) if len(keys) else np.zeros(0, "<U1")
        return cls(keys, fingerprints, offsets, flat, vocab_id)

    def to_dict(self) -> dict[int, tuple[str, np.ndarray]]:
        return {int(k): (str(f), w) for k, f, w in zip(self.keys, self.fingerprints, self.split(), strict=True)}

    def split(self) -> list[np.ndarray]:
        return [self.words[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]

    def save(self, path: Path) -> None:
        _save_npz_atomic(
            path, keys=self.keys, fingerprints=self.fingerprints, offsets=self.offsets,
            words=self.words, vocab_id=np.array(self.vocab_id),
        )

    @classmethod
    def load(cls, path: Path) -> _WordTable:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["keys"], data["fingerprints"], data["offsets"], data["words"], str(data["vocab_id"]))


# --- the extension that keeps all this in line with the catalog


class LocalExtension:
    """Extracts SIFT for new items; (re)fits the vocabulary and re-quantises after each run."""

    name = "local"

    def features(self, index: Any) -> list[Any]:
        if not index.config.local_features:
            return []
        return [SiftFeature(LocalConfig.from_index(index))]

    def after_update(self, index: Any, changed_keys: np.ndarray, removed_keys: np.ndarray) -> None:
        if not index.config.local_features:
            return
        started = time.perf_counter()
        config = LocalConfig.from_index(index)
        fingerprints = {key: fingerprint for key, fingerprint in index.store.fingerprints().values()}
        stored = _feature_keys(index.store)
        live = {key: fingerprints[key] for key in stored if key in fingerprints}
        vocab_path, words_path = index.models_dir / VOCAB_FILE, index.models_dir / WORDS_FILE
        if not live:
            vocab_path.unlink(missing_ok=True)
            words_path.unlink(missing_ok=True)
            return

        vocabulary = refreshed_vocabulary(index, vocab_path, sorted(live), config)

        table = _WordTable.load(words_path) if words_path.is_file() else _WordTable.empty(vocabulary.id_)
        known = table.to_dict() if table.vocab_id == vocabulary.id_ else {}
        changed = {int(k) for k in changed_keys}
        todo = [key for key, fingerprint in live.items() if key in changed or known.get(key, ("",))[0] != fingerprint]
        words = {key: value for key, value in known.items() if key in live and key not in changed}
        for start in range(0, len(todo), 512):
            chunk = todo[start : start + 512]
            described = item_descriptors(index, chunk)
            if not described:
                continue
            # One call per chunk: per-image calls pay faiss's thread start-up ~500 times over.
            assigned = vocabulary.transform(np.concatenate([d.descriptors for d in described.values()]))
            bounds = np.cumsum([0] + [len(d) for d in described.values()])
            for (key, _), start, end in zip(described.items(), bounds[:-1], bounds[1:], strict=True):
                words[key] = (live[key], assigned[start:end])
        _WordTable.from_dict(words, vocabulary.id_).save(words_path)
        log.info("local index: %d items quantised, %d kept, in %.1fs", len(todo), len(words) - len(todo), time.perf_counter() - started)

    @staticmethod
    def _fit(index: Any, keys: list[int], n_words: int, config: LocalConfig) -> VisualVocabulary:
        rng = np.random.default_rng(config.seed)
        wanted = n_words * config.sample_per_word
        per_image = max(1, config.max_keypoints // 2)
        sample_keys = rng.permutation(keys)[: max(1, -(-wanted // per_image))]
        rows = []
        for start in range(0, len(sample_keys), 512):
            for descriptors in item_descriptors(index, sample_keys[start : start + 512]).values():
                if len(descriptors):
                    take = rng.permutation(len(descriptors))[:per_image]
                    rows.append(descriptors.descriptors[take])
        sample = np.concatenate(rows) if rows else np.zeros((0, 128), np.float32)
        if len(sample) == 0:
            raise ValueError("no local descriptors to fit a vocabulary on")
        return VisualVocabulary(min(n_words, len(sample)), config.kmeans_iterations, config.seed).fit(sample)


def refreshed_vocabulary(index: Any, path: Path, keys: list[int], config: LocalConfig) -> VisualVocabulary:
    """The vocabulary saved at ``path``, refitted on the items ``keys`` where it is missing, where
    the catalog has outgrown it ``refit_growth`` times, or where its configured size changed."""
    vocabulary, fitted_on = None, 0
    if path.is_file():
        vocabulary, extra = VisualVocabulary.load(path)
        fitted_on = int(extra.get("fitted_on", 0))
    wanted = config.vocab_size or auto_vocab_size(len(keys))
    if vocabulary is None or len(keys) >= config.refit_growth * max(fitted_on, 1) or (
        config.vocab_size and vocabulary.size != config.vocab_size
    ):
        vocabulary = LocalExtension._fit(index, keys, wanted, config)
        vocabulary.save(path, fitted_on=np.array(len(keys)))
        log.info("fitted a %d-word visual vocabulary on %d images", vocabulary.size, len(keys))
    return vocabulary


def _feature_keys(store: Any) -> list[int]:
    # Keys only: reading every blob here would cost a full scan of the descriptors.
    return sorted(store.feature_keys(FEATURE_NAME))


register_extension(LocalExtension())
