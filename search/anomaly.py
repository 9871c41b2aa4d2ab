"""Anomaly detection by reconstruction error: does a photo belong in this catalog?

The score is the index autoencoder's: the larger of two z-scores against the catalog's own
held-out images, reconstruction error and distance to the nearest catalog images (the second
catches blank and noise images, whose feature maps are easy to reconstruct; see
catalens.indexer.features.autoencoder_model). ``anomalous`` compares it with the threshold calibrated on the catalog at
training time. Error maps are per feature-map cell (8x8 patches of the centre crop) or per pixel
reconstruction error, and can be drawn as heatmaps.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from catalens.indexer.features.autoencoder import (
    FEATURE_NAME,
    SCORE_FEATURE,
    IndexAutoencoder,
    extract_inputs,
    load_autoencoder,
)
from catalens.indexer.imageio import ImageSource, decode_queries

log = logging.getLogger(__name__)


@dataclass
class AnomalyResult:
    query: str
    score: float | None = None
    threshold: float | None = None
    anomalous: bool | None = None
    error: str | None = None
    error_map: np.ndarray | None = field(default=None, repr=False)
    heatmap: Path | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"query": self.query, "error": self.error}
        return {"query": self.query, "score": round(float(self.score), 6),
                "threshold": round(float(self.threshold), 6), "anomalous": bool(self.anomalous)}


# Tukey's "far out" fence: a score more than this many interquartile ranges above the upper quartile
# of the catalog's own scores lies outside their spread. The threshold cannot tell that: it is a
# percentile of the catalog's scores, so a fixed share of ordinary photos (1 in 20 at p95) is above
# it by construction, and an audit's top few are "anomalous" in every catalog, clean or not.
FAR_OUT_IQRS = 3.0


@dataclass(frozen=True)
class AuditEntry:
    """A catalog item's anomaly score; ``percentile``: the share of the catalog's scored items at or
    below it (100 for the highest); ``outlier``: above the threshold and the far-out fence too."""

    id: str
    image: str
    category: str
    score: float
    anomalous: bool
    percentile: float = 100.0
    outlier: bool = False


def centre_crop(image: Image.Image) -> Image.Image:
    """The square the autoencoder sees (both input kinds crop the centre of the shorter side)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


# The colour bar beside a heatmap: without it a map says "red here", not how bad red is.
SCALE_WIDTH = 160
_BAR = (8, 36, 22, 212)  # left, top, right, bottom of the bar within the scale strip


def _draw_scale(height: int, vmax: float, marks: Sequence[tuple[float, str]]) -> Image.Image:
    """The strip right of a heatmap: the colour map from 0 (bottom) to ``vmax`` (top), labelled."""
    from matplotlib import cm
    from PIL import ImageDraw, ImageFont

    strip = Image.new("RGB", (SCALE_WIDTH, height), (255, 255, 255))
    left, top, right, bottom = _BAR
    ramp = cm.inferno(np.linspace(1.0, 0.0, bottom - top))[:, :3] * 255
    strip.paste(Image.fromarray(np.repeat(ramp[:, None, :], right - left, axis=1).astype(np.uint8)), (left, top))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=11)
    draw.text((4, 2), "reconstruction error", fill=(0, 0, 0), font=font)
    draw.text((4, 16), "(squared, standardised)", fill=(90, 90, 90), font=font)

    def label(value: float, text: str) -> None:
        y = bottom - round((bottom - top) * min(value / vmax, 1.0))
        draw.line([(right, y), (right + 4, y)], fill=(0, 0, 0))
        draw.text((right + 7, y), text, fill=(0, 0, 0), font=font, anchor="lm")

    label(vmax, f"{vmax:.3g} or more")
    label(0.0, "0: rebuilt exactly")
    for value, text in marks:
        if 0 < value < vmax:
            label(value, f"{value:.3g}: {text}")
    return strip


