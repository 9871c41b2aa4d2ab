"""The convolutional autoencoder fitted on a catalog (``ConvAutoencoder``) and the networks it
builds. It registers no feature and imports torch: the ``ae`` feature and anomaly scoring load it
on use, and ``catalens.indexer.training.train_autoencoder`` is its training run.

It reconstructs the backbone's final feature maps by default, not pixels: on the grocery
benchmark (trained on produce, with packages as the anomalies) feature maps separate the two
far better than 64-px pixels, because a pixel autoencoder learns "smooth colourful blobs" and
rebuilds a carton about as well as an apple (``benchmarks/bench_anomaly.py`` prints the
comparison). ``input_kind="pixels"`` remains for catalogs where the backbone is not wanted.

The anomaly score has two terms, each a robust z-score (median and MAD, so a few foreign items
cannot move the scale) against the catalog's own held-out images, and is their maximum:

- ``reconstruction``: mean squared reconstruction error of the standardised maps;
- ``neighbours``: mean cosine distance of the image's pooled inputs (for feature maps, the deep
  descriptor) to its ``neighbours`` nearest catalog images (catalog items leave-one-out).

Reconstruction error alone misses degenerate inputs: the maps of a blank or a noise image are
nearly uniform, and the decoder rebuilds them better than most real photos. The maximum lets
either term flag an image on its own; one threshold (the ``percentile`` of held-out combined
scores) serves both. Distances between the bottleneck codes were tried as the second term and
rejected: a code is trained to be rebuilt, not to tell images apart.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from catalens.indexer.estimator import Estimator
from catalens.indexer.features import l2_normalise
from catalens.indexer.files import atomic_path

log = logging.getLogger(__name__)

PIXEL_DESCRIPTOR_GRID = 8  # pixel inputs are described by an 8x8 thumbnail for the neighbour term
STD_FLOOR = 1e-3  # added to each channel's spread, so that a constant channel standardises to 0, not NaN
# The inputs are standardised per channel, so rebuilding every photo as the catalog's average photo
# scores a loss of about 1 (``baseline_loss_``). A final loss less than 10% below that means the model
# rebuilt little beyond the average: its reconstruction errors then rank photos by how far they
# are from the average photo, not from the catalog's own kinds of product, and its heatmaps show
# noise. Relative to the average photo, not to the first epoch: a large catalog can learn most of
# what it will within the first epoch, and a small fall after it is then no fault. On the demo's 24
# photos, the default 15 epochs end 6% below the average photo, 60 epochs 33%.
MIN_LOSS_REDUCTION = 0.10


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


def build_autoencoder(input_kind: str, shape: tuple[int, ...], code_channels: int, width: int) -> nn.Module:
    channels = shape[0]
    if input_kind == "features":
        return FeatureMapAutoencoder(channels, code_channels, width, size=shape[1])
    if input_kind == "pixels":
        return PixelAutoencoder(channels, code_channels, width)
    raise ValueError(f"autoencoder input must be 'features' or 'pixels', not {input_kind!r}")


# --- the estimator


class ConvAutoencoder(Estimator):
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

    fit_hint = "run 'catalens train-ae' on the index"

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
        self.std_ = X[train].std(axis=(0, 2, 3)) + STD_FLOOR
        self.model_ = build_autoencoder(self.input_kind, X.shape[1:], self.code_channels, self.width)
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
        warning = self.loss_warning()
        if warning:
            # Logged, not warned: `catalens train-ae` prints it after its table and stores it with
            # the report; on stderr it would print twice and crowd a failure's one line.
            log.info(warning)
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
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a run killed while saving leaves any kind of damage
            log.warning("checkpoint %s does not load (%s); starting afresh", self.checkpoint, type(error).__name__)
            return 0
        if not isinstance(state, dict) or state.get("hyper") != self._hyper() or tuple(state.get("shape", ())) != tuple(shape):
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
        with atomic_path(Path(self.checkpoint)) as tmp:
            torch.save(state, tmp)

    # -- applying

    def _standardise(self, X: np.ndarray, reduce: bool = True) -> torch.Tensor:
        x = torch.from_numpy(self._reduce(X) if reduce else np.asarray(X, dtype=np.float32))
        return (x - torch.from_numpy(self.mean_)[:, None, None]) / torch.from_numpy(self.std_)[:, None, None]

    def _run(self, X: np.ndarray, batch_size: int = 128, reduce: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Codes (n, code_dim) and per-location squared error maps (n, H, W)."""
        self.check_is_fitted()
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
    def baseline_loss_(self) -> float:
        """The training loss of rebuilding every input as the average training input: the standardised
        inputs' mean square (1, less for channels that hardly vary)."""
        spread = np.maximum(np.asarray(self.std_, np.float64) - STD_FLOOR, 0.0) / np.asarray(self.std_, np.float64)
        return float(np.mean(spread**2))

    def loss_warning(self) -> str | None:
        """What it means and what to do when training fell short of ``MIN_LOSS_REDUCTION``; None otherwise."""
        self.check_is_fitted()
        if not self.loss_history_:
            return None
        first, last, baseline = self.loss_history_[0], self.loss_history_[-1], self.baseline_loss_
        reduction = 1.0 - last / baseline if baseline > 0 else 0.0
        if reduction >= MIN_LOSS_REDUCTION:
            return None
        versus = f"{reduction:.1%} below" if reduction >= 0 else f"{-reduction:.1%} above"
        return (f"the autoencoder barely learnt this catalog: its loss went {first:.3f} -> {last:.3f}, "
                f"{versus} the {baseline:.3f} of rebuilding every photo as the average one "
                f"(at least {MIN_LOSS_REDUCTION:.0%} is wanted), so its anomaly scores and heatmaps say little; "
                f"train longer (--epochs {max(4 * self.epochs, 60)}) or on more photos")

    @property
    def code_dim(self) -> int:
        self.check_is_fitted()
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

    def _state(self) -> dict[str, Any]:
        return {"model": self.model_.state_dict(), "input_shape": list(self.input_shape_), "mean": self.mean_,
                "std": self.std_, "threshold": self.threshold_, "error_scale": self.error_scale_,
                "calibration": {name: list(values) for name, values in self.calibration_.items()},
                "reference": getattr(self, "reference_", None), "catalog_scores": self.catalog_scores_,
                "loss_history": list(self.loss_history_)}

    def _restore(self, state: dict[str, Any]) -> None:
        self.input_shape_ = tuple(state["input_shape"])
        self.mean_, self.std_ = state["mean"], state["std"]
        self.threshold_, self.error_scale_ = float(state["threshold"]), float(state["error_scale"])
        self.calibration_ = {name: tuple(values) for name, values in state["calibration"].items()}
        self.catalog_scores_ = state["catalog_scores"]
        if state["reference"] is not None:
            self.reference_ = state["reference"]
        self.loss_history_ = list(state["loss_history"])
        shape = (len(self.mean_), *self.input_shape_[1:])
        self.model_ = build_autoencoder(self.input_kind, shape, self.code_channels, self.width)
        self.model_.load_state_dict(state["model"])
        self.model_.eval()

