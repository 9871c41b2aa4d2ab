"""The ``deep_ft`` global feature: the network adapted to the catalog by ``catalens finetune``.

Images go through the frozen trunk and the top stages trained on the catalog's products
(``catalens.indexer.training.adaptation``). Where finetune keeps it, it stands in for ``deep`` in
search and classification, and new items get its rows at indexing time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from catalens.indexer.features import register_feature
from catalens.indexer.training.adaptation import FEATURE_NAME, MODEL_FILE, AdaptedTop, FrozenTrunk

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog


class AdaptedDeep:
    """Frozen trunk maps of the centre crop and its mirror, through the adapted top stages."""

    name = FEATURE_NAME

    def __init__(self, model: AdaptedTop, trunk: FrozenTrunk):
        if trunk.first_stage != model.first_stage_:
            raise ValueError(f"the trunk ends at stage {trunk.first_stage}, the model starts at {model.first_stage_}")
        self.model, self.trunk = model, trunk
        self.dim = model.dim
        self.preparer, self.draft_size = trunk.preparer, trunk.draft_size

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return self.model.transform(self.trunk.finish(prepared))


@register_feature(FEATURE_NAME, "global", model_file=MODEL_FILE, fitted_by="catalens finetune", replaces="deep",
                  search_weight=1.0, classify_weight=1.0,
                  description="the backbone's top stages adapted to the catalog's products")
def build_adapted_deep(catalog: Catalog) -> AdaptedDeep:
    model = AdaptedTop.load(catalog.models_dir / MODEL_FILE, progress=False)
    trunk = FrozenTrunk(model.backbone, model.first_stage_, model.pretrained, catalog.config.input_scaling)
    return AdaptedDeep(model, trunk)
