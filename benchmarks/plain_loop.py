"""The baseline a user writes by hand: EfficientNet-Lite0 in eager PyTorch, batches of 32, PIL decoding.

    .venv/bin/python -m benchmarks.plain_loop MANIFEST.jsonl OUT.npy

Reads a catalens manifest (one JSON object an item, its ``image`` path) and saves the
L2-normalised pooled features, one row an image. ``bench_speed`` times this whole command
beside ``catalens index`` on the same photos: process start and model load count for both,
as a user sees them.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from catalens.datasets.catalog import read_manifest
from catalens.indexer.backbones import get_backbone

BATCH = 32


def main() -> None:
    manifest, out = sys.argv[1], sys.argv[2]
    paths = [item.image for item in read_manifest(manifest)]
    spec = get_backbone("efficientnet_lite0")
    model = spec.create().eval()
    transform = transforms.Compose([
        transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.input_size),
        transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
    ])
    rows = []
    with torch.inference_mode():
        for start in range(0, len(paths), BATCH):
            batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths[start : start + BATCH]])
            rows.append(torch.nn.functional.normalize(model(batch), dim=1).numpy())
    np.save(out, np.concatenate(rows))


if __name__ == "__main__":
    main()
