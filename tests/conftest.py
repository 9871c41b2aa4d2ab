"""Shared fixtures: the grocery dataset as a catalog, and one index of it built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from catalens.datasets.catalog import CatalogItem, write_manifest
from catalens.datasets.grocery import LabelledPhoto, catalog_items, grocery_root, split_photos


def _require_grocery() -> Path:
    root = grocery_root()
    if not (root / "train.txt").is_file():
        reason = f"grocery dataset not found at {root} (set CATALENS_GROCERY_ROOT)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI has ../shared beside the clone: a missing dataset is a failure
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def grocery() -> Path:
    return _require_grocery()


@pytest.fixture(scope="session")
def grocery_catalog(grocery: Path) -> list[CatalogItem]:
    """Iconic + train photos of every fine class (2,721 items)."""
    return catalog_items(("iconic", "train"), grocery)


@pytest.fixture(scope="session")
def val_photos(grocery: Path) -> list[LabelledPhoto]:
    return split_photos("val", grocery)


def refit_index(location: Path, *names: str) -> None:
    """What ``catalens index`` fits at its end (the classifier, the match calibration; only those
    ``names`` where given), for an index built with ``index_catalog``: searches never fit them."""
    from catalens.indexer.stores.backends import open_catalog
    from catalens.search.refit import SLOTS

    catalog = open_catalog(location)
    try:
        for slot in SLOTS:
            if not names or slot.name in names:
                slot.refit(catalog)
    finally:
        catalog.close()


@pytest.fixture(scope="session")
def grocery_index(grocery_catalog, tmp_path_factory) -> Path:
    """One index of the grocery catalog, built through a manifest as a user would."""
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    folder = tmp_path_factory.mktemp("grocery")
    manifest = write_manifest(grocery_catalog, folder / "catalog.jsonl")
    report = index_catalog(manifest, folder / "index", IndexConfig(), progress=False)
    assert not report.failures, report.failures[:3]
    refit_index(folder / "index", "classifier")  # what the classify tests read; no test here asks for confidence
    return folder / "index"


def draw_product(path: Path, seed: int, text: str = "", size: int = 256) -> Path:
    """A synthetic 'product shot': coloured shapes and a label, distinct per seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 60, 2)
        x1, y1 = x0 + rng.integers(30, 120), y0 + rng.integers(30, 120)
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
    if text:
        draw.text((10, size - 30), text, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=92)
    return path


def textured_label(seed: int, size: int = 320) -> Image.Image:
    """A label-like image with plenty of corners (SIFT needs texture to find keypoints)."""
    rng = np.random.default_rng(seed)
    array = np.full((size, size, 3), 235, np.uint8)
    for _ in range(70):
        x, y = rng.integers(0, size - 24, 2)
        w, h = rng.integers(6, 24, 2)
        array[y : y + h, x : x + w] = rng.integers(0, 200, 3)
    return Image.fromarray(array)


@pytest.fixture()
def tiny_catalog(tmp_path: Path) -> Path:
    """A folder-tree catalog of 12 generated images in 3 categories."""
    root = tmp_path / "catalog"
    for index in range(12):
        category = ["Dairy/Milk", "Dairy/Yoghurt", "Fruit/Apple"][index % 3]
        draw_product(root / category / f"item{index:02d}.jpg", seed=index, text=f"item {index}")
    return root


@pytest.fixture(scope="session")
def synthetic_index(tmp_path_factory) -> tuple[Path, Path]:
    """(index, catalog): nine generated product shots in three categories, indexed once per
    session; copy the index before changing it."""
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    folder = tmp_path_factory.mktemp("synthetic")
    catalog = folder / "catalog"
    for index in range(9):
        draw_product(catalog / ["Dairy/Milk", "Fruit/Apple", "Fruit/Pear"][index % 3] / f"item{index}.jpg", seed=index)
    report = index_catalog(catalog, folder / "index", IndexConfig(), progress=False)
    assert report.added == 9
    refit_index(folder / "index")
    return folder / "index", catalog


SHOP_CATEGORIES = ["Dairy/Milk", "Dairy/Yoghurt", "Fruit/Apple"]


def indexed_shop(folder: Path) -> tuple[Path, Path]:
    """(catalog folder, index folder) under ``folder``: 12 generated photos in ``SHOP_CATEGORIES``,
    indexed, and fitted as ``catalens index`` leaves them."""
    from catalens.indexer.config import IndexConfig
    from catalens.indexer.pipeline import index_catalog

    for number in range(12):
        draw_product(folder / "catalog" / SHOP_CATEGORIES[number % 3] / f"item{number:02d}.jpg", seed=number,
                     text=f"item {number}")
    report = index_catalog(folder / "catalog", folder / "index", IndexConfig(num_workers=0), progress=False)
    assert report.added == 12 and not report.failures
    refit_index(folder / "index")
    return folder / "catalog", folder / "index"
