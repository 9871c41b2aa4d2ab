"""A convolutional autoencoder fitted on the catalog: its bottleneck is the ``ae`` global feature,
its reconstruction error the core of the anomaly score.

The autoencoder reconstructs the backbone's final feature maps (1280 x 8 x 8 for
efficientnet_lite0) by default, not pixels: on the grocery benchmark (train on Fruit and
Vegetables, Packages are the anomalies) feature maps separate the two far better than 64-px
pixels do, because a pixel autoencoder learns "smooth colourful blobs" and reconstructs a
carton about as well as an apple (numbers in benchmarks/bench_anomaly.py). ``input="pixels"``
remains available for catalogs where the backbone is not wanted.

Anomaly score. Reconstruction error alone misses degenerate inputs: the feature maps of a blank
or a random-noise image are nearly uniform and the decoder rebuilds them better than most real
photos (on the grocery audit, 8 epochs, a blank image ranked 1599th and a noise image 886th of
1,781 catalog items, while Packages photos ranked 3rd, 9th and 78th). So the score has two terms,
each a robust z-score against the catalog's own held-out images (median and MAD, so that a few
foreign items in the catalog cannot move the scale):

- ``reconstruction``: mean squared reconstruction error of the standardised maps;
- ``neighbours``: mean cosine distance of the image's pooled inputs (for feature maps, the deep
  descriptor) to its ``neighbours`` nearest catalog images; catalog items are scored leave-one-out.

and the anomaly score is their maximum: an image is as anomalous as its most alarming term, and
one threshold (the ``percentile`` of held-out combined scores) applies to both. Measured with
``benchmarks/bench_anomaly.py --epochs 8``: AUROC on val 0.902 for the reconstruction term alone,
0.991 for the neighbour term alone, 0.988 for the score; in the audit the slipped-in Packages
photos, blank and noise images rank 8, 7, 3, 2, 1 of 1,781 (all above the threshold). On the same
models a sum of the two z-scores gave 0.982 and ranks 11, 3, 2, 6, 1, and one neighbour instead of
five 0.985 and ranks 7, 8, 4, 2, 1: the max lets either term flag an image on its own. At the p95 threshold 20% of
val produce photos are flagged (all Packages are): val photos come from other shooting sessions
than train, whose bursts of near-identical shots make the catalog's own neighbour distances small.
For 64-px pixels the 8x8-thumbnail neighbour term does not help with Packages (AUROC 0.657 for
reconstruction, 0.614 for the score); it is kept for blank and noise images.

Distances between the autoencoder's own bottleneck codes were tried as the second term and
rejected (cosine, centred cosine, Euclidean, spatially pooled; 1 or 5 neighbours): alone they
barely separate Packages from produce (AUROC 0.43-0.81), and the encoder places a blank image
among catalog codes (rank 93 at best, mostly beyond 600): its code is trained to be rebuilt,
not to tell images apart. Heatmaps stay per-patch reconstruction error.

Layout in ``index.models_dir``: ``autoencoder.pt`` (the fitted model, its calibration, catalog
reference descriptors and loss history), ``autoencoder.ckpt`` (per-epoch training state, so an
interrupted run resumes), ``autoencoder_inputs.npz`` (the extracted training inputs, kept until
training finishes), ``autoencoder_loss.png``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from indexer.deep import DeepPreparer, l2_normalise
from indexer.features import extract_rows, register_extension
from indexer.stores import replace_feature_rows

log = logging.getLogger(__name__)

FEATURE_NAME = "ae"
SCORE_FEATURE = "ae_score"  # per-item reconstruction error, float32 blob, for the audit
MODEL_FILE = "autoencoder.pt"
CHECKPOINT_FILE = "autoencoder.ckpt"
INPUTS_FILE = "autoencoder_inputs.npz"
LOSS_PLOT = "autoencoder_loss.png"
PIXEL_SIZE = 64
PIXEL_DESCRIPTOR_GRID = 8  # pixel inputs are described by an 8x8 thumbnail for the neighbour term


class NotFittedError(RuntimeError):
    """The autoencoder was used before ``fit`` (or before ``catalens train-ae``)."""


# --- the networks


class FeatureMapAutoencoder(nn.Module):
    """(C, s, s) feature maps -> a (code_channels, ceil(s/2), ceil(s/2)) bottleneck -> (C, s, s)."""

    def __init__(self, channels: int, code_channels: int = 16, width: int = 192, size: int = 7):
        super().__init__()
        # Transposed convolution back from ceil(size / 2) lands on 2 * ceil(size / 2) - 1 cells.
        extra = size - (2 * math.ceil(size / 2) - 1)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width // 2, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, code_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(code_channels, width // 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width // 2, width // 2, 3, stride=2, padding=1, output_padding=extra),
            nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        return code, self.decoder(code)


class PixelAutoencoder(nn.Module):
    """(3, 64, 64) images -> a (code_channels, 4, 4) bottleneck -> (3, 64, 64)."""

    def __init__(self, channels: int = 3, code_channels: int = 16, width: int = 32):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1), nn.ReLU(inplace=True),  # 32
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(inplace=True),  # 16
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.ReLU(inplace=True),  # 8
            nn.Conv2d(4 * w, code_channels, 4, 2, 1),  # 4
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(code_channels, 4 * w, 4, 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, channels, 4, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        return code, self.decoder(code)


def _build_network(input_kind: str, shape: tuple[int, ...], code_channels: int, width: int) -> nn.Module:
    channels = shape[0]
    if input_kind == "features":
        return FeatureMapAutoencoder(channels, code_channels, width, size=shape[1])
    if input_kind == "pixels":
        return PixelAutoencoder(channels, code_channels, width)
    raise ValueError(f"autoencoder input must be 'features' or 'pixels', not {input_kind!r}")


# --- the neighbour term


def pooled_descriptors(X: np.ndarray, input_kind: str, chunk: int = 256) -> np.ndarray:
    """L2-normalised descriptors of autoencoder inputs: feature maps averaged over space (the deep
    descriptor), pixels as an 8x8 thumbnail. (n, d) float32."""
    X = np.asarray(X)
    out = []
    for start in range(0, len(X), chunk):  # in chunks: the float32 copy of all maps would be large
        part = X[start : start + chunk].astype(np.float32)
        if input_kind == "pixels":
            n, c, h, w = part.shape
            g = PIXEL_DESCRIPTOR_GRID
            part = part[:, :, : h - h % g, : w - w % g].reshape(n, c, g, h // g, g, w // g).mean(axis=(3, 5))
            out.append(part.reshape(n, -1))
        else:
            out.append(part.mean(axis=(2, 3)))
    return l2_normalise(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)


def knn_distance(queries: np.ndarray, reference: np.ndarray, k: int, exclude: np.ndarray | None = None,
                 chunk: int = 512) -> np.ndarray:
    """Mean cosine distance of each (L2-normalised) query to its ``k`` nearest reference rows.

    ``exclude[i]`` is a reference row query ``i`` must not count (itself, when scoring catalog
    items leave-one-out), or -1.
    """
    reference = np.asarray(reference, np.float32)
    k = max(1, min(k, len(reference) - (exclude is not None)))
    out = np.empty(len(queries), np.float32)
    for start in range(0, len(queries), chunk):
        sims = np.asarray(queries[start : start + chunk], np.float32) @ reference.T
        if exclude is not None:
            rows = np.arange(len(sims))
            own = exclude[start : start + chunk]
            sims[rows[own >= 0], own[own >= 0]] = -np.inf
        nearest = -np.partition(-sims, k - 1, axis=1)[:, :k]
        out[start : start + chunk] = 1.0 - nearest.mean(axis=1)
    return out


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD): a location and scale that a few outliers in the catalog cannot move."""
    values = np.asarray(values, np.float64)
    median = float(np.median(values))
    scale = 1.4826 * float(np.median(np.abs(values - median)))
    if scale <= 1e-12:  # tiny or constant calibration sets
        scale = float(values.std()) or 1.0
    return median, scale


