"""Anomaly detection on the grocery dataset: train on Fruit + Vegetables train photos, score val.

Normal = Fruit and Vegetables val photos, anomalies = Packages val photos. Reports the AUROC of
the feature-map autoencoder and of a 64-px pixel autoencoder (each term of their anomaly score
alone, and the score itself), and of the simple baseline (cosine distance to the nearest catalog
item in deep-feature space), writes the ROC curves, a few heatmaps, and audits a catalog with
slipped-in foreign images (blank, noise, Packages photos): their ranks under reconstruction error
alone and under the anomaly score.

    .venv/bin/python benchmarks/bench_anomaly.py [--epochs 15] [--noise 0] [--out benchmarks/out/anomaly]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from catalens.api.tables import format_table
from catalens.datasets.grocery import split_photos
from catalens.indexer.features import l2_normalise
from catalens.indexer.features.autoencoder import AutoencoderInputs, extract_inputs
from catalens.indexer.features.autoencoder_model import ConvAutoencoder
from catalens.indexer.features.deep import DeepFeature
from catalens.indexer.training.train_autoencoder import plot_loss
from catalens.search.anomaly import render_heatmap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--out", default="benchmarks/out/anomaly")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train = [p.path for p in split_photos("train") if p.top != "Packages"]
    val = split_photos("val")
    labels = np.array([p.top == "Packages" for p in val])
    foreign_packages = [p.path for p in split_photos("train") if p.top == "Packages"][::150][:3]
    blank, noise = Image.new("RGB", (348, 348), (245, 245, 245)), Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (348, 348, 3), dtype=np.uint8))

    deep = DeepFeature()
    feeder = AutoencoderInputs("features", deep)
    started = time.perf_counter()
    maps, _, errors = extract_inputs(feeder, train + [p.path for p in val] + foreign_packages)
    assert not errors, errors
    extract_s = time.perf_counter() - started
    foreign_maps = np.concatenate([maps[-len(foreign_packages):], feeder.images([blank, noise]).astype(np.float16)])
    train_maps, val_maps = maps[: len(train)], maps[len(train) : len(train) + len(val)]

    rows, curves = [], {}
    # Baseline: the deep descriptor is the L2-normalised mean of these very maps.
    train_deep = l2_normalise(train_maps.astype(np.float32).mean(axis=(2, 3)))
    val_deep = l2_normalise(val_maps.astype(np.float32).mean(axis=(2, 3)))
    baseline = 1.0 - (val_deep @ train_deep.T).max(axis=1)
    curves["nearest catalog item (deep)"] = baseline
    rows.append(("nearest catalog item (deep)", f"{roc_auc_score(labels, baseline):.3f}", "-", "-"))

    started = time.perf_counter()
    model = ConvAutoencoder(epochs=args.epochs, noise=args.noise).fit(train_maps)
    fit_s = time.perf_counter() - started
    _, scores, error_maps = model.analyse(val_maps)
    terms = model.score_terms(val_maps)
    for term, values in terms.items():
        rows.append((f"  feature maps: {term} term", f"{roc_auc_score(labels, values):.3f}", "-", "-"))
    curves["AE on feature maps: reconstruction"] = terms["reconstruction"]
    curves["AE on feature maps: score"] = scores
    rows.append(("AE on feature maps (score)", f"{roc_auc_score(labels, scores):.3f}", f"{fit_s:.0f}",
                 f"{(scores[~labels] > model.threshold_).mean():.2f} / {(scores[labels] > model.threshold_).mean():.2f}"))
    plot_loss(model.loss_history_, out / "loss_features.png")
    print("so far:", rows, flush=True)

    pixel_feeder = AutoencoderInputs("pixels")
    pixels, _, _ = extract_inputs(pixel_feeder, train + [p.path for p in val], progress=False, dtype=np.float32)
    started = time.perf_counter()
    pixel_model = ConvAutoencoder(input_kind="pixels", width=16, epochs=args.epochs, noise=args.noise).fit(pixels[: len(train)])
    pixel_s = time.perf_counter() - started
    pixel_scores = pixel_model.score_samples(pixels[len(train) :])
    for term, values in pixel_model.score_terms(pixels[len(train) :]).items():
        rows.append((f"  64-px pixels: {term} term", f"{roc_auc_score(labels, values):.3f}", "-", "-"))
    curves["AE on 64-px pixels: score"] = pixel_scores
    rows.append(("AE on 64-px pixels (score)", f"{roc_auc_score(labels, pixel_scores):.3f}", f"{pixel_s:.0f}",
                 f"{(pixel_scores[~labels] > pixel_model.threshold_).mean():.2f} / "
                 f"{(pixel_scores[labels] > pixel_model.threshold_).mean():.2f}"))

    print(f"\n{len(train)} training photos, {len(val)} val ({labels.sum()} Packages); "
          f"feature maps extracted in {extract_s:.0f}s")
    print(format_table(["anomaly score", "AUROC", "fit s", "FPR / TPR at threshold"], rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    for name, values in curves.items():
        fpr, tpr, _ = roc_curve(labels, values)
        axes.plot(fpr, tpr, label=f"{name} ({roc_auc_score(labels, values):.3f})")
    axes.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    axes.set_xlabel("false positive rate (F&V flagged)")
    axes.set_ylabel("true positive rate (Packages flagged)")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "roc.png", dpi=120)
    plt.close(figure)

    # Heatmaps of the three most and least anomalous val photos.
    order = np.argsort(scores)
    for rank, position in enumerate(list(order[-3:]) + list(order[:3])):
        image = Image.open(val[position].path).convert("RGB")
        render_heatmap(image, error_maps[position], out / f"heatmap_{rank}_{val[position].path.stem}.png",
                       vmax=2 * model.error_scale_)

    # Audit: the catalog itself contains foreign images; train on it and rank its own items.
    catalog = np.concatenate([train_maps, foreign_maps])
    names = [str(p) for p in train] + [f"Packages photo {p.name}" for p in foreign_packages] + ["blank", "noise"]
    audit = ConvAutoencoder(epochs=args.epochs, noise=args.noise, progress=False).fit(catalog)
    errors = audit.error_maps(catalog).mean(axis=(1, 2))

    def ranks(values: np.ndarray) -> np.ndarray:
        rank = np.empty(len(values), int)
        rank[np.argsort(-values, kind="stable")] = np.arange(1, len(values) + 1)
        return rank

    by_error, by_score = ranks(errors), ranks(audit.catalog_scores_)
    foreign_rows = [(names[i], by_error[i], by_score[i], f"{audit.catalog_scores_[i]:.2f}",
                     "yes" if audit.catalog_scores_[i] > audit.threshold_ else "")
                    for i in range(len(train), len(catalog))]
    print(f"\naudit of {len(catalog)} catalog items ({len(catalog) - len(train)} foreign), "
          f"threshold {audit.threshold_:.2f}:")
    print(format_table(["foreign item", "rank by reconstruction", "rank by score", "score", "anomalous"],
                       foreign_rows))
    print(f"\nROC curve: {out / 'roc.png'}; heatmaps and loss curve in {out}")


if __name__ == "__main__":
    main()
