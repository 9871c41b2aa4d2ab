"""The ``deep_ft`` global feature: the network adapted to the catalog by ``catalens finetune``.

The frozen trunk and the top stages trained on the catalog's products
(``catalens.indexer.features.adapted_model``, fitted by ``catalens.indexer.training.adaptation``
through the ``ADAPTED_NETWORK`` slot), compiled as one network like ``deep``. Where finetune
keeps it, it stands in for ``deep`` in search and classification, and new items get its rows at
indexing time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from catalens.indexer.backbones import get_backbone
from catalens.indexer.estimator import saved_params, saved_state
from catalens.indexer.features import (
    FeatureUnavailableError,
    Window,
    l2_normalise,
    register_feature,
    windows_by_side,
)
from catalens.indexer.features.deep import DeepPreparer
from catalens.indexer.fitted import FittedSlot
from catalens.indexer.runtime import compile_network, weights_stamp

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog
    from catalens.indexer.features.adapted_model import AdaptedTop

FEATURE_NAME = "deep_ft"
MODEL_FILE = "deep_ft_adapted.pt"


class AdaptedDeep:
    """The adapted embedding of an image: its centre crop and mirror image through the adapted network, summed.

    The same two views as the catalog's rows, which finetune made from trunk maps of them.
    ``model``: the fitted top stages where this process fitted them (finetune), else they are read
    from ``model_file`` where needed. The network is compiled on first use, once the model file is
    stored: its conversion is cached under the file's stamp.
    """

    name = FEATURE_NAME

    def __init__(self, model_file: Path, scaling: str = "auto", runtime: str = "auto", model: AdaptedTop | None = None):
        # The saved parameters name the backbone; the model itself (torch modules) is loaded only
        # where the network's conversion is not cached yet.
        params = model.get_params() if model is not None else saved_params(model_file, "AdaptedTop")
        spec = get_backbone(params.get("backbone", "efficientnet_lite0"))
        self.model_file, self._model = Path(model_file), model
        self.spec, self.pretrained, self.runtime_asked = spec, bool(params.get("pretrained", True)), runtime
        self._compiled: tuple[Any, str, int] | None = None
        self._compiling = threading.Lock()
        self._window_network: tuple[Any, int, int] | None = None
        self._exemplars: tuple[np.ndarray, np.ndarray] | None = None
        self.preparer = DeepPreparer(spec, scaling)
        self.draft_size = spec.input_size * 2

    @property
    def model(self) -> AdaptedTop:
        """The fitted top stages, loaded on first use."""
        if self._model is None:
            from catalens.indexer.features.adapted_model import AdaptedTop

            self._model = AdaptedTop.load(self.model_file, progress=False)
        return self._model

    def trained_keys(self) -> np.ndarray:
        """Keys of the items the network trained on (stored with it by ``finetune``; none in a model
        saved before it kept them)."""
        found = self._model.trained_keys_ if self._model is not None else (
            saved_state(self.model_file, "AdaptedTop").get("trained_keys", []))
        return np.asarray(found, np.int64)

    def shop_exemplars(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, product of each row) of the shop photos finetune named surely, or None.

        Kept by ``finetune --unlabeled`` on a catalog of packshots (``AdaptedTop.exemplars_``):
        search scores a product by the shop photos taken for it, not by its one packshot alone
        (``search.retrieval``). Read once, without the model's torch modules."""
        if self._exemplars is None:
            if self._model is not None:
                rows, products = getattr(self._model, "exemplars_", None), getattr(self._model, "exemplar_products_", [])
            else:
                state = saved_state(self.model_file, "AdaptedTop")
                rows, products = state.get("exemplars"), state.get("exemplar_products", [])
            rows = np.zeros((0, 0), np.float32) if rows is None else np.asarray(rows, np.float32)
            self._exemplars = (rows, np.asarray(products, dtype=str))
        return self._exemplars if self._exemplars[0].size else None

    def _network_now(self) -> tuple[Any, str, int]:
        """(the network, its runtime, its output size), compiled on first use."""
        with self._compiling:
            if self._compiled is None:
                spec = self.spec

                def build():
                    from torch import nn

                    from catalens.indexer.backbones.networks import AdaptedNetwork

                    model = self.model
                    frozen = nn.Sequential(*spec.create(pretrained=model.pretrained).stages()[: model.first_stage_])
                    return AdaptedNetwork(frozen, model.top_)

                key = f"{spec.name}-adapted-{weights_stamp(self.model_file)}" if self.pretrained else None
                network, runtime = compile_network(build, spec.input_size, self.runtime_asked, "cpu", key)
                # Its size from one image's output (a cached conversion has no module to ask).
                dim = int(network(np.zeros((1, 3, spec.input_size, spec.input_size), np.float32)).shape[1])
                self._compiled = (network, runtime, dim)
            return self._compiled

    @property
    def _network(self) -> Any:
        return self._network_now()[0]

    @property
    def runtime(self) -> str:
        return self._network_now()[1]

    @property
    def dim(self) -> int:
        return self._network_now()[2]

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

    def _windows_network(self) -> tuple[Any, int, int]:
        """(the adapted network without its pooling, for any image size; its stride in pixels;
        one view's side in cells), compiled on first use."""
        if self._window_network is None:
            from torch import nn

            spec, size = self.spec, self.spec.input_size

            def unpooled():
                frozen = spec.create(pretrained=self.model.pretrained).stages()[: self.model.first_stage_]
                return nn.Sequential(*frozen, *self.model.top_.stages)

            network, _ = compile_network(unpooled, (3, -1, -1), self.runtime_asked, "cpu",
                                         f"{spec.name}-adapted-unpooled-{weights_stamp(self.model_file)}"
                                         if self.pretrained else None)
            cells = int(network(np.zeros((1, 3, size, size), np.float32)).shape[2])
            self._window_network = (network, size // cells, cells)
        return self._window_network

    def window_rows(self, image: Image.Image, boxes: Sequence[Window]) -> np.ndarray:
        """One view of each square window of ``image`` (``locate``'s region windows), from one
        pass of the network over the photo per window side instead of one pass per window.

        The photo is scaled so that a window of that side becomes ``resize_size`` pixels, as a
        crop of it would be; the trunk and the top stages run over the whole photo, and a
        window's row is the mean of the final map's cells under its centre ``input_size``
        square. A window then also sees its surroundings through the network's receptive field,
        which a crop does not. On grocery composites (benchmarks/bench_locate.py, 120 photos a
        layout) this found as many products as cropped windows on 2x2 grids (recall 84.4
        against 84.8%, precision 83.7 against 83.2%), 5 points fewer on 3x3 grids and 4 more on
        clutter, in about two thirds of the time.
        """
        if not len(boxes):
            return np.zeros((0, self.dim), np.float32)
        network, stride, cells = self._windows_network()
        preparer = self.preparer
        rows = np.zeros((len(boxes), self.dim), np.float32)
        margin = (preparer.resize_size - preparer.size) / 2
        for side, members in windows_by_side(boxes).items():
            scale = preparer.resize_size / side
            size = (max(preparer.size, round(image.width * scale)), max(preparer.size, round(image.height * scale)))
            pixels = image.resize(size, Image.BILINEAR, reducing_gap=2.0)
            array = (np.asarray(pixels, dtype=np.float32) / 255.0 - preparer.mean) / preparer.std
            # OpenVINO prepares the network again for each new input shape (+80 ms on an 879 x 879
            # pass); photos of one camera repeat their shapes. Padding every side to a multiple of
            # 32 made fewer shapes but 6% more work on the benchmark's composites (10 shapes in 180).
            # The whole photo through the network, unpooled: windows at half stride overlap four
            # deep, and pooling each window's cells of one pass does a quarter of the work of a
            # pass per window.
            maps = network(np.ascontiguousarray(array.transpose(2, 0, 1))[None])[0]
            height, width = maps.shape[1:]
            for i in members:
                x0, y0, _, _ = boxes[i]
                column = min(max(round((x0 * scale + margin) / stride), 0), max(width - cells, 0))
                row = min(max(round((y0 * scale + margin) / stride), 0), max(height - cells, 0))
                # The backbone's pooling: the mean over the window's cells (every backbone with
                # stages enough to fine-tune pools by the mean; fc7 networks have one stage).
                rows[i] = maps[:, row : row + cells, column : column + cells].mean(axis=(1, 2))
        return l2_normalise(rows)


def _load_adapted(catalog: Any, path: Path) -> AdaptedDeep:
    return AdaptedDeep(path, catalog.config.input_scaling, catalog.config.runtime)


# Fitted by ``catalens finetune`` alone (``training.adaptation`` passes its run and commit to
# ``refit``); it describes the catalog it was trained on until finetune runs again.
ADAPTED_NETWORK = FittedSlot(name="adapted network", model_file=MODEL_FILE, load=_load_adapted,
                             fresh=lambda model, catalog: None, fitted_by="catalens finetune")


@register_feature(FEATURE_NAME, "global", model=ADAPTED_NETWORK, replaces="deep",
                  search_weight=1.0, classify_weight=1.0,
                  description="the backbone's top stages adapted to the catalog's products")
def build_adapted_deep(catalog: Catalog) -> AdaptedDeep:
    return ADAPTED_NETWORK.require(catalog, FeatureUnavailableError(
        f"{FEATURE_NAME}: no model fitted for this index yet (run 'catalens finetune')"))


def trained_keys(catalog: Catalog) -> np.ndarray | None:
    """Keys of the items the catalog's adapted network trained on (stored with it by ``finetune``),
    or None where search does not use one (no ``deep_ft``, or a model saved before it kept them).
    Read without building the network: a search's calibration asks it, and must not import torch."""
    if FEATURE_NAME not in catalog.config.features:
        return None
    adapted = ADAPTED_NETWORK.status(catalog, judge=False).model
    keys = adapted.trained_keys() if adapted is not None else np.zeros(0, np.int64)
    return keys if len(keys) else None


def moved_features(catalog: Catalog) -> set[str]:
    """The features whose stored rows ``finetune --unlabeled`` moved toward the shop photos named
    as each item's product (``deep_ft``, and ``colour`` where it moved too): each such row is 70%
    its product's, so it says which product the catalog filed the item under, not what the image
    shows. Read from the adaptation report the finetune stored; empty without one."""
    report = catalog.meta.get("adaptation") or {}
    moved = set()
    if report.get("toward_shop_photos") and FEATURE_NAME in catalog.config.features:
        moved.add(FEATURE_NAME)
    if report.get("colour_moved"):
        moved.add("colour")
    return moved