# --- the estimator


class ConvAutoencoder:
    """sklearn-style: ``fit(X)`` on (n, C, H, W) float arrays, then ``transform`` / ``score_samples``.

    ``noise`` > 0 trains a denoising autoencoder: Gaussian noise of that standard deviation (in
    standardised units) is added to the inputs and the clean input is the target.
    ``checkpoint`` names a file written after every epoch; ``fit`` resumes from it when its
    hyper-parameters and data shape match.

    The anomaly score is ``max`` of two robust z-scores against held-out catalog images:
    reconstruction error, and the distance to the ``neighbours`` nearest catalog images (0 turns
    that term off). ``max_reference`` caps how many catalog descriptors are kept for it.
    After ``fit``: ``threshold_``, ``calibration_`` ({term: (median, scale)}), ``error_scale_``
    (the ``percentile`` of held-out reconstruction errors, the heatmaps' colour scale),
    ``reference_`` and ``catalog_scores_`` (every fitted row, scored leave-one-out, for the audit).
    """

    def __init__(
        self,
        input_kind: str = "features",
        code_channels: int = 16,
        width: int = 48,
        epochs: int = 15,
        batch_size: int = 64,
        learning_rate: float = 2e-3,
        noise: float = 0.0,
        percentile: float = 95.0,
        calibration_fraction: float = 0.1,
        reduce_channels: int = 128,
        neighbours: int = 5,
        max_reference: int = 20_000,
        seed: int = 0,
        checkpoint: Path | None = None,
        progress: bool = True,
    ):
        self.input_kind = input_kind
        self.code_channels = code_channels
        self.width = width
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.noise = noise
        self.percentile = percentile
        self.calibration_fraction = calibration_fraction
        self.reduce_channels = reduce_channels
        self.neighbours = neighbours
        self.max_reference = max_reference
        self.seed = seed
        self.checkpoint = checkpoint
        self.progress = progress

    def _hyper(self) -> dict[str, Any]:
        return {
            "input_kind": self.input_kind, "code_channels": self.code_channels, "width": self.width,
            "batch_size": self.batch_size, "learning_rate": self.learning_rate, "noise": self.noise,
            "percentile": self.percentile, "calibration_fraction": self.calibration_fraction, "seed": self.seed,
            "reduce_channels": self.reduce_channels, "neighbours": self.neighbours,
            "max_reference": self.max_reference,
        }

    # -- fitting

    def fit(self, X: np.ndarray, y=None) -> ConvAutoencoder:
        """Fit on ``X``; a held-out ``calibration_fraction`` of it sets ``threshold_``.

        Scores of the images the model was trained on are optimistic, so both terms are calibrated,
        and the threshold set, on catalog images it did not see.
        """
        X = np.asarray(X)
        descriptors = pooled_descriptors(X, self.input_kind) if self.neighbours else None
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(X))
        n_cal = int(round(len(X) * self.calibration_fraction)) if len(X) >= 20 else 0
        cal, train = order[:n_cal], order[n_cal:]
        self.input_shape_ = tuple(X.shape[1:])
        shape = X.shape
        X = self._reduce(X)
        self.mean_ = X[train].mean(axis=(0, 2, 3))
        self.std_ = X[train].std(axis=(0, 2, 3)) + 1e-3
        self.model_ = _build_network(self.input_kind, X.shape[1:], self.code_channels, self.width)
        optimiser = torch.optim.Adam(self.model_.parameters(), lr=self.learning_rate)
        self.loss_history_: list[float] = []
        start = self._resume(optimiser, shape)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(self.epochs, 1), last_epoch=start - 1)
        bar = tqdm(range(start, self.epochs), desc="training autoencoder", unit="epoch", disable=not self.progress,
                   initial=start, total=self.epochs, dynamic_ncols=True)
        for epoch in bar:
            self.model_.train()
            total, seen = 0.0, 0
            for batch in np.array_split(rng.permutation(train), max(1, math.ceil(len(train) / self.batch_size))):
                clean = self._standardise(X[np.sort(batch)], reduce=False)
                noisy = clean + self.noise * torch.randn_like(clean) if self.noise > 0 else clean
                _, reconstruction = self.model_(noisy)
                loss = torch.mean((reconstruction - clean) ** 2)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
            schedule.step()
            self.loss_history_.append(total / max(seen, 1))
            bar.set_postfix(loss=f"{self.loss_history_[-1]:.4f}")
            self._save_checkpoint(optimiser, epoch + 1, shape)
        bar.close()
        self.model_.eval()
        self._calibrate(X, descriptors, cal if n_cal else train, rng)
        log.info("autoencoder fitted: final loss %.4f, threshold %.4f (p%g of %d %s images)",
                 self.loss_history_[-1] if self.loss_history_ else float("nan"), self.threshold_,
                 self.percentile, len(cal) if n_cal else len(train), "held-out" if n_cal else "training")
        return self

    def _calibrate(self, X: np.ndarray, descriptors: np.ndarray | None, held_out: np.ndarray,
                   rng: np.random.Generator) -> None:
        """Reference descriptors, each term's catalog statistics, the threshold, the catalog's scores."""
        errors = self._run(X, reduce=False)[1].mean(axis=(1, 2))
        self.calibration_ = {"reconstruction": robust_scale(errors[held_out])}
        self.error_scale_ = float(np.percentile(errors[held_out], self.percentile))
        distances = None
        if descriptors is not None:
            rows = np.arange(len(X))
            if len(X) > self.max_reference:
                rows = np.sort(rng.choice(len(X), self.max_reference, replace=False))
            self.reference_ = descriptors[rows].astype(np.float16)
            own = np.full(len(X), -1, np.int64)
            own[rows] = np.arange(len(rows))
            distances = knn_distance(descriptors, self.reference_, self.neighbours, exclude=own)
            self.calibration_["neighbours"] = robust_scale(distances[held_out])
        self.catalog_scores_ = self._combine(errors, distances)
        self.threshold_ = float(np.percentile(self.catalog_scores_[held_out], self.percentile))

    def _combine(self, errors: np.ndarray, distances: np.ndarray | None) -> np.ndarray:
        terms = self._terms(errors, distances)
        return np.max(np.stack(list(terms.values())), axis=0).astype(np.float32)

    def _terms(self, errors: np.ndarray, distances: np.ndarray | None) -> dict[str, np.ndarray]:
        location, scale = self.calibration_["reconstruction"]
        terms = {"reconstruction": (np.asarray(errors, np.float64) - location) / scale}
        if distances is not None:
            location, scale = self.calibration_["neighbours"]
            terms["neighbours"] = (np.asarray(distances, np.float64) - location) / scale
        return terms

    def _reduce(self, X: np.ndarray) -> np.ndarray:
        """Average groups of adjacent backbone channels down to ``reduce_channels``.

        1280 channels made the first layer dominate training (tens of minutes on a shared
        2-core CPU); averaging groups of 10 costs nothing to fit and keeps training to minutes.
        """
        X = np.asarray(X)
        if self.input_kind != "features" or not self.reduce_channels or X.shape[1] <= self.reduce_channels:
            return X.astype(np.float32, copy=False)
        groups = X.shape[1] // self.reduce_channels
        kept = groups * self.reduce_channels
        n, _, h, w = X.shape
        out = np.empty((n, self.reduce_channels, h, w), np.float32)
        for start in range(0, n, 256):  # in chunks: the float32 copy of all maps would be large
            chunk = X[start : start + 256, :kept].astype(np.float32)
            out[start : start + 256] = chunk.reshape(len(chunk), self.reduce_channels, groups, h, w).mean(axis=2)
        return out

    def _resume(self, optimiser: torch.optim.Optimizer, shape: tuple[int, ...]) -> int:
        if self.checkpoint is None or not Path(self.checkpoint).is_file():
            return 0
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        if state["hyper"] != self._hyper() or tuple(state["shape"]) != tuple(shape):
            log.info("checkpoint %s is for other settings or data; starting afresh", self.checkpoint)
            return 0
        self.model_.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        self.loss_history_ = list(state["loss_history"])
        log.info("resuming autoencoder training at epoch %d of %d", state["epoch"], self.epochs)
        return min(int(state["epoch"]), self.epochs)

    def _save_checkpoint(self, optimiser: torch.optim.Optimizer, epoch: int, shape: tuple[int, ...]) -> None:
        if self.checkpoint is None:
            return
        state = {"hyper": self._hyper(), "shape": tuple(shape), "epoch": epoch, "model": self.model_.state_dict(),
                 "optimiser": optimiser.state_dict(), "loss_history": self.loss_history_}
        tmp = Path(self.checkpoint).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint)

    # -- applying

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("this autoencoder is not fitted yet; call fit (or run 'catalens train-ae')")

    def _standardise(self, X: np.ndarray, reduce: bool = True) -> torch.Tensor:
        x = torch.from_numpy(self._reduce(X) if reduce else np.asarray(X, dtype=np.float32))
        return (x - torch.from_numpy(self.mean_)[:, None, None]) / torch.from_numpy(self.std_)[:, None, None]

    def _run(self, X: np.ndarray, batch_size: int = 128, reduce: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Codes (n, code_dim) and per-location squared error maps (n, H, W)."""
        self._check_fitted()
        self.model_.eval()
        codes, maps = [], []
        with torch.inference_mode():
            for start in range(0, len(X), batch_size):
                clean = self._standardise(X[start : start + batch_size], reduce)
                code, reconstruction = self.model_(clean)
                codes.append(code.flatten(1).numpy())
                maps.append(((reconstruction - clean) ** 2).mean(dim=1).numpy())
        if not codes:
            h, w = self.input_shape_[1:]
            return np.zeros((0, self.code_dim), np.float32), np.zeros((0, h, w), np.float32)
        return np.concatenate(codes), np.concatenate(maps)

    @property
    def code_dim(self) -> int:
        self._check_fitted()
        with torch.inference_mode():
            return int(self.model_.encoder(self._standardise(np.zeros((1, *self.input_shape_)))).numel())

    def transform(self, X: np.ndarray) -> np.ndarray:
        """L2-normalised bottleneck codes, (n, code_dim) float32."""
        return l2_normalise(self._run(X)[0])

    def error_maps(self, X: np.ndarray) -> np.ndarray:
        """Mean squared reconstruction error per spatial location (per patch), (n, H, W)."""
        return self._run(X)[1]

    def _distances(self, X: np.ndarray) -> np.ndarray | None:
        if not self.neighbours:
            return None
        return knn_distance(pooled_descriptors(X, self.input_kind), self.reference_, self.neighbours)

    def score_terms(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Each term of the anomaly score as a z-score against held-out catalog images."""
        return self._terms(self.error_maps(X).mean(axis=(1, 2)), self._distances(X))

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Anomaly score per image (higher = more anomalous); images of the fitted catalog score
        optimistically here, ``catalog_scores_`` has them leave-one-out."""
        return self.analyse(X)[1]

    def analyse(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Codes, anomaly scores and reconstruction error maps in one pass."""
        codes, maps = self._run(X)
        return l2_normalise(codes), self._combine(maps.mean(axis=(1, 2)), self._distances(X)), maps

    # -- persistence

    def save(self, path: Path) -> None:
        self._check_fitted()
        state = {"hyper": self._hyper(), "epochs": self.epochs, "model": self.model_.state_dict(),
                 "input_shape": self.input_shape_, "mean": self.mean_, "std": self.std_,
                 "threshold": self.threshold_, "calibration": self.calibration_, "error_scale": self.error_scale_,
                 "reference": getattr(self, "reference_", None), "catalog_scores": self.catalog_scores_,
                 "loss_history": self.loss_history_}
        tmp = Path(path).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ConvAutoencoder:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if "calibration" not in state:
            raise NotFittedError(f"{path} predates the two-term anomaly score; retrain it ('catalens train-ae --fresh')")
        model = cls(epochs=state["epochs"], progress=False, **state["hyper"])
        model.input_shape_ = tuple(state["input_shape"])
        model.mean_, model.std_ = state["mean"], state["std"]
        model.threshold_ = float(state["threshold"])
        model.calibration_ = {name: tuple(values) for name, values in state["calibration"].items()}
        model.error_scale_ = float(state["error_scale"])
        model.catalog_scores_ = state["catalog_scores"]
        if state["reference"] is not None:
            model.reference_ = state["reference"]
        model.loss_history_ = list(state["loss_history"])
        shape = (len(model.mean_), *model.input_shape_[1:])
        model.model_ = _build_network(model.input_kind, shape, model.code_channels, model.width)
        model.model_.load_state_dict(state["model"])
        model.model_.eval()
        return model


# --- what the autoencoder reads: pixels, or the backbone's feature maps


class PixelPreparer:
    """Shorter side to 64 px, centre square, CHW float32 in [0, 1]; runs in decode workers."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        scale = PIXEL_SIZE / min(width, height)
        resized = image.resize((max(PIXEL_SIZE, round(width * scale)), max(PIXEL_SIZE, round(height * scale))),
                               Image.BILINEAR, reducing_gap=2.0)
        left, top = (resized.width - PIXEL_SIZE) // 2, (resized.height - PIXEL_SIZE) // 2
        cropped = resized.crop((left, top, left + PIXEL_SIZE, top + PIXEL_SIZE))
        return np.ascontiguousarray((np.asarray(cropped, np.float32) / 255.0).transpose(2, 0, 1))


class _EfficientNetTrunk(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images)


def _trunk_module(model: nn.Module) -> nn.Module:
    """The backbone cut before its global pooling: images to (C, h, w) feature maps."""
    net = getattr(model, "net", None)
    if net is not None and hasattr(net, "extract_features"):
        return _EfficientNetTrunk(net)
    if hasattr(model, "features"):
        return model.features
    raise ValueError("this backbone exposes no convolutional trunk; train the autoencoder with input='pixels'")


class AutoencoderInputs:
    """Turns decoded images into what the autoencoder reads, in two steps like every feature:
    ``preparer`` (decode workers) and ``finish`` (main process, batched)."""

    def __init__(self, input_kind: str, deep_extractor=None):
        self.input_kind = input_kind
        if input_kind == "pixels":
            self.preparer = PixelPreparer()
            self.draft_size = PIXEL_SIZE * 2
            self._runner = None
            return
        if deep_extractor is None:
            raise ValueError("feature-map inputs need the index's deep extractor")
        self.preparer = DeepPreparer(deep_extractor.spec)
        self.draft_size = deep_extractor.draft_size
        trunk = _trunk_module(deep_extractor.model).eval()
        self._runner = None
        if deep_extractor.runtime == "openvino":
            try:
                from indexer.deep import OpenVinoRunner

                self._runner = OpenVinoRunner(trunk, deep_extractor.spec, 0, f"{deep_extractor.backbone}-maps")
            except Exception as error:  # noqa: BLE001 - PyTorch gives the same maps, slower
                log.warning("OpenVINO trunk unavailable (%s); using PyTorch", error)
        self._trunk, self._device = trunk, deep_extractor.device

    def finish(self, prepared: list[np.ndarray]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, 0, 0, 0), np.float32)
        batch = np.stack(prepared)
        if self.input_kind == "pixels":
            return batch
        if self._runner is not None:
            return np.asarray(self._runner(batch), np.float32)
        with torch.inference_mode():
            return self._trunk(torch.from_numpy(batch).to(self._device)).float().cpu().numpy()

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.finish([self.preparer(image) for image in images])


def extract_inputs(
    inputs: AutoencoderInputs, sources: Sequence, batch_size: int = 16, num_workers: int = 1, progress: bool = True,
    dtype=np.float16,
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Autoencoder inputs of ``sources`` (``indexer.features.extract_rows``; float16: 1280x8x8 maps are 160 kB each)."""
    return extract_rows(inputs, sources, batch_size=batch_size, num_workers=num_workers, progress=progress,
                        desc="autoencoder inputs", dtype=dtype)


def plot_loss(history: Sequence[float], path: Path, title: str = "autoencoder training loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.2))
    axes.plot(range(1, len(history) + 1), history, marker="o", markersize=3)
    axes.set_xlabel("epoch")
    axes.set_ylabel("reconstruction MSE (standardised)")
    axes.set_yscale("log")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --- the model of an index


@dataclass
class IndexAutoencoder:
    """A fitted autoencoder together with what feeds it, for one index."""

    model: ConvAutoencoder
    inputs: AutoencoderInputs

    @property
    def threshold(self) -> float:
        return self.model.threshold_

    @property
    def heatmap_scale(self) -> float:
        """Top of the heatmaps' colour scale: twice a high catalog reconstruction error, so they compare."""
        return 2 * self.model.error_scale_


def model_path(index) -> Path:
    return Path(index.models_dir) / MODEL_FILE


def has_model(index) -> bool:
    return model_path(index).is_file()


def load_index_autoencoder(index) -> IndexAutoencoder:
    """The index's trained autoencoder (cached per index until the index changes)."""
    path = model_path(index)
    if not path.is_file():
        raise NotFittedError(f"{index.root}: no autoencoder trained for this index (run 'catalens train-ae' on it first)")

    def build() -> IndexAutoencoder:
        model = ConvAutoencoder.load(path)
        deep = index.deep_extractor() if model.input_kind == "features" else None
        return IndexAutoencoder(model, AutoencoderInputs(model.input_kind, deep))

    stamp = path.stat().st_mtime_ns
    cached = index.cached(f"autoencoder-{stamp}", build)
    return cached


class AutoencoderCodeFeature:
    """The ``ae`` global feature: L2-normalised bottleneck codes of the index's autoencoder."""

    name = FEATURE_NAME

    def __init__(self, ae: IndexAutoencoder):
        self.ae = ae
        self.dim = ae.model.code_dim
        self.preparer = ae.inputs.preparer
        self.draft_size = ae.inputs.draft_size

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return self.ae.model.transform(self.ae.inputs.finish(prepared))

    def transform_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.finish([self.preparer(image) for image in images])


def train_index_autoencoder(
    index, epochs: int = 15, input_kind: str = "features", noise: float = 0.0, percentile: float = 95.0,
    progress: bool = True, fresh: bool = False, **hyper: Any,
) -> ConvAutoencoder:
    """Fit the autoencoder on every indexed image, then re-code all items and rebuild ``ae.faiss``.

    ``index`` is a ``CatalogIndex`` or an ``indexer.elastic.ElasticIndexView``: codes and scores
    go to its store, the model to its ``models_dir``. Resumable: the extracted inputs and a
    per-epoch checkpoint stay in ``models_dir`` until the run completes, so re-running the same
    command after an interruption continues where it stopped.
    """
    models = Path(index.models_dir)
    checkpoint, inputs_file = models / CHECKPOINT_FILE, models / INPUTS_FILE
    if fresh:
        checkpoint.unlink(missing_ok=True)
        inputs_file.unlink(missing_ok=True)
    # In id order, not key order: keys are the store's own (a counter in SQLite, a hash on
    # Elasticsearch), and one catalog should train one model whichever store holds it.
    records = sorted(index.store.all_items(), key=lambda record: record.id)
    if not records:
        raise ValueError(f"{index.root}: the index has no items to train on")
    keys = np.asarray([record.key for record in records], np.int64)
    feeder = AutoencoderInputs(input_kind, index.deep_extractor() if input_kind == "features" else None)
    X = None
    if inputs_file.is_file():
        cached = np.load(inputs_file)
        if str(cached["kind"]) == input_kind and np.array_equal(cached["keys"], keys):
            X, keys = cached["x"], cached["keys"]
            log.info("reusing %d extracted autoencoder inputs from %s", len(keys), inputs_file)
    if X is None:
        X, positions, errors = extract_inputs(
            feeder, [record.image for record in records], batch_size=index.config.batch_size,
            num_workers=index.config.num_workers, progress=progress,
        )
        for error in errors.values():
            log.warning("autoencoder: skipped %s", error)
        keys = keys[positions]
        np.savez(inputs_file, x=X, keys=keys, kind=np.asarray(input_kind))
    model = ConvAutoencoder(input_kind=input_kind, epochs=epochs, noise=noise, percentile=percentile,
                            checkpoint=checkpoint, progress=progress, **hyper)
    model.fit(X)
    codes, scores = model.transform(X), model.catalog_scores_
    with index.lock:
        replace_feature_rows(index, FEATURE_NAME, keys, codes, {SCORE_FEATURE: scores})
        model.save(models / MODEL_FILE)
        index.meta.setdefault("autoencoder", {}).update(
            {"input": input_kind, "threshold": model.threshold_, "percentile": percentile, "epochs": epochs,
             "noise": noise, "items": int(len(keys)), "final_loss": model.loss_history_[-1]}
        )
        index.save()
    plot_loss(model.loss_history_, models / LOSS_PLOT)
    checkpoint.unlink(missing_ok=True)
    inputs_file.unlink(missing_ok=True)
    return model


class AutoencoderExtension:
    """Keeps ``ae`` codes of new items coming (from the current model) once a model is trained."""

    name = FEATURE_NAME

    def features(self, index) -> list[Any]:
        if not has_model(index):
            return []
        return [AutoencoderCodeFeature(load_index_autoencoder(index))]

    def after_update(self, index, changed_keys: np.ndarray, removed_keys: np.ndarray) -> None:
        # A changed image's stored score is stale; the audit rescores items that have none.
        if len(changed_keys) and has_model(index):
            with index.store.transaction() as db:
                db.executemany("DELETE FROM features WHERE feature = ? AND key = ?",
                               [(SCORE_FEATURE, int(key)) for key in changed_keys])


register_extension(AutoencoderExtension())
