"""Input preprocessing of the frozen backbone, chosen by val and by cross-validation over train's
shooting sessions: pixel scaling x input size x crop, for each EfficientNet-Lite.

    .venv/bin/python benchmarks/bench_preprocessing.py [--backbones efficientnet_lite0] [--sizes 224,256,288]
        [--scalings imagenet,symmetric] [--crops centre,squash,pad]

Cosine 1-NN top-1 product accuracy of the pooled descriptor, for two catalogs: iconic + train
(queries: val; and 5 folds, each fold's train photos against the iconic images and the other
folds) and the iconic images alone (queries: val; and each fold of train). A size left out
means each backbone's registered size. Features are cached in benchmarks/out/preprocessing.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from catalens.api.tables import format_table
from catalens.datasets.grocery import LabelledPhoto, iconic_photos, split_photos, train_folds
from catalens.indexer.backbones import get_backbone
from catalens.indexer.features import l2_normalise
from catalens.indexer.features.deep import DeepPreparer
from catalens.indexer.imageio import load_rgb
from catalens.indexer.runtime import compile_network

GROUPS = ("Fruit", "Packages", "Vegetables")
OUT = Path(__file__).resolve().parent / "out" / "preprocessing"


class CropPreparer(DeepPreparer):
    """``DeepPreparer`` (centre crop) or the whole image squashed or padded into the square."""

    def __init__(self, spec, scaling: str, crop: str):
        super().__init__(spec, scaling)
        self.crop = crop

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self.crop == "centre":
            return super().__call__(image)
        size = self.size
        if self.crop == "squash":
            square = image.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
        else:
            scale = size / max(image.size)
            resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                   Image.BILINEAR, reducing_gap=2.0)
            square = Image.new("RGB", (size, size), (124, 116, 104))  # the ImageNet mean colour: ~0 either way
            square.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
        array = (np.asarray(square, dtype=np.float32) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(array.transpose(2, 0, 1))


def features(backbone: str, size: int, scaling: str, crop: str, photos: list[LabelledPhoto]) -> tuple[np.ndarray, float]:
    path = OUT / f"{backbone}-{size}-{scaling}-{crop}.npz"
    if path.is_file():
        cached = np.load(path)
        return cached["rows"], float(cached["ms"])
    spec = dataclasses.replace(get_backbone(backbone), input_size=size)
    preparer = CropPreparer(spec, scaling, crop)
    network, _ = compile_network(spec.create, size, cache_key=f"{backbone}-pooled-{size}")
    rows, spent = [], 0.0
    for photo in tqdm(photos, desc=f"{backbone} {size} {scaling} {crop}", leave=False):
        x = preparer(load_rgb(photo.path, draft_size=2 * size))[None]
        started = time.perf_counter()
        rows.append(network(x)[0])
        spent += time.perf_counter() - started
    rows_array, ms = l2_normalise(np.stack(rows)), spent / len(rows) * 1000
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(path, rows=rows_array, ms=ms)
    return rows_array, ms


def top1(rows, labels, tops, catalog: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    nearest = catalog[(rows[queries] @ rows[catalog].T).argmax(axis=1)]
    correct = labels[nearest] == labels[queries]
    return {"all": 100 * correct.mean(), **{g: 100 * correct[tops[queries] == g].mean() for g in GROUPS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="efficientnet_lite0")
    parser.add_argument("--sizes", default="", help="comma-separated input sizes (default: each backbone's own)")
    parser.add_argument("--scalings", default="imagenet,symmetric")
    parser.add_argument("--crops", default="centre")
    args = parser.parse_args()
    iconic, train, val = iconic_photos(), split_photos("train"), split_photos("val")
    photos = iconic + train + val
    labels = np.array([p.category for p in photos])
    tops = np.array([p.top for p in photos])
    i_iconic = np.arange(len(iconic))
    i_train = np.arange(len(iconic), len(iconic) + len(train))
    i_val = np.arange(len(iconic) + len(train), len(photos))
    folds = np.array(train_folds(train))
    table = []
    for backbone in args.backbones.split(","):
        sizes = [int(s) for s in args.sizes.split(",") if s] or [get_backbone(backbone).input_size]
        for size in sizes:
            for scaling in args.scalings.split(","):
                for crop in args.crops.split(","):
                    rows, ms = features(backbone, size, scaling, crop, photos)
                    for name, catalog_of in (("iconic + train", lambda f: np.concatenate([i_iconic, i_train[folds != f]])),
                                             ("iconic only", lambda f: i_iconic)):
                        val_catalog = np.concatenate([i_iconic, i_train]) if name == "iconic + train" else i_iconic
                        on_val = top1(rows, labels, tops, val_catalog, i_val)
                        cv = [top1(rows, labels, tops, catalog_of(f), i_train[folds == f])["all"] for f in range(5)]
                        table.append((backbone, size, scaling, crop, name, f"{on_val['all']:.1f}",
                                      *(f"{on_val[g]:.1f}" for g in GROUPS), f"{np.mean(cv):.1f}",
                                      f"{min(cv):.1f}-{max(cv):.1f}", f"{ms:.1f}"))
    print("\ncosine 1-NN top-1 product accuracy (%): val (296 photos) and 5 shooting-session folds of train")
    print(format_table(["backbone", "size", "scaling", "crop", "catalog", "val", *GROUPS, "CV mean", "CV range",
                        "net ms/img"], table))


if __name__ == "__main__":
    main()
