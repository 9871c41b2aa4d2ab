"""Fine-tuning the backbone's top stages on the catalog's categories (``catalens finetune --top-block``).

Frozen ImageNet features cap how well the catalog's categories can be told apart. Training the
backbone's last stages (for EfficientNet-Lite: the last two MBConv blocks and the head
convolution), everything below frozen, lets them specialise. The frozen trunk's output for
each item (centre crop and its mirror image) is computed once, so an epoch costs only the top
of the network. ``benchmarks/bench_finetune_top.py`` measures which stages to train and for how
long.

The fitted top is the catalog's ``deep_ft`` feature (``catalens.indexer.features.deep_ft``):
new items get its rows at indexing time, and classification uses it in place of ``deep``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from catalens.indexer.backbones import Backbone, get_backbone
from catalens.indexer.estimator import Estimator
from catalens.indexer.features import l2_normalise
from catalens.indexer.features.decode import extract_rows
from catalens.indexer.features.deep import DeepPreparer
from catalens.indexer.runtime import compile_network

if TYPE_CHECKING:
    from catalens.indexer.catalog import Catalog

log = logging.getLogger(__name__)

FEATURE_NAME = "deep_ft"
MODEL_FILE = "deep_ft_top.pt"
# The stages trained, counted from the end: for EfficientNet-Lite, blocks 14 and 15 and the head
# convolution (bench_finetune_top.py: the last block alone was worse, one block more cost 1.7x
# the training time for nothing).
TRAINED_STAGES = 3
# Training length when none is given: six passes, but never fewer than 72 optimiser steps
# (small catalogs underfit in six passes), and capped, since tiny catalogs would need hundreds.
MIN_EPOCHS, MIN_STEPS, MAX_EPOCHS = 6, 72, 30


def epochs_for(n_items: int, batch_size: int) -> int:
    """Passes over ``n_items`` maps when the caller names none (see ``MIN_STEPS``)."""
    steps_per_epoch = max(1, n_items // batch_size)
    return min(MAX_EPOCHS, max(MIN_EPOCHS, -(-MIN_STEPS // steps_per_epoch)))


def first_trained_stage(backbone: Backbone, trained_stages: int = TRAINED_STAGES) -> int:
    stages = len(backbone.stages())
    if stages <= trained_stages:
        raise ValueError(f"this backbone has {stages} stages: too few to fine-tune the last {trained_stages} alone")
    return stages - trained_stages


class TopStages(nn.Module):
    """The trained part: copies of the backbone's stages from ``first_stage`` on, its pooling, a linear classifier.

    ``pool`` is the frozen backbone's ``forward_head`` (no trained parameters of its own).
    """

    def __init__(self, backbone: Backbone, first_stage: int, n_classes: int):
        super().__init__()
        self.stages = nn.ModuleList(copy.deepcopy(stage) for stage in backbone.stages()[first_stage:])
        self.pool: Callable[[torch.Tensor], torch.Tensor] = backbone.forward_head
        self.fc = nn.Linear(backbone.num_features, n_classes)

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            maps = stage(maps)
        return self.pool(maps)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.dropout(self.pooled(maps), 0.2, self.training))


class FrozenTrunk:
    """Images to (n, 2, C, H, W) outputs of the backbone's stages below ``first_stage``: the centre
    crop and its mirror image. Two-step like every feature (``preparer`` in decode workers)."""

    def __init__(self, backbone: str, first_stage: int | None = None, pretrained: bool = True):
        spec = get_backbone(backbone)
        self.preparer = DeepPreparer(spec)
        self.draft_size = spec.input_size * 2
        network = spec.create(pretrained=pretrained)
        self.first_stage = first_trained_stage(network) if first_stage is None else first_stage
        trunk = nn.Sequential(*network.stages()[: self.first_stage])
        key = f"{backbone}-trunk{self.first_stage}" if pretrained else None
        self._run, _ = compile_network(trunk, spec.input_size, "auto", "cpu", key)

    def finish(self, prepared: list[np.ndarray]) -> np.ndarray:
        rows = [self._run(np.stack([crop, np.ascontiguousarray(crop[:, :, ::-1])])) for crop in prepared]
        return np.stack(rows).astype(np.float16)


class FineTunedTop(Estimator):
    """Fit the top stages on (trunk maps, category paths); ``transform`` gives pooled, L2-normalised rows."""

    fit_hint = "run 'catalens finetune --top-block' on the index"

    def __init__(self, backbone: str = "efficientnet_lite0", first_stage: int | None = None, epochs: int | None = None,
                 batch_size: int = 64, lr: float = 3e-4, head_lr: float = 3e-3, seed: int = 0, progress: bool = True,
                 pretrained: bool = True):
        self.backbone, self.first_stage, self.epochs, self.batch_size = backbone, first_stage, epochs, batch_size
        self.lr, self.head_lr, self.seed, self.progress, self.pretrained = lr, head_lr, seed, progress, pretrained

    def _network(self) -> Backbone:
        return get_backbone(self.backbone).create(pretrained=self.pretrained)

    def fit(self, maps: np.ndarray, categories: Sequence[str]) -> FineTunedTop:
        from tqdm import tqdm

        torch.manual_seed(self.seed)
        network = self._network()
        self.first_stage_ = first_trained_stage(network) if self.first_stage is None else self.first_stage
        self.classes_, labels = np.unique(np.asarray(categories, dtype=str), return_inverse=True)
        top = TopStages(network, self.first_stage_, len(self.classes_))
        for parameter in top.parameters():
            parameter.requires_grad_(True)
        inputs, targets = torch.from_numpy(maps.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))
        steps_per_epoch = max(1, len(inputs) // self.batch_size)
        self.n_epochs_ = self.epochs or epochs_for(len(inputs), self.batch_size)
        body = [p for name, p in top.named_parameters() if not name.startswith("fc.")]
        optimiser = torch.optim.AdamW([{"params": body, "lr": self.lr}, {"params": top.fc.parameters(), "lr": self.head_lr}],
                                      weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=[self.lr, self.head_lr],
                                                       total_steps=self.n_epochs_ * steps_per_epoch)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.loss_history_: list[float] = []
        with tqdm(total=self.n_epochs_ * steps_per_epoch, unit="step", desc="fine-tuning", disable=not self.progress) as bar:
            for _ in range(self.n_epochs_):
                top.train()
                for module in top.modules():  # a catalog cannot re-estimate ImageNet's statistics
                    if isinstance(module, nn.BatchNorm2d):
                        module.eval()
                order, view = torch.randperm(len(inputs)), torch.randint(0, 2, (len(inputs),))
                for step in range(steps_per_epoch):
                    rows = order[step * self.batch_size : (step + 1) * self.batch_size]
                    loss = loss_fn(top(inputs[rows, view[rows]]), targets[rows])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    bar.update(1)
                self.loss_history_.append(float(loss.item()))
                bar.set_postfix(loss=f"{loss.item():.3f}")
        self.top_ = top.eval()
        return self

    @property
    def dim(self) -> int:
        self.check_is_fitted()
        return self.top_.fc.in_features

    def transform(self, maps: np.ndarray) -> np.ndarray:
        """(n, dim) L2-normalised pooled features, the crop and its mirror summed."""
        self.check_is_fitted()
        with torch.inference_mode():
            rows = [sum(self.top_.pooled(torch.from_numpy(maps[i : i + 128, v].astype(np.float32))) for v in (0, 1)).numpy()
                    for i in range(0, len(maps), 128)]
        return l2_normalise(np.concatenate(rows)) if rows else np.zeros((0, self.dim), np.float32)

    def _state(self) -> dict[str, Any]:
        return {"classes": self.classes_, "top": self.top_.state_dict(), "epochs": int(self.n_epochs_),
                "first_stage": int(self.first_stage_), "loss_history": list(self.loss_history_)}

    def _restore(self, state: dict[str, Any]) -> None:
        self.classes_, self.n_epochs_ = np.asarray(state["classes"], dtype=str), int(state["epochs"])
        self.first_stage_, self.loss_history_ = int(state["first_stage"]), list(state["loss_history"])
        top = TopStages(self._network(), self.first_stage_, len(self.classes_))
        top.load_state_dict(state["top"])
        self.top_ = top.eval()


def model_path(catalog: Any) -> Path:
    return Path(catalog.models_dir) / MODEL_FILE


def finetune_top_stages(catalog: Catalog, epochs: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the top stages on every indexed item's category, store the model, and give every
    item its ``deep_ft`` row (the feature joins the catalog's features).

    ``epochs=None`` picks the training length from the catalog's size (``epochs_for``).
    """
    records = sorted(catalog.items.records().values(), key=lambda record: record.id)  # one catalog, one model
    if len(records) < 2 or len({record.category for record in records}) < 2:
        raise ValueError(f"{catalog.location}: fine-tuning needs at least two categories of items")
    started = time.perf_counter()
    trunk = FrozenTrunk(catalog.config.backbone)
    config = catalog.config
    maps, positions, errors = extract_rows(
        trunk, [record.image for record in records], batch_size=config.batch_size, num_workers=config.num_workers,
        max_pixels=config.max_pixels, progress=progress, desc="trunk",
    )
    for error in errors.values():
        log.warning("fine-tuning: skipped %s", error)
    if not positions:
        raise ValueError(f"{catalog.location}: none of the items' images could be read")
    keys = [records[position].key for position in positions]
    categories = [records[position].category for position in positions]
    model = FineTunedTop(config.backbone, trunk.first_stage, epochs=epochs, progress=progress).fit(maps, categories)
    rows = model.transform(maps)
    with catalog.lock:
        model.save(model_path(catalog))
        catalog.replace_feature(FEATURE_NAME, keys, rows)
        catalog.enable_feature(FEATURE_NAME)
    return {"items": len(keys), "categories": len(model.classes_), "epochs": model.n_epochs_,
            "final_loss": model.loss_history_[-1], "seconds": round(time.perf_counter() - started, 1)}
