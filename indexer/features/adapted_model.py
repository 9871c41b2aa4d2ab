"""The adapted network's model: the frozen trunk, the top stages trained on the catalog, and
``AdaptedTop``, the fitted estimator that ``training.adaptation`` fits and the ``deep_ft``
feature loads. It registers no feature and imports torch, so only those two import it, on use.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from catalens.indexer.backbones import get_backbone
from catalens.indexer.backbones.networks import Backbone
from catalens.indexer.estimator import Estimator
from catalens.indexer.features import l2_normalise
from catalens.indexer.features.deep import DeepPreparer
from catalens.indexer.runtime import compile_network

# The stages trained, counted from the end (EfficientNet-Lite: blocks 14, 15 and the head
# convolution). Training from block 12 cost four times as long for no gain; the head alone lost.
TRAINED_STAGES = 3


def first_trained_stage(backbone: Backbone, trained_stages: int = TRAINED_STAGES) -> int:
    stages = len(backbone.stages())
    if stages <= trained_stages:
        raise ValueError(f"this backbone has {stages} stages: too few to fine-tune the last {trained_stages} alone")
    return stages - trained_stages


def steps_for(n_items: int) -> int:
    """Optimiser steps when none are asked for: 200 for a small catalog, growing with it, capped."""
    return int(min(600, 200 + 0.04 * n_items))


class TopStages(nn.Module):
    """Copies of the backbone's stages from ``first_stage`` on, its pooling, and a cosine classifier.

    ``pool`` is the frozen backbone's ``forward_head`` (no trained parameters of its own).
    """

    def __init__(self, backbone: Backbone, first_stage: int, n_classes: int, scale: float):
        super().__init__()
        self.stages = nn.ModuleList(copy.deepcopy(stage) for stage in backbone.stages()[first_stage:])
        self.pool = backbone.forward_head
        self.classes = nn.Parameter(torch.zeros(n_classes, backbone.num_features))
        self.scale = scale

    def embed(self, maps: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            maps = stage(maps)
        return self.pool(maps)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        cosine = nn.functional.normalize(self.embed(maps), dim=1) @ nn.functional.normalize(self.classes, dim=1).T
        return self.scale * cosine


class FrozenTrunk:
    """Images through the backbone's stages below ``first_stage``: the maps the top stages read.

    ``maps(batch)`` runs a (n, 3, S, S) float32 batch; as a two-step feature (``preparer`` in the
    decode workers, ``finish``) it gives (n, 2, C, H, W) maps of each image's centre crop and its
    mirror image, which is what the adapted embedding of an item is made of.
    """

    def __init__(self, backbone: str, first_stage: int | None = None, pretrained: bool = True, scaling: str = "auto"):
        spec = get_backbone(backbone)
        self.preparer = DeepPreparer(spec, scaling)
        self.draft_size = spec.input_size * 2
        network = spec.create(pretrained=pretrained)
        self.first_stage = first_trained_stage(network) if first_stage is None else first_stage
        trunk = nn.Sequential(*network.stages()[: self.first_stage])
        key = f"{backbone}-trunk{self.first_stage}" if pretrained else None
        self.maps, _ = compile_network(lambda: trunk, spec.input_size, "auto", "cpu", key)

    def finish(self, prepared: list[np.ndarray]) -> np.ndarray:
        rows = [self.maps(np.stack([crop, np.ascontiguousarray(crop[:, :, ::-1])])) for crop in prepared]
        return np.stack(rows).astype(np.float16)


class AdaptedTop(Estimator):
    """The top stages fitted on (trunk maps, product labels); ``transform`` gives item embeddings."""

    fit_hint = "run 'catalens finetune' on the index"

    def __init__(self, backbone: str = "efficientnet_lite0", first_stage: int | None = None, steps: int | None = None,
                 batch_size: int = 64, lr: float = 3e-4, head_lr: float = 3e-3, scale: float = 16.0, seed: int = 0,
                 progress: bool = True, pretrained: bool = True):
        self.backbone, self.first_stage, self.steps, self.batch_size = backbone, first_stage, steps, batch_size
        self.lr, self.head_lr, self.scale, self.seed = lr, head_lr, scale, seed
        self.progress, self.pretrained = progress, pretrained

    def _network(self) -> Backbone:
        return get_backbone(self.backbone).create(pretrained=self.pretrained)

    def fit(self, maps: np.ndarray, labels: Sequence[str], weights: np.ndarray | None = None) -> AdaptedTop:
        """``maps``: (N, C, H, W) views; ``labels``: each view's product; ``weights``: how often each is drawn."""
        from tqdm import tqdm

        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        network = self._network()
        self.first_stage_ = first_trained_stage(network) if self.first_stage is None else self.first_stage
        self.classes_, targets = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
        top = TopStages(network, self.first_stage_, len(self.classes_), self.scale)
        for parameter in top.parameters():
            parameter.requires_grad_(True)
        self._start_at_class_means(top, maps, targets, rng)
        self.n_steps_ = self.steps or steps_for(len(maps))
        probabilities = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
        body = [p for name, p in top.named_parameters() if name != "classes"]
        optimiser = torch.optim.AdamW([{"params": body, "lr": self.lr}, {"params": [top.classes], "lr": self.head_lr}],
                                      weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=[self.lr, self.head_lr],
                                                       total_steps=self.n_steps_, pct_start=0.2)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        targets_t = torch.from_numpy(targets.astype(np.int64))
        top.train()
        for module in top.modules():  # a catalog cannot re-estimate ImageNet's statistics
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        self.loss_history_: list[float] = []
        batch = min(self.batch_size, len(maps))
        with tqdm(total=self.n_steps_, unit="step", desc="adapting", disable=not self.progress, dynamic_ncols=True) as bar:
            for _ in range(self.n_steps_):
                rows = np.sort(rng.choice(len(maps), size=batch, replace=False, p=probabilities))
                loss = loss_fn(top(torch.from_numpy(np.asarray(maps[rows], np.float32))), targets_t[rows])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                self.loss_history_.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss_history_[-1]:.3f}")
        self.top_ = top.eval()
        return self

    @staticmethod
    def _start_at_class_means(top: TopStages, maps: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> None:
        """The classifier starts at each product's mean embedding: training starts near the answer."""
        sample = np.sort(rng.choice(len(maps), size=min(len(maps), 3000), replace=False))
        with torch.inference_mode():
            embedded = torch.cat([top.embed(torch.from_numpy(np.asarray(maps[sample[i : i + 256]], np.float32)))
                                  for i in range(0, len(sample), 256)])
        sums = torch.zeros_like(top.classes)
        sums.index_add_(0, torch.from_numpy(targets[sample].astype(np.int64)), nn.functional.normalize(embedded, dim=1))
        top.classes.data.copy_(nn.functional.normalize(sums, dim=1))

    @property
    def dim(self) -> int:
        self.check_is_fitted()
        return self.top_.classes.shape[1]

    def embed_views(self, maps: np.ndarray) -> np.ndarray:
        """(n, dim) L2-normalised embeddings of single views (n, C, H, W)."""
        self.check_is_fitted()
        with torch.inference_mode():
            rows = [self.top_.embed(torch.from_numpy(np.asarray(maps[i : i + 128], np.float32))).numpy()
                    for i in range(0, len(maps), 128)]
        return l2_normalise(np.concatenate(rows)) if rows else np.zeros((0, self.dim), np.float32)

    def transform(self, maps: np.ndarray) -> np.ndarray:
        """(n, dim) item embeddings from (n, 2, C, H, W) maps of each item's crop and mirror: the two summed."""
        return l2_normalise(self.embed_views(maps[:, 0]) + self.embed_views(maps[:, 1])) if len(maps) else (
            np.zeros((0, self.dim), np.float32))

    def _state(self) -> dict[str, Any]:
        exemplars = getattr(self, "exemplars_", None)
        return {"classes": self.classes_, "top": self.top_.state_dict(), "steps": int(self.n_steps_),
                "first_stage": int(self.first_stage_), "loss_history": list(self.loss_history_),
                "trained_keys": np.asarray(getattr(self, "trained_keys_", []), np.int64),
                "exemplars": np.zeros((0, 0), np.float16) if exemplars is None else exemplars.astype(np.float16),
                "exemplar_products": np.asarray(getattr(self, "exemplar_products_", []), dtype=str)}

    def _restore(self, state: dict[str, Any]) -> None:
        self.classes_, self.n_steps_ = np.asarray(state["classes"], dtype=str), int(state["steps"])
        self.first_stage_, self.loss_history_ = int(state["first_stage"]), list(state["loss_history"])
        self.trained_keys_ = np.asarray(state.get("trained_keys", []), np.int64)
        # None in a model saved before shop exemplars, or fitted without shop photos.
        exemplars = np.asarray(state.get("exemplars", np.zeros((0, 0))), np.float32)
        self.exemplars_ = exemplars if exemplars.size else None
        self.exemplar_products_ = np.asarray(state.get("exemplar_products", []), dtype=str)
        top = TopStages(self._network(), self.first_stage_, len(self.classes_), self.scale)
        top.load_state_dict(state["top"])
        self.top_ = top.eval()
