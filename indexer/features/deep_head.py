"""The ``deep_head`` global feature: the deep descriptor through the projection head fitted on the catalog.

``catalens finetune`` fits the head (``catalens.indexer.training.projection``) and keeps it
only where a held-out share of the catalog finds products better with it; kept, it stands in
for ``deep`` in search and classification.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from catalens.indexer.features import register_feature
from catalens.indexer.features.deep import DeepFeature
from catalens.indexer.training.projection import HEAD_FEATURE, HEAD_FILE, TripletProjection

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog


class ProjectedDeep:
    """Deep rows mapped by a fitted ``TripletProjection``."""

    name = HEAD_FEATURE

    def __init__(self, deep: DeepFeature, head: TripletProjection):
        self.deep, self.head = deep, head
        self.preparer, self.draft_size = deep.preparer, deep.draft_size
        self.dim = head.out_dim

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return self.head.transform(self.deep.finish(prepared))


@register_feature(HEAD_FEATURE, "global", model_file=HEAD_FILE, fitted_by="catalens finetune", replaces="deep",
                  search_weight=1.0, classify_weight=1.0,
                  description="deep through a metric projection head fitted on the catalog")
def build_projected_deep(catalog: Catalog) -> ProjectedDeep:
    return ProjectedDeep(catalog.feature("deep"), TripletProjection.load(catalog.models_dir / HEAD_FILE))
