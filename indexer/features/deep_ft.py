"""The ``deep_ft`` global feature: the network adapted to the catalog by ``catalens finetune``.

The frozen trunk and the top stages trained on the catalog's products
(``catalens.indexer.training.adaptation``), compiled as one network like ``deep``. Where finetune
keeps it, it stands in for ``deep`` in search and classification, and new items get its rows at
indexing time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catalens.indexer.backbones import get_backbone
from catalens.indexer.features import l2_normalise, register_feature
from catalens.indexer.features.deep import DeepPreparer
from catalens.indexer.runtime import compile_network, weights_stamp

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.indexer.training.adaptation import AdaptedTop

FEATURE_NAME = "deep_ft"
MODEL_FILE = "deep_ft_adapted.pt"


class AdaptedDeep:
    """The adapted embedding of an image: its centre crop and mirror image through the adapted network, summed.

    The same two views as the catalog's rows, which finetune made from trunk maps of them.
    """

    name = FEATURE_NAME

    def __init__(self, model: AdaptedTop, scaling: str = "auto", model_file: Path | None = None, runtime: str = "auto"):
        spec = get_backbone(model.backbone)

        def build():
            from torch import nn

            from catalens.indexer.backbone_networks import AdaptedNetwork

            frozen = nn.Sequential(*spec.create(pretrained=model.pretrained).stages()[: model.first_stage_])
            return AdaptedNetwork(frozen, model.top_)

        key = f"{model.backbone}-adapted-{weights_stamp(model_file)}" if model_file and model.pretrained else None
        self._network, self.runtime = compile_network(build, spec.input_size, runtime, "cpu", key)
        self.model, self.dim = model, model.dim
        self.preparer = DeepPreparer(spec, scaling)
        self.draft_size = spec.input_size * 2

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        pairs = np.stack([view for crop in prepared for view in (crop, np.ascontiguousarray(crop[:, :, ::-1]))])
        rows = l2_normalise(self._network(pairs))
        return l2_normalise(rows[0::2] + rows[1::2])


@register_feature(FEATURE_NAME, "global", model_file=MODEL_FILE, fitted_by="catalens finetune", replaces="deep",
                  search_weight=1.0, classify_weight=1.0,
                  description="the backbone's top stages adapted to the catalog's products")
def build_adapted_deep(catalog: Catalog) -> AdaptedDeep:
    from catalens.indexer.training.adaptation import AdaptedTop

    path = catalog.models_dir / MODEL_FILE
    return AdaptedDeep(AdaptedTop.load(path, progress=False), catalog.config.input_scaling, path, catalog.config.runtime)
