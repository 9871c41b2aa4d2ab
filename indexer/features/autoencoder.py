"""The ``ae`` global feature: the bottleneck codes of the autoencoder fitted on the catalog.

Also what feeds the autoencoder (the backbone's last feature maps, or 64-px pixels) and the
loading of a catalog's model, which anomaly scoring shares. The model is
``catalens.indexer.features.autoencoder_model``, its training run
``catalens.indexer.training.train_autoencoder``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from catalens.indexer.estimator import NotFittedError
from catalens.indexer.features import register_feature
from catalens.indexer.features.decode import extract_rows
from catalens.indexer.features.deep import DeepFeature
from catalens.indexer.fitted import FittedSlot
from catalens.indexer.runtime import compile_network

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.indexer.features.autoencoder_model import ConvAutoencoder

FEATURE_NAME = "ae"
SCORE_FEATURE = "ae_score"  # each item's anomaly score (a float32 row), for the audit
MODEL_FILE = "ae_autoencoder.pt"
PIXEL_SIZE = 64


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


class AutoencoderInputs:
    """Turns decoded images into what the autoencoder reads, in two steps like every feature:
    ``preparer`` (decode workers) and ``finish`` (main process, batched)."""

    def __init__(self, input_kind: str, deep: DeepFeature | None = None):
        self.input_kind = input_kind
        self._network = None
        if input_kind == "pixels":
            self.preparer = PixelPreparer()
            self.draft_size = PIXEL_SIZE * 2
            return
        if input_kind != "features":
            raise ValueError(f"autoencoder input must be 'features' or 'pixels', not {input_kind!r}")
        if deep is None:
            raise ValueError("feature-map inputs need the catalog's deep feature")
        self.preparer, self.draft_size = deep.preparer, deep.draft_size
        runtime = "torch" if deep.runtime == "torch" else "auto"
        def build():
            from catalens.indexer.backbones.networks import FeatureMaps

            return FeatureMaps(deep.model)

        self._network, _ = compile_network(build, deep.spec.input_size, runtime, deep.device, f"{deep.backbone}-maps")

    def finish(self, prepared: list[np.ndarray]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, 0, 0, 0), np.float32)
        batch = np.stack(prepared)
        return batch if self._network is None else np.asarray(self._network(batch), np.float32)

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.finish([self.preparer(image) for image in images])


def extract_inputs(
    inputs: AutoencoderInputs, sources: Sequence, batch_size: int = 16, num_workers: int = 1, progress: bool = True,
    dtype=np.float16,
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Autoencoder inputs of ``sources`` (``extract_rows``; float16: 1280x8x8 maps are 160 kB each)."""
    return extract_rows(inputs, sources, batch_size=batch_size, num_workers=num_workers, progress=progress,
                        desc="autoencoder inputs", dtype=dtype)


# --- the model of a catalog


def _load_model(catalog: Any, path: Path) -> ConvAutoencoder:
    from catalens.indexer.features.autoencoder_model import ConvAutoencoder

    return ConvAutoencoder.load(path, progress=False)


# Fitted by ``catalens train-ae`` alone (``training.train_autoencoder`` passes its run and commit to
# ``refit``); it describes the catalog it was trained on until it is trained again.
AUTOENCODER = FittedSlot(name="autoencoder", model_file=MODEL_FILE, load=_load_model,
                         fresh=lambda model, catalog: None, fitted_by="catalens train-ae")


@dataclass(eq=False)
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


def load_autoencoder(catalog: Any) -> IndexAutoencoder:
    """The catalog's trained autoencoder with what feeds it (``NotFittedError`` before ``train-ae``,
    ``ModelFileError`` where its file does not load)."""
    model = AUTOENCODER.require(catalog, NotFittedError(
        f"{catalog.location}: no autoencoder trained for this index (run 'catalens train-ae' first)"))

    def build() -> IndexAutoencoder:
        deep = catalog.feature("deep") if model.input_kind == "features" else None
        return IndexAutoencoder(model, AutoencoderInputs(model.input_kind, deep))

    # What feeds it is built once a model: the model itself tells one fit from another.
    return catalog.cached("autoencoder", build, stamp=model)


class AutoencoderCodes:
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


def forget_stale_scores(catalog: Catalog, changed_keys: Collection[int], removed_keys: Collection[int]) -> None:
    """A changed image's stored anomaly score is stale: the audit rescores items that have none."""
    if len(changed_keys):
        catalog.items.delete_rows(SCORE_FEATURE, [int(key) for key in changed_keys])


@register_feature("ae", "global", model=AUTOENCODER, refresh=forget_stale_scores,
                  description="bottleneck codes of the catalog's convolutional autoencoder")
def build_autoencoder_codes(catalog: Catalog) -> AutoencoderCodes:
    return AutoencoderCodes(load_autoencoder(catalog))