def render_heatmap(image: Image.Image, error_map: np.ndarray, path: Path, vmax: float | None = None,
                   marks: Sequence[tuple[float, str]] = ()) -> Path:
    """The centre crop beside the same crop overlaid with the error map (red = badly reconstructed),
    and a colour bar from 0 to ``vmax`` with ``marks`` ((value, what it is)) on it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import cm

    crop = centre_crop(image).resize((224, 224), Image.BILINEAR)
    scale = vmax if vmax and vmax > 0 else float(error_map.max()) or 1.0
    normed = np.clip(error_map / scale, 0.0, 1.0)
    heat = Image.fromarray((cm.inferno(normed)[..., :3] * 255).astype(np.uint8)).resize((224, 224), Image.BICUBIC)
    overlay = Image.blend(crop, heat, 0.55)
    canvas = Image.new("RGB", (448 + SCALE_WIDTH, 224))
    canvas.paste(crop, (0, 0))
    canvas.paste(overlay, (224, 0))
    canvas.paste(_draw_scale(224, scale, marks), (448, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _heatmap_name(position: int, name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem)[:80] or "image"
    return f"{position:04d}_{stem}.png"


def score_images(ae: IndexAutoencoder, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n,) and error maps (n, h, w) of decoded images."""
    _, scores, maps = ae.model.analyse(ae.inputs.images(images))
    return scores, maps


def can_score(catalog) -> bool:
    """Whether ``catalog`` holds what anomaly scoring reads: the autoencoder's codes."""
    return FEATURE_NAME in catalog.global_features()


def score_anomalies(
    catalog, sources: Sequence[ImageSource | Image.Image], names: Sequence[str] | None = None,
    heatmaps_dir: str | Path | None = None,
) -> list[AnomalyResult]:
    """One result per source, in order; an unreadable source gives a result with ``error``."""
    ae = load_autoencoder(catalog)
    threshold = ae.threshold
    # A high error of the catalog's own photos (their mean over the map): redder patches are rebuilt
    # worse than nearly every catalog photo is on average.
    scale_marks = [(ae.model.error_scale_, f"p{ae.model.percentile:g} of catalog")]
    results = []
    for position, (name, image, error) in enumerate(decode_queries(sources, names, catalog.config.max_pixels)):
        if error is not None:
            results.append(AnomalyResult(query=name, error=error))
            continue
        scores, maps = score_images(ae, [image])
        result = AnomalyResult(name, float(scores[0]), threshold, bool(scores[0] > threshold), error_map=maps[0])
        if heatmaps_dir is not None:
            result.heatmap = render_heatmap(image, maps[0], Path(heatmaps_dir) / _heatmap_name(position, name),
                                            vmax=ae.heatmap_scale, marks=scale_marks)
        results.append(result)
    return results


def far_out_fence(scores: Sequence[float] | np.ndarray) -> float:
    """Upper quartile + ``FAR_OUT_IQRS`` interquartile ranges of ``scores``: above it, a score is
    outside the spread of the others, however many of them a percentile threshold flags."""
    q1, q3 = np.percentile(np.asarray(scores, np.float64), [25, 75])
    return float(q3 + FAR_OUT_IQRS * (q3 - q1))


def anomaly_threshold(catalog) -> tuple[float, float]:
    """(threshold, percentile): the threshold is that percentile of held-out catalog photos' scores."""
    ae = load_autoencoder(catalog)
    return ae.threshold, float(ae.model.percentile)


def audit_catalog(catalog, limit: int | None = None, progress: bool = False) -> list[AuditEntry]:
    """The catalog's own items, most anomalous first (for catalog cleaning).

    Scores computed at training time (leave-one-out) are reused; items indexed since then are
    scored now.
    """
    ae = load_autoencoder(catalog)
    records = sorted(catalog.items.records().values(), key=lambda record: record.key)
    stored = catalog.items.rows(SCORE_FEATURE)
    missing = [record for record in records if record.key not in stored]
    if missing:
        X, positions, errors = extract_inputs(ae.inputs, [record.image for record in missing], progress=progress)
        for error in errors.values():
            log.warning("audit: skipped %s", error)
        scores = ae.model.score_samples(X) if len(positions) else np.zeros(0)
        fresh = {missing[position].key: np.float32(score).tobytes() for position, score in zip(positions, scores, strict=True)}
        catalog.items.put_rows(SCORE_FEATURE, fresh)
        stored.update(fresh)
    scored = [(record, float(np.frombuffer(stored[record.key], np.float32)[0])) for record in records
              if record.key in stored]
    scores = np.sort([score for _, score in scored])
    fence = far_out_fence(scores) if len(scores) else 0.0
    entries = [
        AuditEntry(record.id, record.image, record.category, score, score > ae.threshold,
                   float(100.0 * np.searchsorted(scores, score, side="right") / len(scores)),
                   score > ae.threshold and score > fence)
        for record, score in scored
    ]
    entries.sort(key=lambda entry: entry.score, reverse=True)
    return entries[:limit] if limit else entries
