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
from catalens.indexer.estimator import saved_params
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

    def __init__(self, model_file: Path, scaling: str = "auto", runtime: str = "auto"):
        # The saved parameters name the backbone; the model itself (torch modules) is loaded only
        # where the network's conversion is not cached yet.
        params = saved_params(model_file, "AdaptedTop")
        spec = get_backbone(params.get("backbone", "efficientnet_lite0"))
        self.model_file, self._model = Path(model_file), None

        def build():
            from torch import nn

            from catalens.indexer.backbone_networks import AdaptedNetwork

            model = self.model
            frozen = nn.Sequential(*spec.create(pretrained=model.pretrained).stages()[: model.first_stage_])
            return AdaptedNetwork(frozen, model.top_)

        key = f"{spec.name}-adapted-{weights_stamp(model_file)}" if params.get("pretrained", True) else None
        self._network, self.runtime = compile_network(build, spec.input_size, runtime, "cpu", key)
        self.preparer = DeepPreparer(spec, scaling)
        self.draft_size = spec.input_size * 2
        # Its size from one image's output (a cached conversion has no module to ask).
        self.dim = int(self._network(np.zeros((1, 3, spec.input_size, spec.input_size), np.float32)).shape[1])

    @property
    def model(self) -> AdaptedTop:
        """The fitted top stages, loaded on first use."""
        if self._model is None:
            from catalens.indexer.training.adaptation import AdaptedTop

            self._model = AdaptedTop.load(self.model_file, progress=False)
        return self._model

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        pairs = np.stack([view for crop in prepared for view in (crop, np.ascontiguousarray(crop[:, :, ::-1]))])
        rows = l2_normalise(self._network(pairs))
        return l2_normalise(rows[0::2] + rows[1::2])

    def finish_one_view(self, prepared: list[Any]) -> np.ndarray:
        """The centre crop alone: half the network passes of ``finish``, for many crops of one photo
        (``locate``'s windows), at about the same recall there (benchmarks/bench_locate.py)."""
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(self._network(np.stack(prepared)))


@register_feature(FEATURE_NAME, "global", model_file=MODEL_FILE, fitted_by="catalens finetune", replaces="deep",
                  search_weight=1.0, classify_weight=1.0,
                  description="the backbone's top stages adapted to the catalog's products")
def build_adapted_deep(catalog: Catalog) -> AdaptedDeep:
    return AdaptedDeep(catalog.models_dir / MODEL_FILE, catalog.config.input_scaling, catalog.config.runtime)
