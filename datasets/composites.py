"""Test photos with several products and known boxes, made from labelled photos (grocery val).

Two layouts, both seeded and deterministic:

- ``grid``: an n x n grid of photos of different products, each cell 300-400 px (a flyer page);
- ``scatter``: products pasted at random positions and scales, without overlap, onto a
  cluttered background of random shapes, lines and noise (a basket or a cluttered packshot).

Each ``Composite`` knows the box and category of every product it shows, so a detector can be
scored on finding the right product at the right place. ``benchmarks/bench_locate.py`` uses
them; nothing here reads or writes an index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from catalens.datasets.grocery import LabelledPhoto

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive


@dataclass(frozen=True)
class Placed:
    """One product shown in a composite: where, which product, from which photo."""

    box: Box
    category: str
    source: Path


@dataclass
class Composite:
    name: str
    image: Image.Image = field(repr=False)
    products: list[Placed]


def _pick_products(photos: Sequence[LabelledPhoto], count: int, rng: np.random.Generator) -> list[LabelledPhoto]:
    """``count`` photos of ``count`` different products (fine categories), at random."""
    by_category: dict[str, list[LabelledPhoto]] = {}
    for photo in photos:
        by_category.setdefault(photo.category, []).append(photo)
    categories = sorted(by_category)
    if count > len(categories):
        raise ValueError(f"{count} different products asked, the photos show {len(categories)}")
    chosen = rng.choice(len(categories), count, replace=False)
    return [by_category[categories[c]][rng.integers(len(by_category[categories[c]]))] for c in chosen]


def grid(photos: Sequence[LabelledPhoto], n: int, seed: int, cell_range: tuple[int, int] = (300, 400)) -> Composite:
    """An ``n`` x ``n`` grid of photos of different products; one random cell size per grid."""
    rng = np.random.default_rng([seed, n])
    cell = int(rng.integers(cell_range[0], cell_range[1] + 1))
    canvas = Image.new("RGB", (n * cell, n * cell), (255, 255, 255))
    placed = []
    for position, photo in enumerate(_pick_products(photos, n * n, rng)):
        row, column = divmod(position, n)
        box = (column * cell, row * cell, (column + 1) * cell, (row + 1) * cell)
        with Image.open(photo.path) as source:
            canvas.paste(source.convert("RGB").resize((cell, cell), Image.BILINEAR), box[:2])
        placed.append(Placed(box, photo.category, photo.path))
    return Composite(f"grid{n}x{n}-{seed:03d}", canvas, placed)


def cluttered_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Random shapes, lines and noise: texture for a detector to ignore, with no product in it."""
    width, height = size
    base = tuple(int(v) for v in rng.integers(90, 200, 3))
    image = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(20, max(21, width // 4), 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=int(rng.integers(2, 9)))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def _overlaps(box: Box, boxes: Sequence[Box], margin: int = 8) -> bool:
    return any(box[0] < b[2] + margin and b[0] < box[2] + margin and box[1] < b[3] + margin and b[1] < box[3] + margin
               for b in boxes)


def scatter(photos: Sequence[LabelledPhoto], count: int, seed: int, size: tuple[int, int] = (1024, 768),
            side_range: tuple[int, int] = (200, 380)) -> Composite:
    """``count`` products of different kinds pasted, at random scales and non-overlapping random
    places, onto a cluttered background. Fewer are placed when no free place is found."""
    rng = np.random.default_rng([seed, count, 7])
    canvas = cluttered_background(size, rng)
    placed: list[Placed] = []
    for photo in _pick_products(photos, count, rng):
        for _ in range(50):
            side = int(rng.integers(side_range[0], side_range[1] + 1))
            x0, y0 = int(rng.integers(0, size[0] - side + 1)), int(rng.integers(0, size[1] - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if not _overlaps(box, [p.box for p in placed]):
                with Image.open(photo.path) as source:
                    canvas.paste(source.convert("RGB").resize((side, side), Image.BILINEAR), (x0, y0))
                placed.append(Placed(box, photo.category, photo.path))
                break
    return Composite(f"scatter{count}-{seed:03d}", canvas, placed)


def layouts(photos: Sequence[LabelledPhoto], count: int, first_seed: int = 0) -> dict[str, list[Composite]]:
    """``count`` composites of each layout: 2x2 and 3x3 grids, 3 products scattered on clutter."""
    seeds = range(first_seed, first_seed + count)
    return {
        "grid 2x2": [grid(photos, 2, seed) for seed in seeds],
        "grid 3x3": [grid(photos, 3, seed) for seed in seeds],
        "scatter 3 on clutter": [scatter(photos, 3, seed) for seed in seeds],
    }
