"""The Grocery Store dataset (Klasson et al., WACV 2019) as a catalog and as labelled queries."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from catalens.datasets.catalog import CatalogItem

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "grocery-store"


def grocery_root() -> Path:
    """Where the dataset lies: ``$CATALENS_GROCERY_ROOT`` or ``../shared/datasets/grocery-store``."""
    return Path(os.environ.get("CATALENS_GROCERY_ROOT", DEFAULT_ROOT)).resolve()


@dataclass(frozen=True)
class LabelledPhoto:
    path: Path
    category: str  # the fine category path, e.g. Packages/Milk/Arla-Standard-Milk

    @property
    def top(self) -> str:
        return self.category.split("/")[0]

    @property
    def coarse(self) -> str:
        return "/".join(self.category.split("/")[:2])


def split_photos(split: str, root: Path | None = None) -> list[LabelledPhoto]:
    """The photos of ``train`` or ``val`` with their fine category path (folder below the split)."""
    root = root or grocery_root()
    photos = []
    for line in (root / f"{split}.txt").read_text().splitlines():
        if not line.strip():
            continue
        relative = Path(line.split(",")[0].strip())
        category = Path(*relative.parts[1:-1]).as_posix()
        photos.append(LabelledPhoto(root / relative, category))
    return photos


def iconic_photos(root: Path | None = None) -> list[LabelledPhoto]:
    """The one catalog ("iconic") image per fine class."""
    root = root or grocery_root()
    photos = []
    with (root / "classes.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            relative = Path(row["Iconic Image Path (str)"].lstrip("/"))
            category = Path(*relative.parts[1:-1]).as_posix()
            photos.append(LabelledPhoto(root / relative, category))
    return photos


def catalog_items(splits: tuple[str, ...] = ("iconic", "train"), root: Path | None = None) -> list[CatalogItem]:
    """Catalog items for the named splits; ids are the photos' dataset-relative paths."""
    root = root or grocery_root()
    items = []
    for split in splits:
        photos = iconic_photos(root) if split == "iconic" else split_photos(split, root)
        for photo in photos:
            items.append(
                CatalogItem(
                    id=photo.path.relative_to(root).as_posix(),
                    image=photo.path,
                    category=photo.category,
                    title=photo.category.rsplit("/", 1)[-1].replace("-", " "),
                    attributes={"split": split},
                )
            )
    return items


def train_folds(photos: list[LabelledPhoto], n_folds: int = 5) -> list[int]:
    """A fold number per train photo: each class's photos in shooting order (their number), cut into
    ``n_folds`` contiguous blocks. Consecutive photos are bursts of one shooting session, so a
    fold's photos are mostly from other sessions than the rest: the cross-validation that val's
    296 photos are too few for on their own."""
    by_class: dict[str, list[int]] = {}
    for position, photo in enumerate(photos):
        by_class.setdefault(photo.category, []).append(position)
    folds = [0] * len(photos)
    for positions in by_class.values():
        positions.sort(key=lambda p: (int("".join(ch for ch in photos[p].path.stem.rsplit("_", 1)[-1] if ch.isdigit()) or 0),
                                      photos[p].path.name))
        for rank, position in enumerate(positions):
            folds[position] = rank * n_folds // len(positions)
    return folds
