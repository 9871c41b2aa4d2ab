"""The ``deep_ft`` feature: EfficientNet-Lite0's last two blocks fine-tuned on the catalog's categories.

Frozen ImageNet features cap grocery val classification near 75% with every train photo in the
catalog (deep + colour + verified local matches). Training the last two MBConv blocks and the
head convolution on the catalog, everything below frozen, lifts that to 81.2% (two training
seeds: 82.4, 80.1), and five photos per leaf from 63.9% to 65.7% (three draws: 61.5 -> 63.5,
66.2 -> 67.6, 63.9 -> 65.9), with colour and local evidence on both sides
(``python benchmarks/bench_finetune_top.py``: 200-245 s of training for 2,640 photos on 2 cores,
45-60 s for 405). Training the last block alone gave 78.7% and 64.5%. The frozen trunk's output
for each item (192 x 8 x 8, centre crop and its mirror image) is computed once, so an epoch
costs only the top of the network.

Like the autoencoder, the model lives in the index's ``models/``; once it exists, new items get
``deep_ft`` rows at indexing time and ``catalens classify`` uses them instead of ``deep``.
Search keeps the frozen ``deep`` features (the fine-tuned space is shaped for categories, not
for telling two photos of one product from a different product).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from indexer.backbones import get_backbone
from indexer.deep import DeepPreparer, OpenVinoRunner, l2_normalise
from indexer.features import extract_rows, register_extension
from indexer.stores import replace_feature_rows

log = logging.getLogger(__name__)

FEATURE_NAME = "deep_ft"
MODEL_FILE = "top_block.pt"
BACKBONE = "efficientnet_lite0"
# Blocks 14 (the last 192-channel one) and 15, then the head. Chosen on grocery val with every
# train photo, seed 0 (bench_finetune_top.py --first-block N): from block 15 78.7%, from 14 82.4%,
# from 13 82.4% at 1.7x the training time of 14. Blocks 14 and 15 both read 192 x 8 x 8 maps.
FIRST_TRAINED_BLOCK = 14
# Models saved before the choice was stored trained block 15 only.
_LEGACY_FIRST_BLOCK = 15
# Training length when none is given: six passes, but never fewer than the 72 optimiser steps
# that 12 passes over five photos per leaf of grocery's 81 leaves make (405 photos are 6 batches
# a pass; six passes of them underfit on val). Capped, since tiny catalogs would need hundreds.
MIN_EPOCHS, MIN_STEPS, MAX_EPOCHS = 6, 72, 30


def epochs_for(n_items: int, batch_size: int) -> int:
    """Passes over ``n_items`` maps when the caller names none (see ``MIN_STEPS``)."""
    steps_per_epoch = max(1, n_items // batch_size)
    return min(MAX_EPOCHS, max(MIN_EPOCHS, -(-MIN_STEPS // steps_per_epoch)))


class Trunk(nn.Module):
    """The frozen part: stem and the blocks below ``first_block``."""

    def __init__(self, net: nn.Module, first_block: int = FIRST_TRAINED_BLOCK):
        super().__init__()
        self.net, self.first_block = net, first_block

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        for block in net._blocks[: self.first_block]:
            x = block(x)
        return x


class Top(nn.Module):
    """The trained part: the last block, the head convolution, pooling and a linear classifier."""

    def __init__(self, net: nn.Module, n_classes: int, first_block: int = FIRST_TRAINED_BLOCK):
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(block) for block in net._blocks[first_block:])
        self.head, self.bn, self.act = copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1), copy.deepcopy(net._swish)
        self.fc = nn.Linear(self.head.out_channels, n_classes)

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            maps = block(maps)
        return self.act(self.bn(self.head(maps))).mean(dim=(2, 3))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.dropout(self.pooled(maps), 0.2, self.training))


def _backbone_net(pretrained: bool = True) -> nn.Module:
    return get_backbone(BACKBONE).create(pretrained=pretrained).net


class TrunkMaps:
    """Images to (n, 2, C, H, W) trunk outputs of the centre crop and its mirror image."""

    def __init__(self, pretrained: bool = True, first_block: int = FIRST_TRAINED_BLOCK):
        spec = get_backbone(BACKBONE)
        self.preparer = DeepPreparer(spec)
        self.draft_size = spec.input_size * 2
        self.first_block = first_block
        trunk = Trunk(_backbone_net(pretrained), first_block).eval()
        try:
            key = f"{BACKBONE}-trunk{first_block}" if pretrained else None
            self._run = OpenVinoRunner(trunk, spec, threads=0, cache_key=key)
        except Exception as error:  # noqa: BLE001 - OpenVINO is an accelerator, not a requirement
            log.info("trunk runs in PyTorch (%s)", error)

            def run(batch: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return trunk(torch.from_numpy(batch)).numpy()

            self._run = run

    def finish(self, prepared: list[np.ndarray]) -> np.ndarray:
        rows = [self._run(np.stack([crop, np.ascontiguousarray(crop[:, :, ::-1])])) for crop in prepared]
        return np.stack(rows).astype(np.float16)


class TopBlockClassifier:
    """Fit the top of the network on (trunk maps, category paths); ``transform`` gives pooled rows.

    sklearn-shaped: hyper-parameters in ``__init__``, what is learned in ``top_`` / ``classes_``.
    """

    def __init__(self, epochs: int | None = None, batch_size: int = 64, lr: float = 3e-4, head_lr: float = 3e-3,
                 first_block: int = FIRST_TRAINED_BLOCK, seed: int = 0, progress: bool = True):
        self.epochs, self.batch_size, self.lr, self.head_lr = epochs, batch_size, lr, head_lr
        self.first_block, self.seed, self.progress = first_block, seed, progress

    def fit(self, maps: np.ndarray, categories: Sequence[str], pretrained: bool = True) -> TopBlockClassifier:
        from tqdm import tqdm

        torch.manual_seed(self.seed)
        self.classes_, labels = np.unique(np.asarray(categories, dtype=str), return_inverse=True)
        top = Top(_backbone_net(pretrained), len(self.classes_), self.first_block)
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

    def transform(self, maps: np.ndarray) -> np.ndarray:
        """(n, 1280) L2-normalised pooled features, the crop and its mirror summed."""
        if not hasattr(self, "top_"):
            raise RuntimeError("call fit() before transform()")
        with torch.inference_mode():
            rows = [sum(self.top_.pooled(torch.from_numpy(maps[i : i + 128, v].astype(np.float32))) for v in (0, 1)).numpy()
                    for i in range(0, len(maps), 128)]
        return l2_normalise(np.concatenate(rows)) if rows else np.zeros((0, self.top_.head.out_channels), np.float32)

    def save(self, path: Path) -> None:
        torch.save({"classes": [str(c) for c in self.classes_], "state": self.top_.state_dict(), "epochs": int(self.n_epochs_),
                    "first_block": int(self.first_block)}, path)

    @classmethod
    def load(cls, path: Path, pretrained: bool = True) -> TopBlockClassifier:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(epochs=int(saved["epochs"]), first_block=int(saved.get("first_block", _LEGACY_FIRST_BLOCK)), progress=False)
        model.classes_, model.n_epochs_ = np.asarray(saved["classes"], dtype=str), model.epochs
        top = Top(_backbone_net(pretrained), len(model.classes_), model.first_block)
        top.load_state_dict(saved["state"])
        model.top_ = top.eval()
        return model


class TopBlockFeature:
    """``deep_ft`` as a ``GlobalFeature``: images through the frozen trunk and the fine-tuned top."""

    name = FEATURE_NAME

    def __init__(self, model: TopBlockClassifier, trunk: TrunkMaps | None = None):
        self.model, self.trunk = model, trunk or TrunkMaps(first_block=model.first_block)
        if self.trunk.first_block != model.first_block:
            raise ValueError(f"trunk ends at block {self.trunk.first_block}, the model starts at {model.first_block}")
        self.dim = model.top_.head.out_channels
        self.preparer, self.draft_size = self.trunk.preparer, self.trunk.draft_size

    def finish(self, prepared: list[Any]) -> np.ndarray:
        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        return self.model.transform(self.trunk.finish(prepared))

    def transform_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.finish([self.preparer(image) for image in images])


def model_path(index) -> Path:
    return Path(index.models_dir) / MODEL_FILE


def index_feature(index) -> TopBlockFeature | None:
    """The index's fine-tuned feature (cached until the model file changes), or None."""
    path = model_path(index)
    if not path.is_file():
        return None
    stamp = path.stat().st_mtime_ns
    return index.cached(f"{FEATURE_NAME}:{stamp}", lambda: TopBlockFeature(TopBlockClassifier.load(path)))


