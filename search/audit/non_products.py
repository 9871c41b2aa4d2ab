"""Photos that are not a product: generated placeholders embedded with the index's features, and
the evidence columns a photo is compared with them on."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from catalens.indexer.features import feature_spec, l2_normalise
from catalens.indexer.files import atomic_path
from catalens.search.audit.rows import CatalogRows, NeighbourLists, nearest

log = logging.getLogger(__name__)


PLACEHOLDERS_FILE = "audit_placeholders.npz"


def placeholder_images(size: int = 256, seed: int = 0) -> list[tuple[str, Any]]:
    """What a broken or placeholder upload looks like: flat colours, gradients, noise, printed lines
    on paper, stripes. Generated, so that no catalog has to hold one."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for colour in [(255, 255, 255), (0, 0, 0), (128, 128, 128), (235, 225, 200), (200, 220, 240)]:
        out.append(("flat colour", Image.new("RGB", (size, size), colour)))
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    out.append(("gradient", Image.fromarray(np.stack([np.tile(ramp, (size, 1))] * 3, -1).astype(np.uint8))))
    out.append(("gradient", Image.fromarray(np.stack([np.tile(ramp[:, None], (1, size)), np.full((size, size), 90.0),
                                                      np.tile(ramp[::-1, None], (1, size))], -1).astype(np.uint8))))
    for _ in range(2):
        out.append(("noise", Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))))
    out.append(("noise", Image.fromarray(np.repeat(rng.integers(0, 256, (size, size, 1), dtype=np.uint8), 3, -1))))
    for lines in (6, 14):
        page = Image.new("RGB", (size, size), (250, 250, 250))
        draw = ImageDraw.Draw(page)
        for row in range(lines):
            y = 12 + row * (size - 24) // lines
            x = 12
            while x < size - 20:
                width = int(rng.integers(8, 30))
                draw.rectangle((x, y, min(x + width, size - 12), y + 4), fill=(30, 30, 30))
                x += width + 6
        out.append(("printed page", page))
    for period in (6, 17):
        stripes = np.where((np.arange(size) // period) % 2 == 0, 20, 240).astype(np.uint8)
        out.append(("stripes", Image.fromarray(np.stack([np.tile(stripes, (size, 1))] * 3, -1))))
    checker = ((np.arange(size)[:, None] // 32 + np.arange(size)[None, :] // 32) % 2 * 255).astype(np.uint8)
    out.append(("checkerboard", Image.fromarray(np.stack([checker] * 3, -1))))
    return out


def placeholder_rows(catalog: Any, names: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The placeholders' rows in each of ``names``' features, embedded once and kept in the models folder."""
    from catalens.indexer.features import embed

    kinds_images = placeholder_images()
    kinds = [kind for kind, _ in kinds_images]
    digest = hashlib.sha256(json.dumps([catalog.config.backbone, catalog.config.input_scaling, sorted(names),
                                        len(kinds)]).encode()).hexdigest()[:16]
    path = Path(catalog.models_dir) / PLACEHOLDERS_FILE
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["digest"]) == digest and all(name in stored for name in names):
                return kinds, {name: stored[name] for name in names}
    except (OSError, KeyError, ValueError):
        pass
    images = [image for _, image in kinds_images]
    rows = {name: l2_normalise(np.asarray(embed(catalog.feature(name), images), np.float32)) for name in names}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, allow_pickle=False, digest=np.array(digest), **rows)
    except OSError as error:  # a read-only index embeds them again next time
        log.info("audit: could not keep the placeholders' rows (%s)", error)
    return kinds, rows


def colour_entropy(rows: np.ndarray) -> np.ndarray:
    """Entropy of each colour histogram: a blank or two-tone image has few colours, noise all of them."""
    p = np.maximum(rows, 0.0) ** 2  # rows are L2-normalised histograms: squares sum to one
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    return -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)


def product_evidence(data: CatalogRows, embedding: np.ndarray, prototypes: np.ndarray, neighbours: NeighbourLists,
                     queries: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(n, columns) evidence that a photo is not a product: how far it is from every leaf's
    prototype and from its nearest items, and how odd its colour spread is. ``queries``: rows of
    photos outside the catalog (the placeholders); else the catalog's own, leave-one-out."""
    k = 10
    # A stored histogram feature (the colour histogram) says how many colours a picture holds.
    histogram = next((name for name in data.rows if feature_spec(name).histogram), None)
    if queries is None:
        own_embedding = embedding
        near_sims = neighbours.sims["combined"][:, :k]
        colour_rows = data.rows.get(histogram) if histogram else None
    else:
        stacked = np.hstack([data.weights[name] * queries[name] for name in data.weights]).astype(np.float32)
        catalog_stacked = np.hstack([data.weights[name] * data.rows[name] for name in data.weights]).astype(np.float32)
        own_embedding = l2_normalise(l2_normalise(stacked) - l2_normalise(catalog_stacked).mean(axis=0))
        _, near_sims = nearest(embedding, k, queries=own_embedding, exclude_self=False)
        colour_rows = queries.get(histogram) if histogram else None
    best_prototype = (own_embedding @ prototypes.T).max(axis=1)
    main = next(iter(data.weights))
    main_rows = data.rows[main] if queries is None else queries[main]
    main_centre = l2_normalise(data.rows[main].mean(axis=0, keepdims=True))[0]
    columns = [best_prototype, near_sims.mean(axis=1), near_sims[:, 0], main_rows @ main_centre]
    if colour_rows is not None:
        entropy = colour_entropy(colour_rows)
        reference = colour_entropy(data.rows[histogram])
        median, spread = np.median(reference), max(np.subtract(*np.percentile(reference, [75, 25])), 1e-6)
        columns.append(np.abs(entropy - median) / spread)
    return np.stack(columns, axis=1)


def _own_loo(embedding: np.ndarray, labels: np.ndarray, n_leaves: int) -> np.ndarray:
    sums = np.zeros((n_leaves, embedding.shape[1]), np.float32)
    np.add.at(sums, labels, embedding)
    own = l2_normalise(sums[labels] - embedding)
    counts = np.bincount(labels, minlength=n_leaves)
    return np.where(counts[labels] > 1, np.einsum("ij,ij->i", embedding, own), -1.0)
