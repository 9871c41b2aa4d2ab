"""``catalens train-ae``: fit the autoencoder on a catalog and re-code its items.

In ``catalog.models_dir``: ``ae_autoencoder.pt`` (the model with its calibration), the
per-epoch checkpoint and the extracted inputs of an unfinished run (so an interrupted
``train-ae`` resumes), and ``ae_loss.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catalens.indexer.features.autoencoder import (
    AUTOENCODER,
    FEATURE_NAME,
    SCORE_FEATURE,
    AutoencoderInputs,
    extract_inputs,
)
from catalens.indexer.features.autoencoder_model import ConvAutoencoder
from catalens.indexer.files import atomic_path, replaced_file

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "ae_training.ckpt"
INPUTS_FILE = "ae_training_inputs.npz"
LOSS_PLOT = "ae_loss.png"


def train_autoencoder(
    catalog: Catalog, epochs: int = 15, input_kind: str = "features", noise: float = 0.0, percentile: float = 95.0,
    progress: bool = True, fresh: bool = False, **hyper: Any,
) -> ConvAutoencoder:
    """Fit the autoencoder on every indexed image, then re-code all items (the ``ae`` feature,
    which joins the catalog's features) and store their anomaly scores.

    Resumable: the extracted inputs and a per-epoch checkpoint stay in ``models_dir`` until the
    run completes, so re-running the same command after an interruption continues where it
    stopped.
    """
    models = Path(catalog.models_dir)
    run = _TrainingRun(catalog, models / CHECKPOINT_FILE, models / INPUTS_FILE, input_kind, epochs, noise, percentile,
                       hyper)
    if fresh:
        run.checkpoint.unlink(missing_ok=True)
        run.inputs_file.unlink(missing_ok=True)
    model = AUTOENCODER.refit(catalog, force=True, progress=progress, fit=run.fit, save=run.commit).model
    try:
        plot_loss(model.loss_history_, models / LOSS_PLOT)
    except OSError as error:  # the model is stored: a missing picture of its loss is no reason to fail
        log.warning("%s: the loss curve was not drawn (%s)", catalog.location, error)
    run.checkpoint.unlink(missing_ok=True)
    run.inputs_file.unlink(missing_ok=True)
    return model


@dataclass
class _TrainingRun:
    """One ``train-ae``: the fit (inputs extracted, or reused from an interrupted run, then the
    model trained) and the commit of the model with the rows it coded."""

    catalog: Catalog
    checkpoint: Path
    inputs_file: Path
    input_kind: str
    epochs: int
    noise: float
    percentile: float
    hyper: dict[str, Any]
    keys: np.ndarray | None = None
    inputs: np.ndarray | None = None

    def fit(self, catalog: Catalog, progress: bool) -> ConvAutoencoder:
        self.keys, self.inputs = self._extract(progress)
        model = ConvAutoencoder(input_kind=self.input_kind, epochs=self.epochs, noise=self.noise,
                                percentile=self.percentile, checkpoint=self.checkpoint, progress=progress, **self.hyper)
        return model.fit(self.inputs)

    def _extract(self, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """(keys, inputs) of every readable item, in id order."""
        catalog, input_kind, inputs_file = self.catalog, self.input_kind, self.inputs_file
        # In id order: one catalog trains one model whichever backend holds it.
        records = sorted(catalog.items.records().values(), key=lambda record: record.id)
        if not records:
            raise ValueError(f"{catalog.location}: the index has no items to train on")
        keys = np.asarray([record.key for record in records], np.int64)
        feeder = AutoencoderInputs(input_kind, catalog.feature("deep") if input_kind == "features" else None)
        if inputs_file.is_file():
            try:
                cached = np.load(inputs_file)
                if str(cached["kind"]) == input_kind and np.array_equal(cached["keys"], keys):
                    log.info("reusing %d extracted autoencoder inputs from %s", len(keys), inputs_file)
                    return cached["keys"], cached["x"]
            except Exception as error:  # noqa: BLE001 - a run killed while saving it: extract again
                log.warning("%s does not load (%s); extracting the inputs again", inputs_file, type(error).__name__)
        X, positions, errors = extract_inputs(
            feeder, [record.image for record in records], batch_size=catalog.config.batch_size,
            num_workers=catalog.config.num_workers, progress=progress,
        )
        for error in errors.values():
            log.warning("autoencoder: skipped %s", error)
        keys = keys[positions]
        # A handle, not a path: np.savez appends ".npz" to a path that does not end in it.
        with atomic_path(inputs_file) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, x=X, keys=keys, kind=np.asarray(input_kind))
        return keys, X

    def commit(self, model: ConvAutoencoder, path: Path) -> None:
        """The model file first, then the rows it coded, with the feature enabled and the metadata in
        the one save that follows them: a failure (a full disk) before the rows are committed puts
        the previous model back, so a model file never disagrees with the rows."""
        catalog, keys = self.catalog, self.keys
        codes, scores = model.transform(self.inputs), model.catalog_scores_
        features, settings = list(catalog.config.features), catalog.meta.get("autoencoder")
        with catalog.lock, replaced_file(path) as replacement:
            try:
                model.save(path)
                catalog.meta["autoencoder"] = {
                    **(settings or {}), "input": self.input_kind, "threshold": model.threshold_,
                    "percentile": self.percentile, "epochs": self.epochs, "noise": self.noise,
                    "items": int(len(keys)), "final_loss": model.loss_history_[-1],
                    "loss_warning": model.loss_warning()}
                if FEATURE_NAME not in catalog.config.features:
                    catalog.config.features = [*catalog.config.features, FEATURE_NAME]
                catalog.replace_feature(FEATURE_NAME, keys, codes, {SCORE_FEATURE: scores},
                                        committed=replacement.committed)
            except BaseException:
                if not replacement.done:
                    catalog.config.features = features
                    if settings is None:
                        catalog.meta.pop("autoencoder", None)
                    else:
                        catalog.meta["autoencoder"] = settings
                raise


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
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(figure)
    return path
