"""The ``style`` global feature: Gram matrices of the backbone's early feature maps, as in neural style transfer.

A Gram matrix holds which low-level filters fire together across the whole image, whatever
the layout: the palette, strokes and textures of a package design, not the product's shape. It
is meant for "more from this brand's line": products that share a design language (every Arla
carton, every Tropicana bottle). Each chosen stage's maps (averaged down to at most
``max_channels`` channels, so the vector stays small) give the C x C covariance of the channels
over positions; its upper triangle, signed-square-rooted, is concatenated over stages and
L2-normalised. ``IndexConfig.feature_options["style"]["stages"]``
picks the stages (``benchmarks/bench_style.py`` measures the choice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from catalens.indexer.backbones import get_backbone
from catalens.indexer.features import l2_normalise, register_feature
from catalens.indexer.features.deep import DeepPreparer
from catalens.indexer.runtime import compile_network, resolve_device

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

# EfficientNet-Lite0 stages 9 and 12 end blocks 8 and 11 (112 and 192 channels, at 1/16 of the
# input). Measured with bench_style.py: centred Gram matrices of these late stages found brand
# lines best; early stages (blocks 1 and 3) and uncentred matrices fell far below; averaging
# channels down to 48 keeps the vector at 1,879 numbers and costs some of that.
DEFAULT_STAGES = (9, 12)
MAX_CHANNELS = 48


class StyleFeature:
    """Gram vectors of the backbone's early stages as a ``GlobalFeature``."""

    name = "style"

    def __init__(self, backbone: str = "efficientnet_lite0", stages: tuple[int, ...] = DEFAULT_STAGES,
                 runtime: str = "auto", device: str = "auto", pretrained: bool = True, scaling: str = "auto"):
        spec = get_backbone(backbone)
        device_ = resolve_device(device)

        def build():
            from catalens.indexer.backbones.networks import GramVectors

            return GramVectors(spec.create(pretrained=pretrained), tuple(stages), spec.input_size, MAX_CHANNELS)

        # The conversion is cached by what the module computes: bump the "v" when that changes.
        key = f"{backbone}-style-v2-{'-'.join(map(str, stages))}" if pretrained else None
        self._network, _ = compile_network(build, spec.input_size, runtime, device_, key)
        # Its size from one image's output (a cached conversion has no module to ask).
        self.dim = int(self._network(np.zeros((1, 3, spec.input_size, spec.input_size), np.float32)).shape[1])
        self.preparer = DeepPreparer(spec, scaling)
        self.draft_size = spec.input_size * 2

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(self._network(np.stack(prepared)))


@register_feature("style", "global", description="Gram matrices of early backbone layers: a product line's design")
def build_style(catalog: Catalog) -> StyleFeature:
    options = dict(catalog.config.feature_options.get("style", {}))
    stages = tuple(options.pop("stages", DEFAULT_STAGES))
    if options:
        raise ValueError(f"unknown style settings: {', '.join(sorted(options))} (known: stages)")
    return StyleFeature(catalog.config.backbone, stages, catalog.config.runtime, scaling=catalog.config.input_scaling)
