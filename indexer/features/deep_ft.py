"""The ``deep_ft`` global feature: images through the frozen trunk and the top stages fine-tuned on the catalog.

``catalens finetune --top-block`` fits it (``catalens.indexer.training.top_blocks``); from then
on new items get its rows at indexing time and classification uses it in place of ``deep``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from catalens.indexer.features import register_feature
from catalens.indexer.training.top_blocks import FEATURE_NAME, MODEL_FILE, FineTunedTop, FrozenTrunk

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog


class FineTunedDeep:
    """Frozen trunk maps of the centre crop and its mirror, through the fine-tuned top."""

    name = FEATURE_NAME

    def __init__(self, model: FineTunedTop, trunk: FrozenTrunk):
        if trunk.first_stage != model.first_stage_:
            raise ValueError(f"the trunk ends at stage {trunk.first_stage}, the model starts at {model.first_stage_}")
        self.model, self.trunk = model, trunk
        self.dim = model.dim
        self.preparer, self.draft_size = trunk.preparer, trunk.draft_size

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return self.model.transform(self.trunk.finish(prepared))


@register_feature(FEATURE_NAME, "global", model_file=MODEL_FILE, fitted_by="catalens finetune --top-block",
                  replaces="deep", classify_weight=1.0,
                  description="the backbone's top stages fine-tuned on the catalog's categories")
def build_fine_tuned_deep(catalog: Catalog) -> FineTunedDeep:
    model = FineTunedTop.load(catalog.models_dir / MODEL_FILE, progress=False)
    return FineTunedDeep(model, FrozenTrunk(model.backbone, model.first_stage_, model.pretrained))
