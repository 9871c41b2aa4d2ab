"""Experiment: fine-tune EfficientNet-Lite0's last block on the catalog, for classification.

The frozen ImageNet features cap grocery val classification near 75% with every train photo in
the catalog (deep + colour + local evidence; ``bench_classify.py``). This script measures the
next step: train the last MBConv block, the head convolution and a linear classifier on the
catalog's photos, on the CPU, with everything below that block frozen. Its input (block 14's
output, 192 x 8 x 8 at 256 px, for the centre crop and its mirror image) is computed once by the
frozen trunk, so an epoch costs the top of the network only.

    .venv/bin/python benchmarks/bench_finetune_top.py [--epochs 6] [--limit N]

It prints val fine accuracy of the fine-tuned classifier alone, then of ``search.classify`` on the
fine-tuned pooled features (optionally with colour and local evidence from the
``bench_classify.py`` cache). Measured once with this recipe by the prototype this script was
written from (2 busy cores, 6 epochs, about 8 minutes of training; this script itself has only
had a smoke run, ``--limit 30 --epochs 1``):
the classifier alone 74.7%; HierarchicalFewShotClassifier on fine-tuned features 75.3%, + local
evidence 78.4%, + colour 0.5 + local evidence 80.4%, against 75.0% for frozen features with the
same additions. Not yet part of ``catalens finetune``: that needs the fine-tuned top stored with the
index and applied to new items and queries (like the autoencoder's codes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.tables import format_table  # noqa: E402
from indexer.backbones import get_backbone  # noqa: E402
from indexer.deep import DeepPreparer, OpenVinoRunner  # noqa: E402

FIRST_TRAINED_BLOCK = 15


class Trunk(nn.Module):
    """The frozen part: stem and blocks below ``FIRST_TRAINED_BLOCK``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        for block in net._blocks[:FIRST_TRAINED_BLOCK]:
            x = block(x)
        return x


class Top(nn.Module):
    """The trained part: the last block(s), the head convolution, pooling and a linear layer."""

    def __init__(self, net: nn.Module, n_classes: int):
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in net._blocks[FIRST_TRAINED_BLOCK:])
        self.head, self.bn, self.act = copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1), copy.deepcopy(net._swish)
        self.fc = nn.Linear(self.head.out_channels, n_classes)

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            maps = block(maps)
        return self.act(self.bn(self.head(maps))).mean(dim=(2, 3))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.dropout(self.pooled(maps), 0.2, self.training))


def trunk_maps(paths: list[Path]) -> np.ndarray:
    """(n, 2, C, H, W) float16 trunk outputs of each photo's centre crop and its mirror image."""
    from tqdm import tqdm

    from indexer.imageio import load_rgb

    spec = get_backbone("efficientnet_lite0")
    trunk = OpenVinoRunner(Trunk(spec.create().net).eval(), spec, threads=0, cache_key=None)
    preparer = DeepPreparer(spec)
    out = None
    for i, path in enumerate(tqdm(paths, unit="img", desc="trunk")):
        crop = preparer(load_rgb(path, draft_size=spec.input_size * 2))
        maps = trunk(np.stack([crop, np.ascontiguousarray(crop[:, :, ::-1])])).astype(np.float16)
        if out is None:
            out = np.zeros((len(paths), *maps.shape), np.float16)
        out[i] = maps
    return out


def train_top(maps: np.ndarray, labels: np.ndarray, n_classes: int, epochs: int, seed: int = 0) -> Top:
    torch.manual_seed(seed)
    top = Top(get_backbone("efficientnet_lite0").create().net, n_classes)
    for parameter in top.parameters():
        parameter.requires_grad_(True)
    inputs, targets = torch.from_numpy(maps.astype(np.float32)), torch.from_numpy(labels)
    batch = 64
    steps = epochs * max(1, len(inputs) // batch)
    body = [p for name, p in top.named_parameters() if not name.startswith("fc.")]
    optimiser = torch.optim.AdamW([{"params": body, "lr": 3e-4}, {"params": top.fc.parameters(), "lr": 3e-3}], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=[3e-4, 3e-3], total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    started = time.perf_counter()
    for epoch in range(epochs):
        top.train()
        for module in top.modules():  # a few thousand photos cannot re-estimate ImageNet's statistics
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        order, view = torch.randperm(len(inputs)), torch.randint(0, 2, (len(inputs),))
        for step in range(max(1, len(inputs) // batch)):
            rows = order[step * batch : (step + 1) * batch]
            loss = loss_fn(top(inputs[rows, view[rows]]), targets[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
    return top.eval()


def pooled_features(top: Top, maps: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([
            sum(top.pooled(torch.from_numpy(maps[i : i + 128, v].astype(np.float32))) for v in (0, 1)).numpy()
            for i in range(0, len(maps), 128)
        ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--limit", type=int, default=0, help="use only every n-th photo (a quick smoke run)")
    parser.add_argument("--cache", default="benchmarks/out/classify_features.pkl", help="bench_classify's features, for colour and local evidence")
    args = parser.parse_args()
    from datasets.grocery import split_photos
    from search.classify import (
        HierarchicalFewShotClassifier,
        classification_features,
        verified_evidence,
    )
    from search.geometry import verify

    train, val = split_photos("train"), split_photos("val")
    step = args.limit or 1
    train_rows, val_rows = np.arange(0, len(train), step), np.arange(0, len(val), step)
    train_paths = np.array([train[i].category for i in train_rows])
    val_paths = np.array([val[i].category for i in val_rows])
    classes, labels = np.unique(train_paths, return_inverse=True)
    maps = trunk_maps([train[i].path for i in train_rows] + [val[i].path for i in val_rows])
    train_maps, val_maps = maps[: len(train_rows)], maps[len(train_rows) :]
    top = train_top(train_maps, labels, len(classes), args.epochs)
    with torch.inference_mode():
        logits = sum(top(torch.from_numpy(val_maps[:, v].astype(np.float32))) for v in (0, 1)).numpy()
    rows = [("fine-tuned classifier alone", f"{(classes[logits.argmax(1)] == val_paths).mean():.3f}")]
    x, q = pooled_features(top, train_maps), pooled_features(top, val_maps)
    classifier = HierarchicalFewShotClassifier().fit(x, train_paths)
    rows.append(("classify on fine-tuned features", f"{(classifier.predict(q) == val_paths).mean():.3f}"))
    cache = Path(args.cache)
    if cache.is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_classify import Features

        data = Features(cache)
        xc = classification_features(x, data.train_colour[train_rows], 0.5)
        qc = classification_features(q, data.val_colour[val_rows], 0.5)
        classifier = HierarchicalFewShotClassifier().fit(xc, train_paths)
        evidence = verified_evidence(classifier, qc, lambda r, s: verify(data.val_sift[val_rows[r]], data.train_sift[train_rows[s]]).inliers)
        rows.append(("+ colour 0.5 + local evidence", f"{(classifier.predict(qc, evidence) == val_paths).mean():.3f}"))
    print(format_table(["grocery val, all train photos", "fine accuracy"], rows))


if __name__ == "__main__":
    main()
