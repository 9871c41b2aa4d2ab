"""Classification with the backbone's top stages fine-tuned on the catalog (``catalens finetune --top-block``).

    .venv/bin/python benchmarks/bench_finetune_top.py [--epochs 6] [--small-epochs 12] [--draws 3] [--all-seeds 2] [--first-block 14]

Grocery val, fine accuracy. Catalog = every train photo, then 5 train photos per leaf (``--draws``
draws, trained for ``--small-epochs`` since an epoch of 405 photos is only 6 steps). Each row
pairs the frozen ``deep`` features with ``deep_ft`` from ``catalens.indexer.training.top_blocks``
(blocks from ``--first-block`` up and the head convolution) trained on that same catalog, with
colour and verified local evidence on both sides as ``catalens classify`` uses them. Deep, colour
and RootSIFT come from ``bench_classify.py``'s cache (made on first use); trunk maps are cached
beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from catalens.api.tables import format_table
from catalens.indexer.backbones import get_backbone
from catalens.indexer.features.decode import extract_rows
from catalens.indexer.training.top_blocks import FineTunedTop, FrozenTrunk, first_trained_stage
from catalens.search.classify import HierarchicalFewShotClassifier, verified_evidence
from catalens.search.verification import verify

if __package__:  # python -m benchmarks.bench_finetune_top
    from .bench_classify import Features, classification_features, draw
else:  # python benchmarks/bench_finetune_top.py
    from bench_classify import Features, classification_features, draw

BACKBONE = "efficientnet_lite0"


def default_first_block() -> int:
    """The block ``catalens finetune --top-block`` trains from. Stage 0 of EfficientNet-Lite is
    the stem, so block N is stage N + 1."""
    return first_trained_stage(get_backbone(BACKBONE).create(pretrained=False)) - 1


def trunk_maps(paths: list[Path], cache: Path, first_block: int) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)
    maps, positions, errors = extract_rows(FrozenTrunk(BACKBONE, first_stage=first_block + 1), paths, desc="trunk")
    if errors:
        raise SystemExit(f"unreadable grocery photos: {sorted(errors.values())[:3]}")
    np.save(cache, maps)
    return maps


def accuracy(data: Features, support: np.ndarray, x: np.ndarray, q: np.ndarray) -> float:
    xc = classification_features(x, data.train_colour[support])
    qc = classification_features(q, data.val_colour)
    classifier = HierarchicalFewShotClassifier().fit(xc, data.train_paths[support])
    evidence = verified_evidence(classifier, qc, lambda r, s: verify(data.val_sift[r], data.train_sift[support[s]]).inliers)
    return float((classifier.predict(qc, evidence) == data.val_paths).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--small-epochs", type=int, default=12)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first-block", type=int, default=None,
                        help="train the backbone's blocks from this one up, and the head (default: as catalens "
                             "finetune, 14; 15: the last block only)")
    parser.add_argument("--all-seeds", type=int, default=2, help="training seeds for the every-photo catalog")
    parser.add_argument("--cache", default="benchmarks/out/classify_features.pkl")
    args = parser.parse_args()
    if args.first_block is None:
        args.first_block = default_first_block()
    from catalens.datasets.grocery import split_photos

    data = Features(Path(args.cache))
    photos = list(split_photos("train")) + list(split_photos("val"))
    maps = trunk_maps([p.path for p in photos], Path(args.cache).with_name(f"trunk_maps_b{args.first_block}.npy"),
                      args.first_block)
    train_maps, val_maps = maps[: len(data.train_paths)], maps[len(data.train_paths) :]
    rows = []
    settings = ([("all", None, seed, args.epochs) for seed in range(args.all_seeds)]
                + [(5, 5, seed, args.small_epochs) for seed in range(args.draws)])
    for label, k, seed, epochs in settings:
        support = draw(data.train_paths, k, np.random.default_rng(seed))
        started = time.perf_counter()
        model = FineTunedTop(BACKBONE, first_stage=args.first_block + 1, epochs=epochs, seed=seed).fit(
            train_maps[support], data.train_paths[support])
        seconds = time.perf_counter() - started
        frozen = accuracy(data, support, data.train_deep[support], data.val_deep)
        tuned = accuracy(data, support, model.transform(train_maps[support]), model.transform(val_maps))
        rows.append((label, seed, len(support), epochs, f"{seconds:.0f}", f"{frozen:.3f}", f"{tuned:.3f}"))
        print(rows[-1], flush=True)
    for label in dict.fromkeys(row[0] for row in rows):
        mine = [row for row in rows if row[0] == label]
        rows.append((label, "mean", "", "", "", *(f"{np.mean([float(row[c]) for row in mine]):.3f}" for c in (5, 6))))
    print(format_table(["k", "draw", "items", "epochs", "train s", "deep + colour + local", "deep_ft + colour + local"], rows))


if __name__ == "__main__":
    main()
