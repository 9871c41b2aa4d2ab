"""The ``deep`` global feature: a registered backbone's pooled descriptor, L2-normalised."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from catalens.indexer.backbones import BackboneSpec, get_backbone
from catalens.indexer.features import l2_normalise, register_feature
from catalens.indexer.runtime import compile_network, resolve_device, weights_stamp

if TYPE_CHECKING:
    from catalens.indexer.backbones.networks import Backbone
    from catalens.indexer.catalog import Catalog

log = logging.getLogger(__name__)


class DeepPreparer:
    """An RGB image to the backbone's normalised CHW float32 input; runs in decode workers.

    Shorter side to ``resize_size``, then the centre ``input_size`` square: on grocery (val and
    cross-validation over train's shooting sessions) this beat squashing or padding the whole
    photo into the square. Pixels are scaled as ``scaling`` says (``auto``: as the weights were
    trained), which for EfficientNet-Lite gained 3-11 points of top-1 over ImageNet's mean/std
    (``benchmarks/bench_preprocessing.py``).
    """

    def __init__(self, spec: BackboneSpec, scaling: str = "auto"):
        self.size, self.resize_size = spec.input_size, spec.resize_size
        mean, std = spec.normalisation(scaling)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        scale = self.resize_size / min(width, height)
        resized = image.resize(
            (max(self.size, round(width * scale)), max(self.size, round(height * scale))),
            Image.BILINEAR, reducing_gap=2.0,
        )
        left = (resized.width - self.size) // 2
        top = (resized.height - self.size) // 2
        cropped = resized.crop((left, top, left + self.size, top + self.size))
        array = (np.asarray(cropped, dtype=np.float32) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(array.transpose(2, 0, 1))


class DeepFeature:
    """A registered backbone as a global feature: images in, L2-normalised float32 rows out."""

    name = "deep"

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: Path | None = None,
        device: str = "auto",
        runtime: str = "auto",
        batch_size: int = 16,
        threads: int = 0,
        pretrained: bool = True,
        scaling: str = "auto",
    ):
        self.spec = get_backbone(backbone)
        self.backbone = backbone
        self.preparer = DeepPreparer(self.spec, scaling)
        # JPEGs decode at reduced scale down to twice the network input: same features, less work.
        self.draft_size = self.spec.input_size * 2
        self.dim = self.spec.dim
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.weights, self.pretrained = weights, pretrained
        self._model: Backbone | None = None
        cache_key = f"{backbone}-{weights_stamp(weights)}" if pretrained else None
        self._network, self.runtime = compile_network(
            lambda: self.model, self.spec.input_size, runtime, self.device, cache_key, threads)
        log.info("deep features: %s (%d-d) on %s via %s", backbone, self.dim, self.device, self.runtime)

    @property
    def model(self) -> Backbone:
        """The PyTorch network, built on first use: a cached conversion runs without it."""
        if self._model is None:
            self._model = self.spec.create(weights=self.weights, pretrained=self.pretrained).to(self.device)
        return self._model

    def finish(self, prepared: list[np.ndarray]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        batch = np.stack(prepared)
        return np.concatenate([
            l2_normalise(self._network(batch[i : i + self.batch_size])) for i in range(0, len(batch), self.batch_size)
        ])


@register_feature("deep", "global", search_weight=1.0, classify_weight=1.0,
                  description="the backbone's pooled descriptor (IndexConfig.backbone)")
def build_deep(catalog: Catalog) -> DeepFeature:
    config = catalog.config
    return DeepFeature(config.backbone, runtime=config.runtime, batch_size=config.batch_size,
                       scaling=config.input_scaling)