def finetune_top_block(index, epochs: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the top block on every indexed item's category, store it, and add ``deep_ft`` rows.

    ``epochs=None`` picks the training length from the catalog's size (``epochs_for``).
    """

    if index.config.backbone != BACKBONE:
        raise ValueError(f"{index.root}: fine-tuning the top block needs the {BACKBONE} backbone, not {index.config.backbone}")
    records = sorted(index.store.all_items(), key=lambda record: record.id)  # one catalog, one model, on either store
    if len(records) < 2 or len({record.category for record in records}) < 2:
        raise ValueError(f"{index.root}: fine-tuning needs at least two categories of items")
    started = time.perf_counter()
    trunk = TrunkMaps()
    maps_array, positions, errors = extract_rows(
        trunk, [record.image for record in records], batch_size=index.config.batch_size,
        num_workers=index.config.num_workers, max_pixels=index.config.max_pixels, progress=progress, desc="trunk",
    )
    for error in errors.values():
        log.warning("fine-tuning: skipped %s", error)
    if not positions:
        raise ValueError(f"{index.root}: none of the items' images could be read")
    keys = [records[position].key for position in positions]
    categories = [records[position].category for position in positions]
    model = TopBlockClassifier(epochs=epochs, progress=progress).fit(maps_array, categories)
    rows = model.transform(maps_array)
    with index.lock:
        replace_feature_rows(index, FEATURE_NAME, keys, rows)
        model.save(model_path(index))
        index.save()
    return {"items": len(keys), "categories": len(model.classes_), "epochs": model.n_epochs_,
            "final_loss": model.loss_history_[-1], "seconds": round(time.perf_counter() - started, 1)}


class TopBlockExtension:
    """Keeps ``deep_ft`` rows of new items coming once a fine-tuned top exists."""

    name = FEATURE_NAME

    def features(self, index) -> list[Any]:
        feature = index_feature(index)
        return [feature] if feature is not None else []

    def after_update(self, index, changed_keys: np.ndarray, removed_keys: np.ndarray) -> None:
        """Each row stands alone: nothing to refit."""


register_extension(TopBlockExtension())
