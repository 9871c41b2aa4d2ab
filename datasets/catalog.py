"""Catalog readers: a folder tree whose folders are the category path, or a JSONL manifest."""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


class CatalogError(ValueError):
    """A catalog that cannot be read: the message names the file (and line) and the reason."""


@dataclass(frozen=True)
class CatalogItem:
    """One catalog entry: a product image with its category path (``Top/Coarse/Fine``)."""

    id: str
    image: Path
    category: str = ""
    title: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The item as a manifest line; the image path relative to ``relative_to`` where it lies below it."""
        record = asdict(self)
        image = Path(self.image).absolute()
        if relative_to is not None and image.is_relative_to(relative_to):
            image = image.relative_to(relative_to)
        record["image"] = image.as_posix()
        return record


def _normalise_category(category: str) -> str:
    return "/".join(part for part in category.replace("\\", "/").split("/") if part)


def _listed_files(root: Path) -> list[Path]:
    """Every file below ``root``, following folder links once each. A folder that cannot be listed
    is a ``CatalogError`` naming it: a partial listing would make its items look deleted."""

    def unreadable(error: OSError) -> None:
        raise CatalogError(f"{error.filename}: cannot list this folder of the catalog ({error.strerror}); "
                           "fix its permissions, or move it out of the catalog") from None

    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            subfolders.clear()
            continue
        seen.add(real)
        files.extend(Path(folder) / name for name in names)
    return sorted(files)


def check_item_id(item_id: str) -> str | None:
    """Why ``item_id`` cannot be a catalog id, or None. Control characters (a newline in a folder
    name) break every table and log line; a '.' or '..' level cannot be sent in a URL path, so the
    HTTP API could not reach the item."""
    if not item_id.strip():
        return "an id must not be blank"
    bad = next((ch for ch in item_id if unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        return f"id {item_id!r} contains the control character {bad!r}"
    if item_id != item_id.strip():
        return f"id {item_id!r} starts or ends with white space"
    if any(level in (".", "..") for level in item_id.split("/")):
        return f"id {item_id!r} has a '.' or '..' level, which a URL path cannot carry"
    return None


def read_folder_tree(root: str | Path) -> list[CatalogItem]:
    """Every image below ``root``; its folder path is the category, its relative path the id."""
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"{root}: not a folder")
    items = []
    for path in _listed_files(root):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        relative = path.relative_to(root)
        problem = check_item_id(relative.as_posix())
        if problem:
            raise CatalogError(f"{root}: {problem}; rename it")
        items.append(
            CatalogItem(
                id=relative.as_posix(),
                image=path.resolve(),
                category=relative.parent.as_posix() if relative.parent != Path(".") else "",
                title=path.stem,
            )
        )
    if not items:
        raise CatalogError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def read_manifest(path: str | Path) -> list[CatalogItem]:
    """Items of a JSONL manifest; relative image paths resolve against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: manifest not found")
    base = path.resolve().parent
    items: list[CatalogItem] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CatalogError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise CatalogError(f"{where}: each line must be a JSON object")
            for key in ("id", "image"):
                if not isinstance(record.get(key), str) or not record[key].strip():
                    raise CatalogError(f"{where}: '{key}' is required and must be a non-empty string")
            item_id = record["id"]
            problem = check_item_id(item_id)
            if problem:
                raise CatalogError(f"{where}: {problem}")
            if item_id in first_line_of:
                raise CatalogError(
                    f"{where}: duplicate id {item_id!r} (first defined on line {first_line_of[item_id]})"
                )
            first_line_of[item_id] = line_number
            attributes = record.get("attributes") or {}
            if not isinstance(attributes, dict):
                raise CatalogError(f"{where}: 'attributes' must be a JSON object")
            image = Path(record["image"])
            items.append(
                CatalogItem(
                    id=item_id,
                    image=image if image.is_absolute() else base / image,
                    category=_normalise_category(str(record.get("category") or "")),
                    title=str(record.get("title") or ""),
                    attributes=attributes,
                )
            )
    if not items:
        raise CatalogError(f"{path}: manifest has no items")
    return items


def load_catalog(source: str | Path) -> list[CatalogItem]:
    """A folder tree or a ``.jsonl`` manifest, whichever ``source`` is."""
    source = Path(source)
    if source.is_dir():
        return read_folder_tree(source)
    if source.suffix.lower() in {".jsonl", ".ndjson", ".json"}:
        return read_manifest(source)
    if not source.exists():
        raise CatalogError(f"{source}: no such folder or manifest")
    raise CatalogError(f"{source}: a catalog is a folder of images or a .jsonl manifest")


def write_manifest(items: Iterable[CatalogItem], path: str | Path) -> Path:
    """Write ``items`` as a JSONL manifest that ``read_manifest`` reads back to the same files.

    Images below the manifest's folder are written relative to it (the folder can move as a
    whole); others as absolute paths. Relative paths given in ``items`` are taken from the
    current directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.absolute()
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.to_json(relative_to=base), ensure_ascii=False) + "\n")
    return path
