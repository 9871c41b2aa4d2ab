"""int8 inference for the deep feature: what NNCF post-training quantisation gains in speed and costs in accuracy.

    .venv/bin/pip install -e '.[int8]'   # NNCF
    .venv/bin/python -m benchmarks.bench_int8 [--calibration 300] [--repeats 3]

The backbone (EfficientNet-Lite0, as OpenVINO runs it) is quantised to int8 by NNCF, calibrated
on ``--calibration`` catalog images (grocery iconic + train). On the same run, for the float32
and each int8 model it prints:

- retrieval: top-1 product of the val photos by deep cosine, against iconic + train and against
  the iconic images alone;
- classification: a logistic regression on the train photos' features, scored on val;
- speed: ms an image, one image a call (as indexing and search run it), the models timed in turn
  ``--repeats`` times.

catalens keeps float32 unless int8 loses at most 0.5 point on retrieval and classification.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression

from catalens.api.tables import format_table
from catalens.datasets.grocery import catalog_items, split_photos
from catalens.indexer.features import l2_normalise
from catalens.indexer.features.deep import DeepFeature
from catalens.indexer.imageio import load_rgb
from catalens.indexer.runtime import openvino_core


def features(request, batch: np.ndarray) -> np.ndarray:
    return l2_normalise(np.concatenate([request.infer(batch[i : i + 1], share_outputs=False)[0] for i in range(len(batch))]))


def top1(queries: np.ndarray, query_labels: list[str], catalog: np.ndarray, catalog_labels: list[str]) -> float:
    nearest = np.argmax(queries @ catalog.T, axis=1)
    return 100.0 * float(np.mean([catalog_labels[n] == label for n, label in zip(nearest, query_labels, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        import nncf
    except ImportError:
        raise SystemExit("NNCF is not installed: .venv/bin/pip install -e '.[int8]'") from None

    deep = DeepFeature()
    catalog = catalog_items(("iconic", "train"))
    val = split_photos("val")
    print(f"preparing {len(catalog)} catalog and {len(val)} val photos ...", flush=True)
    prepare = lambda paths: np.stack([deep.preparer(load_rgb(path, draft_size=deep.draft_size)) for path in paths])  # noqa: E731
    catalog_x, val_x = prepare([item.image for item in catalog]), prepare([photo.path for photo in val])
    catalog_labels, val_labels = [item.category for item in catalog], [photo.category for photo in val]
    iconic = np.array([item.attributes["split"] == "iconic" for item in catalog])

    import openvino as ov
    import torch

    core = openvino_core()
    with torch.inference_mode():
        model = ov.convert_model(deep.model.eval(), example_input=torch.zeros(1, 3, deep.spec.input_size, deep.spec.input_size),
                                 input=[(-1, 3, deep.spec.input_size, deep.spec.input_size)])
    sample = catalog_x[np.random.default_rng(0).permutation(len(catalog_x))[: args.calibration]]
    calibration = nncf.Dataset([sample[i : i + 1] for i in range(len(sample))])
    started = time.perf_counter()
    variants = {"float32": model, "int8 (NNCF, performance preset)": nncf.quantize(model, calibration, subset_size=len(sample))}
    quantise_seconds = time.perf_counter() - started
    variants["int8 (mixed preset, full bias correction)"] = nncf.quantize(
        model, calibration, subset_size=len(sample), preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=False)
    requests = {name: core.compile_model(m, "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
                for name, m in variants.items()}

    timing = {name: 0.0 for name in requests}
    probe = val_x[:100]
    for request in requests.values():
        request.infer(probe[:1])
    for _ in range(args.repeats):
        for name, request in requests.items():
            started = time.perf_counter()
            features(request, probe)
            timing[name] += time.perf_counter() - started
    rows = []
    reference = None
    for name, request in requests.items():
        catalog_f, val_f = features(request, catalog_x), features(request, val_x)
        train = ~iconic
        classifier = LogisticRegression(C=10.0, max_iter=2000).fit(catalog_f[train], np.array(catalog_labels)[train])
        figures = (top1(val_f, val_labels, catalog_f, catalog_labels),
                   top1(val_f, val_labels, catalog_f[iconic], list(np.array(catalog_labels)[iconic])),
                   100.0 * classifier.score(val_f, val_labels))
        reference = reference or figures
        ms = 1000 * timing[name] / (args.repeats * len(probe))
        rows.append((name, *(f"{value:.1f} ({value - base:+.1f})" for value, base in zip(figures, reference, strict=True)),
                     f"{ms:.2f}", f"{1000 * timing['float32'] / (args.repeats * len(probe)) / ms:.2f}x"))
    print(format_table(["deep feature", "top-1 iconic + train", "top-1 iconic", "logistic classify", "ms/image", "speed"], rows))
    print(f"\nquantising (performance preset, {len(sample)} images) took {quantise_seconds:.0f} s")


if __name__ == "__main__":
    main()
